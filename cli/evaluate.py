"""`lmkit eval`: score a checkpoint on a file: a language model on text, a classifier on labelled
examples, an encoder-decoder on source/target pairs, a decoder on chat conversations or on
preference pairs."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cli.options import (
    Beam,
    CheckpointOpt,
    DeviceOpt,
    Json,
    LengthPenalty,
    MaxNewTokens,
    NoRepeatNgram,
    ProjectDir,
    Quantize,
    Quiet,
    RepetitionPenalty,
    common,
    user_errors,
)


def evaluate(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(
        show_default=False, help="Text (lm), labelled examples (classify), source/target pairs (seq2seq), or "
        "JSONL preference pairs {\"prompt\", \"chosen\", \"rejected\"} (any decoder: preference accuracy).")],
    task: Annotated[Optional[str], typer.Option(
        show_default=False,
        help="lm, classify, seq2seq, chat (a decoder on JSONL conversations: the replies' loss) or dpo "
        "(preference pairs; found by their fields too); default: the checkpoint's own task, which it must "
        "match.")] = None,
    reference: Annotated[Optional[Path], typer.Option(
        show_default=False, help="Preference pairs: also DPO's implicit reward accuracy and margin against "
        "this checkpoint (the model finetuning started from).")] = None,
    stride: Annotated[Optional[int], typer.Option(
        show_default=False, help="GPT: tokens between window starts (default: half the context).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        show_default=False, help="Sequences per forward pass (default: 8; seq2seq: 64 sources).")] = None,
    predictions: Annotated[Optional[Path], typer.Option(
        show_default=False, help="classify, seq2seq: write each example's prediction to this JSONL file.")] = None,
    beam: Beam = 1,
    length_penalty: LengthPenalty = 1.0,
    no_repeat_ngram_size: NoRepeatNgram = 0,
    repetition_penalty: RepetitionPenalty = 1.0,
    max_new_tokens: MaxNewTokens = 200,
    quantize: Quantize = None,
    json_out: Json = False,
    checkpoint: CheckpointOpt = None,
    project: ProjectDir = None,
    device: DeviceOpt = None,
    quiet: Quiet = False,
) -> None:
    """Score a checkpoint on FILE: perplexity and bits per byte, MLM/NSP accuracy, classification, or
    BLEU/chrF/exact match of decoded outputs (greedy, or --beam N)."""
    from lmkit import checkpoint as ckpt_lib
    from lmkit import config, tasks
    from lmkit import device as dev
    from lmkit import evaluate as ev
    from lmkit import project as proj

    opts = common(ctx, project, device, quiet=quiet)
    with user_errors():
        if predictions is not None and predictions.is_dir():  # checked first: evaluating may take long
            raise config.ConfigError(f"--predictions {predictions} is a directory; give a file in it, e.g. "
                                     f"{predictions / 'predictions.jsonl'}")
        ckpt = ckpt_lib.Checkpoint(ckpt_lib.resolve(checkpoint, proj.Project.open(opts.project, create=False)))
        sampler = config.SampleConfig(max_new_tokens=max_new_tokens, greedy=True, beam=beam,
                                      length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                                      repetition_penalty=repetition_penalty)
        options = ev.EvalOptions(stride=stride, batch_size=batch_size, sampler=sampler,
                                 quantize=quantize.value if quantize else None,
                                 reference=str(ckpt_lib.resolve(reference, None)) if reference else None)
        result, records = tasks.evaluate_checkpoint(ckpt, file, options, dev.pick_device(opts.device), task)
        if predictions:
            if records is None:
                raise config.ConfigError("--predictions writes each example's output: it applies to classifiers, "
                                         "seq2seq models and preference pairs, not to language models scored on text")
            if not predictions.parent.exists():
                opts.say(f"creating {predictions.parent} for the predictions")
            _write_lines(predictions, records)
    report = {"file": str(file), "checkpoint": str(ckpt.path), "arch": ckpt.config.model.arch, "task": ckpt.task,
              **result.to_dict()}
    typer.echo(json.dumps(report) if json_out else _text(report))


def _text(report: dict[str, Any]) -> str:
    """Aligned `key  value` lines; a per-class table and a confusion matrix for classifiers."""
    scalars = {k: v for k, v in report.items() if not isinstance(v, (dict, list))}
    width = max(map(len, scalars))
    lines = [f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in scalars.items()]
    if "per_class" in report:
        labels = report["labels"]
        w = max(8, *map(len, labels))
        lines += ["", f"{'label':<{w}}  precision  recall      f1  support"]
        lines += [f"{label:<{w}}  {s['precision']:9.4f}  {s['recall']:6.4f}  {s['f1']:6.4f}  {s['support']:7d}"
                  for label, s in report["per_class"].items()]
        lines += ["", "confusion (rows: true, columns: predicted)",
                  " " * w + "  " + "  ".join(f"{x:>{w}}" for x in labels)]
        lines += [f"{label:<{w}}  " + "  ".join(f"{n:>{w}}" for n in row)
                  for label, row in zip(labels, report["confusion"])]
    return "\n".join(lines)


def _write_lines(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line, written atomically."""
    from lmkit.fileio import atomic_file

    with atomic_file(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
