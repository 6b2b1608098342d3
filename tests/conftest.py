"""Shared fixtures: tiny configs, a fixed seed, and one tiny project built once per session."""

from __future__ import annotations

import dataclasses
import json
import random
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
    cfg = config.resolve(flags={"arch": "gpt", "preset": "tiny", "tokenizer.vocab_size": 512, "model.max_seq_len": 32,
                                "train.max_steps": 40, "train.eval_interval": 20, "train.log_interval": 1,
                                "train.batch_size": 8, "train.warmup_steps": 5})
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_overrides))


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Project:
    """A project with a tokenizer, prepared data and one short tiny run (read-only for tests)."""
    project = Project.open(tmp_path_factory.mktemp("tiny_project"))
    train.pretrain(project, [small_corpus], tiny_run_config())
    return project


def _tiny_arch_config(arch: str, model: dict[str, object], train_overrides: dict[str, object]) -> RunConfig:
    """ARCH's tiny preset with MODEL settings, cut to 30 steps of batch 8, then TRAIN_OVERRIDES."""
    cfg = config.resolve(flags={"arch": arch, "preset": "tiny", **{f"model.{k}": v for k, v in model.items()},
                                "train.max_steps": 30, "train.eval_interval": 15, "train.log_interval": 1,
                                "train.batch_size": 8, "train.warmup_steps": 5})
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_overrides))


def tiny_bert_config(**train_overrides: object) -> RunConfig:
    return _tiny_arch_config("bert", {"max_seq_len": 48}, train_overrides)


def _sibling_project(tmp_path_factory: pytest.TempPathFactory, tiny_project: Project, name: str) -> Project:
    """A new project sharing the tiny project's tokenizer and prepared data."""
    import shutil

    project = Project.open(tmp_path_factory.mktemp(name))
    shutil.copytree(tiny_project.tokenizer_dir, project.tokenizer_dir)
    shutil.copytree(tiny_project.data_dir, project.data_dir)
    return project


@pytest.fixture(scope="session")
def tiny_bert_project(tmp_path_factory: pytest.TempPathFactory, tiny_project: Project) -> Project:
    """The tiny project's tokenizer and data, with a short BERT run."""
    project = _sibling_project(tmp_path_factory, tiny_project, "tiny_bert")
    train.pretrain(project, [], tiny_bert_config())
    return project


def tiny_seq2seq_config(**train_overrides: object) -> RunConfig:
    return _tiny_arch_config("seq2seq", {"max_seq_len": 32}, train_overrides)


@pytest.fixture(scope="session")
def tiny_seq2seq_project(tmp_path_factory: pytest.TempPathFactory, tiny_project: Project) -> Project:
    """The tiny project's tokenizer and data, with a short encoder-decoder (denoising) run."""
    project = _sibling_project(tmp_path_factory, tiny_project, "tiny_seq2seq")
    train.pretrain(project, [], tiny_seq2seq_config())
    return project


def tiny_llama_config(**train_overrides: object) -> RunConfig:
    return _tiny_arch_config("llama", {"max_seq_len": 32, "qk_norm": True}, train_overrides)


@pytest.fixture(scope="session")
def tiny_llama_project(tmp_path_factory: pytest.TempPathFactory, tiny_project: Project) -> Project:
    """The tiny project's tokenizer and data, with a short run of the modern decoder (GQA, QK-norm)."""
    project = _sibling_project(tmp_path_factory, tiny_project, "tiny_llama")
    train.pretrain(project, [], tiny_llama_config())
    return project


def overwrite_middle(path: Path, byte: int, count: int) -> None:
    """Damage that still parses: COUNT bytes in the middle of the file PATH become BYTE (a bad disk
    block, a copy that went wrong); its size and header stay as they were."""
    data = bytearray(path.read_bytes())
    start = (len(data) - count) // 2
    assert start > 4096, f"{path} is too small to damage in the middle"  # past any header
    data[start:start + count] = bytes([byte]) * count
    path.write_bytes(bytes(data))


STYLE_LABELS = ["shout", "speak", "whisper"]


def _write_style_task(path: Path, lines: list[str]) -> None:
    """A task any small model can learn: a line in capitals (shout), lower case (whisper), or as written."""
    styles = {"shout": str.upper, "speak": str, "whisper": str.lower}
    with path.open("w", encoding="utf-8") as f:
        for i, line in enumerate(lines):
            label = STYLE_LABELS[i % 3]
            f.write(json.dumps({"text": styles[label](line), "label": label}) + "\n")


@pytest.fixture(scope="session")
def task_files(tmp_path_factory: pytest.TempPathFactory, sample_text: str) -> dict[str, Path]:
    """Finetuning data from the sample text: a style classification task (train, val) and
    prompt/completion pairs that all share one reply (instruct)."""
    folder = tmp_path_factory.mktemp("tasks")
    lines = [line for line in sample_text.splitlines() if len(line) > 25]
    random.Random(0).shuffle(lines)
    files = {"train": folder / "train.jsonl", "val": folder / "val.jsonl", "instruct": folder / "speeches.jsonl"}
    _write_style_task(files["train"], lines[:480])
    _write_style_task(files["val"], lines[480:570])
    files["instruct"].write_text("".join(json.dumps({"prompt": line + "\n", "completion": "Amen to that, my lord."})
                                         + "\n" for line in lines[:300]))
    return files
