"""Summaries of a checkpoint or a project for `lmkit info`: plain dicts, printed as tables or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmkit import checkpoint as ckpt_lib
from lmkit.errors import CheckpointError
from lmkit.models import ARCHS
from lmkit.prepare import SPLITS, TokenFile
from lmkit.project import Project
from lmkit.tasks import task_of


def describe_checkpoint(path: Path) -> dict[str, Any]:
    ckpt = ckpt_lib.Checkpoint(path)
    ckpt.verify()  # a summary of a damaged checkpoint would pass it off as whole
    meta = ckpt.meta
    trainer_file = ckpt.path / "trainer.json"
    trainer = json.loads(trainer_file.read_text(encoding="utf-8")) if trainer_file.is_file() else None
    finetuned = {key: meta[key] for key in ("labels", "finetune", "base", "merged_from") if key in meta}
    if meta["config"].get("lora", {}).get("rank"):
        finetuned["lora"] = meta["config"]["lora"]
    return {
        "checkpoint": str(ckpt.path),
        "arch": meta["arch"],
        "task": ckpt.task,
        "architecture": ARCHS[ckpt.config.model.arch].summary,
        "objectives": [task_of(ckpt).objective] if task_of(ckpt).objective else list(
            ARCHS[ckpt.config.model.arch].objectives),
        "layers": meta["config"]["model"]["n_layer"],
        "heads": meta["config"]["model"]["n_head"],
        "run": ckpt.run,
        "step": ckpt.step,
        "parameters": meta["parameters"],
        "trainable_parameters": meta.get("trainable_parameters", meta["parameters"]),
        "weights": meta.get("weights", "full"),
        **finetuned,
        "lmkit_version": meta["lmkit_version"],
        "created": meta.get("created"),
        "tokenizer": meta["tokenizer"],
        "metrics": meta.get("metrics", {}),
        "training_state": trainer["state"] if trainer else None,
        "model": ckpt.config.model.to_dict(),  # the settings its architecture reads
        "train": meta["config"]["train"],
    }


def describe_project(project: Project) -> dict[str, Any]:
    tokenizer = None
    meta_file = project.tokenizer_model.with_suffix(".json")
    if meta_file.is_file():
        tokenizer = json.loads(meta_file.read_text(encoding="utf-8"))
    data = {}
    for split in SPLITS:
        token_file = TokenFile.open(project.tokens_file(split))
        if token_file:
            data[split] = {"tokens": token_file.tokens, "bytes": token_file.meta["bytes"],
                           "dtype": token_file.meta["dtype"], "tokenizer": token_file.tokenizer_fingerprint}
    folders = project.checkpoints_dir.iterdir() if project.checkpoints_dir.is_dir() else []
    runs = sorted(p.name for p in folders if p.is_dir())
    try:
        latest = describe_checkpoint(project.latest_checkpoint())
    except CheckpointError:
        latest = None
    return {
        "project": str(project.root),
        "config_file": str(project.config_file) if project.config_file.exists() else None,
        "tokenizer": tokenizer,
        "data": data,
        "runs": {run: [p.name for p in project.run_checkpoints(run)] for run in runs},
        "latest": latest,
    }
