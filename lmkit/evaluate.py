"""Evaluating a model. A decoder (GPT, llama) on a text: mean loss per token, perplexity and bits
per byte; on chat conversations, the same for the assistant's replies only. BERT on a text:
masked-LM loss and accuracy, next-sentence accuracy, and the baselines to judge them by. A
classifier on labelled examples: accuracy, macro-F1, per-class scores, confusion matrix. An
encoder-decoder on source/target pairs: BLEU and chrF (sacrebleu, so that figures compare with
published ones), exact match, and the same scores for copying the source unchanged.

For a decoder, every token of the text is scored, each with as much context as the model allows:
windows of max_seq_len tokens slide by STRIDE, and each window scores only the tokens that no
earlier window scored. The text is encoded as a document start (after EOS, as in training; with an
imported Llama-family model's own BOS, if it has one), so the first token is scored too. Bits per
byte divides the total by the text's UTF-8 size, which makes models with different tokenizers
comparable. Which evaluation a checkpoint gets is its task's and architecture's choice
(lmkit.tasks.evaluate_checkpoint).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmkit import chat, corpus, data, finetune_data, metrics, objectives
from lmkit.batches import to_device
from lmkit.config import MAX_BATCH, MAX_CONTEXT, SampleConfig, check_range
from lmkit.device import autocast
from lmkit.errors import DataError
from lmkit.generate import translate
from lmkit.models import ARCHS
from lmkit.tokenizer import Tokenizer

Records = list[dict[str, Any]]  # one JSON object per example: the input, its target and the output


@dataclass(frozen=True)
class EvalOptions:
    """How `lmkit eval` scores; each evaluation reads the options that apply to it."""

    stride: int | None = None  # language models: tokens between window starts (default: half the context)
    batch_size: int | None = None  # sequences per forward pass (default: each evaluation's own)
    sampler: SampleConfig = field(default_factory=lambda: SampleConfig(greedy=True))  # seq2seq decoding
    quantize: str | None = None  # "int8": score the model with int8 weights (lmkit.quantize)
    reference: str | None = None  # preference pairs: the checkpoint DPO's implicit rewards are measured against

    def __post_init__(self) -> None:
        check_range("stride", self.stride, 1, MAX_CONTEXT)
        check_range("batch_size", self.batch_size, 1, MAX_BATCH)


def evaluate_text(model: nn.Module, tokenizer: Tokenizer, path: Path, options: EvalOptions,
                  device: torch.device) -> tuple[LMEvaluation, None]:
    """A causal language model on the text file PATH (see evaluate_lm)."""
    return evaluate_lm(model, tokenizer, corpus.read_text(path), device, stride=options.stride,
                       batch_size=options.batch_size or 8), None


def evaluate_masked_text(model: nn.Module, tokenizer: Tokenizer, path: Path, options: EvalOptions,
                         device: torch.device) -> tuple[BertEvaluation, None]:
    """A masked-LM on the text file PATH (see evaluate_bert)."""
    return evaluate_bert(model, tokenizer, corpus.read_text(path), device, batch_size=options.batch_size or 8), None


def evaluate_pairs(model: nn.Module, tokenizer: Tokenizer, path: Path, options: EvalOptions,
                   device: torch.device) -> tuple[Seq2SeqEvaluation, Records]:
    """An encoder-decoder on the source/target pairs of PATH (see evaluate_seq2seq)."""
    pairs = finetune_data.read_source_targets(path)
    result, outputs = evaluate_seq2seq(model, tokenizer, pairs, options.sampler, device, options.batch_size or 64)
    return result, [{"source": p.source, "target": p.target, "output": o} for p, o in zip(pairs, outputs)]


# Arch.evaluation -> how `lmkit eval FILE` scores a checkpoint of that architecture:
# (model, tokenizer, file, options, device) -> (result, per-example records or None)
Evaluation = Callable[[nn.Module, Tokenizer, Path, EvalOptions, torch.device], tuple[Any, Records | None]]
EVALUATIONS: dict[str, Evaluation] = {"text": evaluate_text, "masked-text": evaluate_masked_text,
                                      "pairs": evaluate_pairs}


@dataclass(frozen=True)
class LMEvaluation:
    loss: float  # nats per token
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    context: int
    stride: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def evaluate_lm(model: nn.Module, tokenizer: Tokenizer, text: str, device: torch.device, *,
                stride: int | None = None, batch_size: int = 8) -> LMEvaluation:
    """Score TEXT with MODEL. STRIDE defaults to half the context (each token sees >= half of it).

    Raises:
        DataError: TEXT has no tokens.
    """
    ids = tokenizer.encode_document(text)
    n_targets = len(ids) - 1
    if n_targets < 1:
        raise DataError("nothing to evaluate: the text is empty")
    window = model.config.max_seq_len
    stride = min(stride or max(1, window // 2), window)
    tokens = torch.tensor(ids)

    width = min(window, n_targets)  # a short text needs no padding to a long model's whole context
    inputs, targets = [], []
    scored_until = 0  # targets [0, scored_until) have been scored by earlier windows
    for begin in range(0, n_targets, stride):
        end = min(begin + window, n_targets)
        x = torch.full((width,), tokenizer.pad_id)
        y = torch.full((width,), objectives.IGNORE)
        x[: end - begin] = tokens[begin:end]
        y[: end - begin] = tokens[begin + 1:end + 1]
        y[: scored_until - begin] = objectives.IGNORE  # already scored with less context
        inputs.append(x)
        targets.append(y)
        scored_until = end
        if end == n_targets:
            break

    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    with autocast(device):
        for i in range(0, len(inputs), batch_size):
            x = torch.stack(inputs[i:i + batch_size]).to(device)  # (B, T)
            y = torch.stack(targets[i:i + batch_size]).to(device)  # (B, T)
            logits, _ = model(x)
            total += objectives.next_token_loss(logits, y, reduction="sum").double()
    nats = total.item()
    n_bytes = len(text.encode("utf-8"))
    loss = nats / n_targets
    return LMEvaluation(loss=loss, perplexity=math.exp(min(loss, 700.0)), bits_per_byte=nats / math.log(2) / n_bytes,
                        tokens=n_targets, bytes=n_bytes, context=window, stride=stride)


@dataclass(frozen=True)
class ChatEvaluation:
    loss: float  # nats per assistant token (the replies and their end-of-turn tokens)
    perplexity: float
    bits_per_byte: float  # over the UTF-8 bytes of the replies
    assistant_tokens: int
    assistant_bytes: int
    conversations: int
    cut: int  # conversations cut to fit the context
    left_out: int  # conversations with no reply token within the context
    context: int
    base: str | None = None  # the checkpoint finetuned from, scored the same way
    base_loss: float | None = None
    base_bits_per_byte: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@torch.no_grad()
def evaluate_chat(model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[Sequence[chat.Message]],
                  device: torch.device, batch_size: int = 8) -> ChatEvaluation:
    """Score the assistant's turns of CONVERSATIONS, rendered by the tokenizer's chat template and
    cut to the context as for training: only the tokens a chat finetune learns are scored."""
    window = model.config.max_seq_len
    form = chat.ChatFormat(tokenizer)
    encoded, counts = chat.encode_for_training(form, conversations, window, "the conversations")
    collate = finetune_data.collate_learned(tokenizer.pad_id)
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    with autocast(device):
        for batch in finetune_data.fixed_batches([(e.ids, e.learn) for e in encoded], batch_size, collate):
            b = to_device(batch, device)
            logits, _ = model(b.inputs)
            total += objectives.next_token_loss(logits, b.targets, reduction="sum").double()
    nats, n_tokens = total.item(), counts["assistant_tokens"]
    n_bytes = max(1, sum(e.assistant_bytes for e in encoded))
    return ChatEvaluation(loss=nats / n_tokens, perplexity=math.exp(min(nats / n_tokens, 700.0)),
                          bits_per_byte=nats / math.log(2) / n_bytes, assistant_tokens=n_tokens,
                          assistant_bytes=n_bytes, conversations=len(encoded),
                          cut=counts["turns"] + counts["mid-turn"], left_out=counts["dropped"], context=window)


@dataclass(frozen=True)
class BertEvaluation:
    mlm_loss: float  # nats per masked token
    mlm_accuracy: float
    nsp_accuracy: float
    mlm_majority_baseline: float  # accuracy of always guessing the most frequent masked token
    nsp_majority_baseline: float  # accuracy of always guessing the more frequent NSP label
    masked_tokens: int
    pairs: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def evaluate_bert(model: nn.Module, tokenizer: Tokenizer, text: str, device: torch.device, *,
                  batch_size: int = 32, seed: int = 0) -> BertEvaluation:
    """Masked-LM and next-sentence accuracy on sentence pairs drawn from TEXT as in pretraining.

    The pairs and masks come from a fixed SEED, so repeated evaluations agree; about twice as many
    pairs are drawn as the text holds, so nearly every part of it is used.

    Raises:
        DataError: TEXT is too short for sentence pairs.
    """
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    seq_len = model.config.max_seq_len
    pairs = data.BertPairs(tokens, seq_len, batch_size, seed, tokenizer)
    n_batches = min(500, max(2, math.ceil(2 * len(tokens) / (seq_len - 3) / batch_size)))
    batches = [to_device(batch, device) for batch in pairs.fixed_batches(n_batches)]
    model.eval()
    with autocast(device):
        metrics = objectives.mlm_nsp_metrics(model, batches)
    mlm_labels = torch.cat([b.mlm_labels[b.mlm_labels != objectives.IGNORE] for b in batches])
    nsp_labels = torch.cat([b.nsp_labels for b in batches])
    return BertEvaluation(
        mlm_loss=metrics["val_mlm_loss"], mlm_accuracy=metrics["val_mlm_accuracy"],
        nsp_accuracy=metrics["val_nsp_accuracy"],
        mlm_majority_baseline=torch.bincount(mlm_labels).max().item() / mlm_labels.numel(),
        nsp_majority_baseline=torch.bincount(nsp_labels).max().item() / nsp_labels.numel(),
        masked_tokens=mlm_labels.numel(), pairs=nsp_labels.numel())


@dataclass(frozen=True)
class Prediction:
    label: str
    prob: float
    probs: dict[str, float]  # every label's probability

    def record(self, example: finetune_data.LabelledText) -> dict[str, object]:
        """One line of a predictions file: the input, its given label (if any) and the prediction."""
        given = {"text_b": example.text_b} if example.text_b is not None else {}
        if example.label:
            given["label"] = example.label
        return {"text": example.text, **given, "predicted": self.label, "prob": self.prob, "probs": self.probs}


@torch.no_grad()
def predict_labels(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[finetune_data.LabelledText],
                   labels: list[str], device: torch.device, batch_size: int = 32) -> list[Prediction]:
    """A classifier's label and probabilities for each example (its own label is not used)."""
    placeholder = [finetune_data.LabelledText(e.text, labels[0], e.text_b) for e in examples]
    layout = ARCHS[model.config.arch].pair_layout(tokenizer)
    rows = finetune_data.encode_labelled(placeholder, tokenizer, labels, layout, model.config.max_seq_len)
    collate = finetune_data.collate_labelled(tokenizer.pad_id)
    model.eval()
    predictions = []
    with autocast(device):
        for batch in finetune_data.fixed_batches(rows, batch_size, collate):
            b = to_device(batch, device)
            logits, _ = model(b.ids, b.token_types, b.pad_mask)
            for row in logits.float().softmax(dim=-1).tolist():
                best = max(range(len(labels)), key=row.__getitem__)
                predictions.append(Prediction(labels[best], row[best], dict(zip(labels, row))))
    return predictions


