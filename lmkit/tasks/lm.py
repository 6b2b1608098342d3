"""More language-model training on new text: DATA is a corpus, batched as the architecture pretrains."""

from lmkit.tasks.task import Task

TASK = Task(
    name="lm", summary="more language-model training on new text", data_help="text, like a pretraining corpus",
    train={"max_steps": 500, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 50, "eval_interval": 50, "log_interval": 10,
           "save_interval": 100_000},
    data=None, dropout=None)
