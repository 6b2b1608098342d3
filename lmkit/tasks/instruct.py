"""Instruction tuning: learn the completion of each prompt (the prompt is read, never a target)."""

from __future__ import annotations

from lmkit import finetune_data, objectives
from lmkit.config import RunConfig
from lmkit.tasks.task import TEXT_PAIRS_TRAIN, FinetuneSpec, Task, TaskData, pairs_and_val
from lmkit.tokenizer import Tokenizer


def instruct_data(spec: FinetuneSpec, cfg: RunConfig, tokenizer: Tokenizer) -> TaskData:
    pairs, val_pairs = pairs_and_val(finetune_data.read_prompt_completions, spec)
    max_len = cfg.model.max_seq_len
    return TaskData(finetune_data.encode_prompt_completions(pairs, tokenizer, max_len),
                    finetune_data.encode_prompt_completions(val_pairs, tokenizer, max_len),
                    finetune_data.collate_prompt_completions(tokenizer.pad_id), objectives.causal_lm_loss,
                    objectives.causal_lm_metrics)


TASK = Task(name="instruct", summary="instruction tuning on prompt/completion pairs",
            data_help='JSONL {"prompt", "completion"}', train=TEXT_PAIRS_TRAIN, data=instruct_data,
            distillable=False)