@dataclass(frozen=True)
class ClassifyEvaluation:
    accuracy: float
    macro_f1: float
    examples: int
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, f1, support
    confusion: list[list[int]]  # [true][predicted], in label order
    labels: list[str]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def evaluate_classifier(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[finetune_data.LabelledText],
                        labels: list[str], device: torch.device, batch_size: int = 32
                        ) -> tuple[ClassifyEvaluation, list[Prediction]]:
    """Accuracy, macro-F1, per-class precision/recall and the confusion matrix on labelled EXAMPLES.

    Raises:
        DataError: an example's label is not one the classifier knows.
    """
    unknown = sorted({e.label for e in examples} - set(labels))
    if unknown:
        raise DataError(f"label {unknown[0]!r} is not one of the classifier's labels ({', '.join(labels)})")
    predictions = predict_labels(model, tokenizer, examples, labels, device, batch_size)
    index = {label: i for i, label in enumerate(labels)}
    truth = [index[e.label] for e in examples]
    predicted = [index[p.label] for p in predictions]
    confusion = metrics.confusion_matrix(truth, predicted, len(labels))
    accuracy, macro_f1 = metrics.accuracy_and_macro_f1(truth, predicted, len(labels))
    per_class = dict(zip(labels, metrics.per_class(confusion)))
    return ClassifyEvaluation(accuracy, macro_f1, len(examples), per_class, confusion, labels), predictions


