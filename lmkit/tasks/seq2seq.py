"""Rewriting with the encoder-decoder: learn each source's target, teacher forced."""

from __future__ import annotations

from lmkit import finetune_data, objectives
from lmkit.config import RunConfig
from lmkit.tasks.task import FinetuneSpec, Task, TaskData, pairs_and_val
from lmkit.tokenizer import Tokenizer


def seq2seq_data(spec: FinetuneSpec, cfg: RunConfig, tokenizer: Tokenizer) -> TaskData:
    pairs, val_pairs = pairs_and_val(finetune_data.read_source_targets, spec)
    max_len = cfg.model.max_seq_len
    return TaskData(finetune_data.encode_source_targets(pairs, tokenizer, max_len),
                    finetune_data.encode_source_targets(val_pairs, tokenizer, max_len),
                    finetune_data.collate_source_targets(tokenizer.pad_id, tokenizer.eos_id), objectives.seq2seq_loss,
                    objectives.seq2seq_metrics)


TASK = Task(name="seq2seq", summary="source -> target rewriting (encoder-decoder)",
            data_help='TSV source<TAB>target, or JSONL {"source", "target"}',
            train={"batch_size": 32, "max_steps": 1500, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100,
                   "weight_decay": 0.01, "eval_interval": 100, "log_interval": 10, "save_interval": 100_000},
            data=seq2seq_data, objective="source -> target (teacher forced)")
