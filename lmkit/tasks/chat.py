"""Multi-turn chat: learn the assistant's turns of conversations rendered with the chat template."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lmkit import chat, evaluate, finetune_data, objectives
from lmkit.checkpoint import Checkpoint, is_checkpoint_dir
from lmkit.config import RunConfig
from lmkit.errors import CheckpointError
from lmkit.models import ARCHS
from lmkit.quantize import model_for_decoding
from lmkit.tasks.task import TEXT_PAIRS_TRAIN, FinetuneSpec, Task, TaskData, pairs_and_val
from lmkit.tokenizer import Tokenizer


def chat_data(spec: FinetuneSpec, cfg: RunConfig, tokenizer: Tokenizer) -> TaskData:
    conversations, val_conversations = pairs_and_val(chat.read_conversations, spec)
    form = chat.ChatFormat(tokenizer)
    train, counts = chat.encode_for_training(form, conversations, cfg.model.max_seq_len, str(spec.data))
    val, _ = chat.encode_for_training(form, val_conversations, cfg.model.max_seq_len, str(spec.val or spec.data))
    return TaskData([(e.ids, e.learn) for e in train], [(e.ids, e.learn) for e in val],
                    finetune_data.collate_learned(tokenizer.pad_id), objectives.causal_lm_loss,
                    objectives.causal_lm_metrics, {"chat": counts}, summary=chat_summary(counts, cfg.model.max_seq_len))


def chat_summary(counts: dict[str, int], max_len: int) -> str:
    """One line on how the conversations fit the context."""
    cut = [f"{counts[key]:,} {what}" for key, what in (("turns", "cut after their last whole turn that fits"),
                                                        ("mid-turn", "cut inside their first reply"),
                                                        ("dropped", "left out (no reply token fits)")) if counts[key]]
    return (f"{counts['conversations']:,} training conversations, {counts['assistant_tokens']:,} assistant tokens "
            f"to learn; context {max_len}" + (f": {', '.join(cut)}" if cut else ": all fit whole"))


def evaluate_chat_checkpoint(ckpt: Any, path: Path, options: Any, device: torch.device
                             ) -> tuple[evaluate.ChatEvaluation, None]:
    """A decoder on the conversations of PATH (see evaluate.evaluate_chat); a chat finetune is also
    scored as its base checkpoint was, when that is still there: what finetuning gained."""
    if TASK.name not in ARCHS[ckpt.config.model.arch].tasks or ckpt.labels:
        raise CheckpointError(f"{ckpt.path} is a {ckpt.config.model.arch} checkpoint for task {ckpt.task!r}; "
                              "'lmkit eval --task chat' needs a decoder language model (gpt or llama)")
    conversations = chat.read_conversations(path)
    tokenizer = ckpt.tokenizer()
    batch_size = options.batch_size or 8
    result = evaluate.evaluate_chat(model_for_decoding(ckpt, device, options.quantize), tokenizer, conversations,
                                    device, batch_size)
    base = Path(ckpt.meta.get("finetune", {}).get("base", ""))
    if ckpt.task == TASK.name and is_checkpoint_dir(base) \
            and Checkpoint(base).tokenizer_fingerprint == tokenizer.fingerprint:
        before = evaluate.evaluate_chat(model_for_decoding(Checkpoint(base), device, options.quantize), tokenizer,
                                        conversations, device, batch_size)
        result = replace(result, base=str(base), base_loss=before.loss, base_bits_per_byte=before.bits_per_byte)
    return result, None


TASK = Task(name="chat", summary="multi-turn chat: the assistant's turns of conversations",
            data_help='JSONL {"messages": [{"role", "content"}, ...]}', train=TEXT_PAIRS_TRAIN, data=chat_data,
            evaluate=evaluate_chat_checkpoint, chat_template=True, distillable=False)