@dataclass(frozen=True)
class Seq2SeqEvaluation:
    bleu: float  # corpus BLEU, 0-100
    chrf: float  # corpus chrF, 0-100
    exact_match: float  # share of outputs equal to their target
    loss: float  # nats per target token, teacher forced
    copy_bleu: float  # the same scores for copying the source unchanged: the baseline to beat
    copy_chrf: float
    copy_exact_match: float
    pairs: int
    decoding: str  # "greedy" or "beam N"
    seconds: float  # decoding wall time
    bleu_signature: str  # sacrebleu's description of how BLEU was computed

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@torch.no_grad()
def evaluate_seq2seq(model: nn.Module, tokenizer: Tokenizer, pairs: Sequence[finetune_data.SourceTarget],
                     cfg: SampleConfig, device: torch.device, batch_size: int = 64
                     ) -> tuple[Seq2SeqEvaluation, list[str]]:
    """Decode every source as CFG says (greedy or beam search), score against the targets; also
    return the outputs, in input order."""
    import sacrebleu  # only this evaluation needs it

    model.eval()
    start = time.perf_counter()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].source))  # similar lengths batch well
    outputs: list[str] = [""] * len(pairs)
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        for j, completion in zip(chunk, translate(model, tokenizer, [pairs[j].source for j in chunk], cfg, device)):
            outputs[j] = completion.samples[0].text
    seconds = time.perf_counter() - start
    rows = finetune_data.encode_source_targets(pairs, tokenizer, model.config.max_seq_len)
    collate = finetune_data.collate_source_targets(tokenizer.pad_id, tokenizer.eos_id)
    batches = [to_device(b, device) for b in finetune_data.fixed_batches(rows, batch_size, collate)]
    with autocast(device):
        loss = objectives.seq2seq_metrics(model, batches)["val_loss"]
    targets = [p.target for p in pairs]
    sources = [p.source for p in pairs]
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    return Seq2SeqEvaluation(
        bleu=bleu.corpus_score(outputs, [targets]).score, chrf=chrf.corpus_score(outputs, [targets]).score,
        exact_match=sum(o == t for o, t in zip(outputs, targets)) / len(pairs), loss=loss,
        copy_bleu=bleu.corpus_score(sources, [targets]).score,
        copy_chrf=chrf.corpus_score(sources, [targets]).score,
        copy_exact_match=sum(s == t for s, t in zip(sources, targets)) / len(pairs), pairs=len(pairs),
        decoding=f"beam {cfg.beam}" if cfg.beam > 1 else "greedy" if cfg.is_greedy else "sampling",
        seconds=round(seconds, 2), bleu_signature=str(bleu.get_signature())), outputs
