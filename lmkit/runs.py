"""A project's runs at a glance: what each trained, how far, how well, and whether it finished --
from runs/<run>/config.json, runs/<run>/metrics.jsonl and the run's checkpoints -- for `lmkit runs`
and `lmkit plot`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmkit import checkpoint, train
from lmkit.config import TrainConfig
from lmkit.errors import ConfigError, LmkitError
from lmkit.prepare import TokenFile
from lmkit.project import Project, run_holding

BITS_PER_NAT = 1.4426950408889634


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (a killed run) is left out."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


@dataclass
class RunSummary:
    run: str
    project: str
    kind: str  # pretrain, finetune or distill
    arch: str
    task: str
    parameters: int | None
    steps: int
    max_steps: int
    tokens: int
    wall_s: float
    last_val: float | None
    best_val: float | None
    best_step: int | None
    bits_per_byte: float | None  # pretraining: the best validation loss per byte of the validation text
    status: str  # finished, interrupted, running or damaged (its config.json cannot be read)
    started: float  # when the run's config was written (seconds since the epoch)
    val_bytes_per_token: float | None = field(default=None, repr=False)  # what turns its losses into bits per byte
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("rows", "val_bytes_per_token")}


def summarize(project: Project, run: str) -> RunSummary:
    """RUN of PROJECT, summarized.

    Raises:
        LmkitError: the run has no saved config.
    """
    config_file = project.run_config_file(run)
    if not config_file.is_file():
        raise LmkitError(f"{project.root} has no run {run!r} (no {config_file})")
    config = _read_config(config_file)
    rows = read_metrics(project.metrics_file(run))
    steps = project.run_checkpoints(run)
    try:
        newest = checkpoint.Checkpoint(steps[-1]) if steps else None
        snapshot = newest.trainer() if newest else None
    except LmkitError:  # a damaged checkpoint: the metrics still tell the run's story
        newest = snapshot = None
    vals = [(r["step"], r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), (int, float))]
    best = min(vals, key=lambda v: v[1]) if vals else None
    max_steps = _int(config.get("train", {}).get("max_steps", 0)) if config else 0
    last = rows[-1] if rows else {}
    status = "interrupted"
    if config is None:  # its settings are unknown, so whether it finished is too
        status = "damaged"
    elif newest is not None and snapshot is not None:
        state = train.TrainState(**snapshot.state)
        if train._finished(state, TrainConfig(**newest.config.to_dict()["train"])):
            status = "finished"
    elif last.get("step", 0) >= max_steps > 0:
        status = "finished"
    if status == "interrupted" and project.writer() and run == _newest_run(project):
        status = "running"
    kind = train.run_kind(newest) if newest else "pretrain"
    bytes_per_token = _bytes_per_token(project) if kind == "pretrain" else None  # validated on the prepared val split
    return RunSummary(
        run=run, project=str(project.root), kind=kind,
        arch=str((config or {}).get("model", {}).get("arch", "?")), task=newest.task if newest else "lm",
        parameters=newest.meta.get("parameters") if newest else None, steps=int(last.get("step", 0)),
        max_steps=max_steps, tokens=_int(last.get("tokens", 0)), wall_s=_float(last.get("elapsed", 0.0)),
        last_val=vals[-1][1] if vals else None, best_val=best[1] if best else None,
        best_step=best[0] if best else None,
        bits_per_byte=best[1] * BITS_PER_NAT / bytes_per_token if best and bytes_per_token else None,
        status=status, started=config_file.stat().st_mtime, val_bytes_per_token=bytes_per_token, rows=rows)


def _read_config(path: Path) -> dict[str, Any] | None:
    """A run's saved config.json, or None when it is damaged (torn, not JSON, not sections of settings)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(config, dict) or not all(isinstance(config.get(k, {}), dict) for k in ("model", "train")):
        return None
    return config


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _float(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def list_runs(project: Project) -> list[RunSummary]:
    """Every run of PROJECT, oldest first."""
    runs = [p.name for p in project.runs_dir.iterdir() if p.is_dir()] if project.runs_dir.is_dir() else []
    summaries = [summarize(project, run) for run in runs if project.run_config_file(run).is_file()]
    return sorted(summaries, key=lambda s: (s.started, s.run))


def named_runs(home: Project, targets: list[str] | None = None) -> list[RunSummary]:
    """The runs TARGETS name (default: every run of HOME), as `lmkit plot` takes them: a project
    (all its runs), a run folder (PROJECT/runs/RUN) or the name of one of HOME's runs.

    Raises:
        LmkitError: a name that is no run of HOME.
        ConfigError: no runs at all.
    """
    chosen = []
    for target in targets or [str(home.root)]:
        path = Path(target)
        if Project(path).has_runs():
            chosen += list_runs(Project(path))
        elif found := run_holding(path):
            chosen.append(summarize(*found))
        else:
            chosen.append(summarize(home, target))
    if not chosen:
        raise ConfigError(f"no runs to plot in {home.root}")
    return chosen


def _newest_run(project: Project) -> str | None:
    runs = [p for p in project.runs_dir.iterdir() if p.is_dir()] if project.runs_dir.is_dir() else []
    return max(runs, key=lambda p: p.stat().st_mtime).name if runs else None


def _bytes_per_token(project: Project) -> float | None:
    """UTF-8 bytes per token of the project's prepared validation data (pretraining), if known."""
    token_file = TokenFile.open(project.tokens_file("val"))
    return token_file.bytes_per_token if token_file else None
