"""Shared fixtures: tiny configs, a fixed seed, and one tiny project built once per session."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lmkit import config, train
from lmkit.config import ModelConfig, RunConfig
from lmkit.project import Project

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_TRAIN = ROOT / "sample_data" / "shakespeare_train.txt"
SAMPLE_HELDOUT = ROOT / "sample_data" / "shakespeare_heldout.txt"


@pytest.fixture(autouse=True)
def seed() -> int:
    torch.manual_seed(0)
    return 0


@pytest.fixture
def tiny_model_config() -> ModelConfig:
    return ModelConfig(arch="gpt", vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=16)


@pytest.fixture(scope="session")
def sample_text() -> str:
    if not SAMPLE_TRAIN.is_file():
        pytest.fail("sample data missing: run `python sample_data/build.py` (the test command does)")
    return SAMPLE_TRAIN.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory, sample_text: str) -> Path:
    """The first ~120 KB of the sample text (Hamlet's opening acts)."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(sample_text[:120_000], encoding="utf-8")
    return path


def tiny_run_config(**train_overrides: object) -> RunConfig:
    """The tiny preset shrunk further: vocab 512, context 32, a few dozen steps."""
    cfg = config.resolve(flags={"preset": "tiny", "tokenizer.vocab_size": 512, "model.max_seq_len": 32,
                                "train.max_steps": 40, "train.eval_interval": 20, "train.log_interval": 1,
                                "train.batch_size": 8, "train.warmup_steps": 5})
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_overrides))


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Project:
    """A project with a tokenizer, prepared data and one short tiny run (read-only for tests)."""
    project = Project.open(tmp_path_factory.mktemp("tiny_project"))
    train.pretrain(project, [small_corpus], tiny_run_config())
    return project


def tiny_bert_config(**train_overrides: object) -> RunConfig:
    cfg = config.resolve(flags={"arch": "bert", "preset": "tiny", "model.max_seq_len": 48,
                                "train.max_steps": 30, "train.eval_interval": 15, "train.log_interval": 1,
                                "train.batch_size": 8, "train.warmup_steps": 5})
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_overrides))


@pytest.fixture(scope="session")
def tiny_bert_project(tmp_path_factory: pytest.TempPathFactory, tiny_project: Project) -> Project:
    """The tiny project's tokenizer and data, with a short BERT run."""
    import shutil

    project = Project.open(tmp_path_factory.mktemp("tiny_bert"))
    shutil.copytree(tiny_project.tokenizer_dir, project.tokenizer_dir)
    shutil.copytree(tiny_project.data_dir, project.data_dir)
    train.pretrain(project, [], tiny_bert_config())
    return project
