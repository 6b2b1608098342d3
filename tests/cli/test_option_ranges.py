"""Option values out of range are the project's one-line `error: ...` with exit 2 (checked where the
values are used, in lmkit), never Click's usage block, and never a traceback for a huge number."""

from __future__ import annotations

import shutil

import pytest

from tests.cli.conftest import lmkit

HUGE = "99999999999999999999"

# (command line, the setting the message names); P is a copy of the tiny project, C the small corpus,
# T the classify training file.
CASES = [
    ("generate -p P x --temperature -1", "temperature=-1.0"),
    ("generate -p P x --top-p 2", "top_p=2.0"),
    ("generate -p P x --top-p 0", "top_p=0.0"),
    ("generate -p P x --repetition-penalty 0", "repetition_penalty=0.0"),
    ("generate -p P x --top-k -1", "top_k=-1"),
    ("generate -p P x --max-new-tokens 0", "max_new_tokens=0"),
    ("generate -p P x --num-samples 0", "num_samples=0"),
    ("generate -p P x --beam 0", "beam=0"),
    ("generate -p P x --no-repeat-ngram-size -1", "no_repeat_ngram_size=-1"),
    ("generate -p P x --seed -1", "seed=-1"),
    ("generate -p P x --draft P --draft-tokens 0", "draft_tokens=0"),
    ("generate -p P x --draft P --draft-tokens 33", "draft_tokens=33"),
    (f"generate -p P x --num-samples {HUGE}", f"num_samples={HUGE}"),
    (f"generate -p P x --max-new-tokens {HUGE}", f"max_new_tokens={HUGE}"),
    ("chat -p P --top-k -1", "top_k=-1"),
    ("eval C -p P --stride 0", "stride=0"),
    ("eval C -p P --batch-size 0", "batch_size=0"),
    (f"eval C -p P --batch-size {HUGE}", f"batch_size={HUGE}"),
    ("eval C -p P --beam 0", "beam=0"),
    ("tokenize train C -p P --vocab-size 0 --force", "tokenizer.vocab_size=0"),
    ("tokenize prepare C -p P --workers 0", "workers=0"),
    ("tokenize prepare C -p P --val-fraction 0", "data.val_fraction=0.0"),
    ("serve -p P --port 70000", "port=70000"),
    ("serve -p P --port -1", "port=-1"),
    ("serve -p P --max-batch 0", "max_batch=0"),
    ("serve -p P --max-queue -1", "max_queue=-1"),
    ("serve -p P --max-context 4", "max_context=4"),
    ("serve -p P --max-tokens 0", "max_tokens=0"),
    ("serve -p P --shutdown-timeout -1", "shutdown_timeout=-1.0"),
    (f"serve -p P --max-batch {HUGE}", f"max_batch={HUGE}"),
    ("pretrain C -p P --max-steps 0", "train.max_steps=0"),
    ("pretrain C -p P --keep 0", "train.keep_checkpoints=0"),
    ("pretrain C -p P --nproc 0", "nproc=0"),
    ("pretrain C -p P --seed -1", "train.seed=-1"),
    (f"pretrain C -p P --set train.batch_size={HUGE}", f"train.batch_size={HUGE}"),
    ("finetune T -p P --task classify --lora-rank -1", "lora.rank=-1"),
    ("finetune T -p P --task classify --lora-dropout 1", "lora.dropout=1.0"),
    ("distill C -p P --teacher P --temperature 0", "distill.temperature=0.0"),
]


@pytest.fixture(scope="module")
def places(tiny_project, small_corpus, task_files, tmp_path_factory) -> dict[str, str]:
    project = tmp_path_factory.mktemp("ranges") / "proj"
    shutil.copytree(tiny_project.root, project)
    return {"P": str(project), "C": str(small_corpus), "T": str(task_files["train"])}


@pytest.mark.parametrize(("command", "named"), CASES, ids=[c for c, _ in CASES])
def test_an_option_out_of_range_is_one_error_line(command, named, places) -> None:
    result = lmkit(*[places.get(word, word) for word in command.split()], "-q")
    assert result.exit_code == 2, result.output
    assert "Usage:" not in result.output and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], result.output
