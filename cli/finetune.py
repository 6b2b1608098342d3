"""`lmkit finetune`: adapt a pretrained checkpoint to a task (classify, instruct, chat, seq2seq, lm, dpo),
fully or with LoRA."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli import display
from cli.options import (
    CheckpointOpt,
    Compile,
    ConfigFile,
    DeviceOpt,
    Json,
    Keep,
    LogTo,
    MaxSteps,
    NewRun,
    Nproc,
    Precision,
    ProjectDir,
    Quiet,
    Seed,
    Sets,
    Strategy,
    common,
    exit_if_interrupted,
    hand_off_to_torchrun,
    is_main_process,
    user_errors,
)


class Task(str, Enum):  # noqa: UP042 - Typer renders str-Enums as choices
    classify = "classify"
    instruct = "instruct"
    chat = "chat"
    seq2seq = "seq2seq"
    lm = "lm"
    dpo = "dpo"


class LoraTargets(str, Enum):  # noqa: UP042
    attn = "attn"
    mlp = "mlp"
    all = "all"


def finetune(
    ctx: typer.Context,
    data: Annotated[Optional[Path], typer.Argument(
        show_default=False,
        help="Task data: CSV/TSV/JSONL (classify), JSONL prompt/completion (instruct), JSONL {\"messages\": "
        "[{\"role\", \"content\"}, ...]} (chat), TSV source<TAB>target or JSONL source/target (seq2seq), "
        "text (lm), JSONL {\"prompt\" or \"messages\", \"chosen\", \"rejected\"} (dpo: preference pairs; "
        "--set dpo.loss=sigmoid|ipo|simpo, dpo.beta).")] = None,
    task: Annotated[Task, typer.Option(help="What to finetune for.")] = Task.classify,
    base: Annotated[Optional[Path], typer.Option(
        "--from", show_default=False,
        help="Pretrained checkpoint, run or project (default: the project's latest).")] = None,
    scratch: Annotated[bool, typer.Option(
        "--scratch", help="Baseline: the --from checkpoint's shape and tokenizer, fresh weights.")] = False,
    val: Annotated[Optional[Path], typer.Option(
        show_default=False, help="Validation file (default: 10% of DATA held back, stratified by label).")] = None,
    lora_rank: Annotated[Optional[int], typer.Option(
        show_default=False, help="Train LoRA adapters of this rank on a frozen model (0: all weights).")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(
        show_default=False, help="LoRA updates are scaled by alpha / rank (default 16).")] = None,
    lora_dropout: Annotated[Optional[float], typer.Option(
        show_default=False, help="Dropout on the LoRA path, in [0, 1) (default 0).")] = None,
    lora_targets: Annotated[Optional[LoraTargets], typer.Option(
        show_default=False, help="Projections that get adapters: attn, mlp or all (default attn).")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="With LoRA: also write a merged full checkpoint.")] = False,
    chat_template: Annotated[Optional[Path], typer.Option(
        show_default=False, help="chat: a Jinja chat template (or a tokenizer_config.json with one) instead of "
        "the tokenizer's own; it is saved with the checkpoints.")] = None,
    config_file: ConfigFile = None,
    set_: Sets = None,
    max_steps: MaxSteps = None,
    log: LogTo = None,
    nproc: Nproc = None,
    strategy: Strategy = None,
    keep: Keep = None,
    compile_model: Compile = None,
    precision: Precision = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the latest finetuning run exactly.")] = False,
    new_run: NewRun = False,
    json_out: Json = False,
    checkpoint: CheckpointOpt = None,
    project: ProjectDir = None,
    device: DeviceOpt = None,
    seed: Seed = None,
    quiet: Quiet = False,
) -> None:
    """Finetune a pretrained checkpoint on DATA (keeps the best checkpoint by validation)."""
    from lmkit import checkpoint as ckpt_lib
    from lmkit import config
    from lmkit import finetune as ft
    from lmkit import project as proj

    hand_off_to_torchrun(nproc)
    opts = common(ctx, project, device, seed, quiet)
    with user_errors(), proj.Project.writing(opts.project) as p:
        flags = {"lora.rank": lora_rank, "lora.alpha": lora_alpha, "lora.dropout": lora_dropout,
                 "lora.targets": lora_targets.value if lora_targets else None,
                 **opts.train_flags(max_steps=max_steps, keep=keep, log=log, compile_model=compile_model,
                                    precision=precision, strategy=strategy)}
        with display.Display(opts.quiet) as shown:
            if resume:  # the run's own command line may come along; what it changes is refused
                given = {"task": task.value if data else None, "data": str(data.resolve()) if data else None,
                         "base": str(ckpt_lib.resolve(base, p).resolve()) if base else None,
                         "val": str(val.resolve()) if val else None, "scratch": True if scratch else None,
                         "chat_template": str(chat_template.resolve()) if chat_template else None}
                result = ft.resume(p, checkpoint, max_steps=max_steps, merge=merge, given=given,
                                   command=config.CommandLine(config_file, tuple(set_ or ()), flags), log=opts.say,
                                   progress=shown.training)
            else:
                if data is None:
                    raise config.ConfigError("give the task data: lmkit finetune DATA --task ...")
                spec = ft.FinetuneSpec(task.value, str(data.resolve()),
                                       str(ckpt_lib.resolve(base or checkpoint, p).resolve()),
                                       str(val.resolve()) if val else None, scratch,
                                       str(chat_template.resolve()) if chat_template else None)
                result = ft.finetune(p, spec, config_file=config_file, sets=tuple(set_ or ()), flags=flags,
                                     merge=merge, continue_interrupted=not new_run, log=opts.say,
                                     progress=shown.training)
    out = result.outcome
    if not is_main_process():  # the other ranks trained alongside rank 0, which reports
        return
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
    else:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in out.validation.items())
        typer.echo(f"{result.run}: step {result.state.step}, {scores}")
        if out.best_checkpoint:
            typer.echo(f"best {result.best_metric} {result.state.best:.4f} at step {result.state.best_step}: "
                       f"{out.best_checkpoint}")
    if not json_out:
        opts.say(display.run_summary(result, p))
    exit_if_interrupted(out.stopped_by, "finetune", p.root)
