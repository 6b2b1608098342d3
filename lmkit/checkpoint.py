"""Checkpoint folders: self-describing, written atomically, loaded without unpickling anything.

    step-000200/
      model.safetensors    weights (a tied output layer is stored once, under the embedding's name)
      config.json          format, lmkit version, run config, tokenizer fingerprint, step, metrics,
                           and the sha256 of every other file, checked when that file is read
      tokenizer.model      the tokenizer, so the folder works on its own
      trainer.safetensors  optimizer moments, RNG and data-sampler states      (for exact resume)
      trainer.json         TrainState and optimizer hyper-parameters           (for exact resume)
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lmkit
from lmkit import lora
from lmkit.config import ModelConfig, RunConfig
from lmkit.errors import CheckpointError, ConfigError
from lmkit.fileio import atomic_dir, atomic_write_json
from lmkit.models import build_model, count_parameters
from lmkit.models.heads import SequenceClassifier
from lmkit.project import Project, project_holding
from lmkit.tokenizer import AnyTokenizer, load_tokenizer

FORMAT = "lmkit-checkpoint"
FORMAT_VERSION = 1


@dataclass
class TrainerSnapshot:
    """What a training loop needs, beyond the weights, to continue exactly where it stopped."""

    state: dict[str, Any]  # TrainState fields
    optimizer: dict[str, Any]  # torch optimizer state_dict
    rng: dict[str, torch.Tensor]  # torch (and CUDA) generator states
    sampler: dict[str, torch.Tensor]  # data sampler state
    scaler: dict[str, Any] = field(default_factory=dict)  # fp16 gradient scaler state (empty otherwise)


def save(path: Path, *, model: nn.Module, config: RunConfig, tokenizer: AnyTokenizer, run: str, step: int,
         metrics: dict[str, float] | None = None, trainer: TrainerSnapshot | None = None,
         task: str = "lm", extra: dict[str, Any] | None = None,
         adapters_only: bool = False, weights: dict[str, torch.Tensor] | None = None, int8: bool = False) -> None:
    """Write a checkpoint folder at PATH atomically (replacing any folder already there).

    Args:
        task: what the model does: "lm", or a finetuned task such as "classify".
        extra: more metadata: what identifies the training data ("data", so a resume can check it),
            a classifier's "labels", an adapter checkpoint's "base".
        adapters_only: store only the trainable parameters (LoRA adapters and task heads); the
            frozen rest is read from extra["base"] when loading.
        weights: MODEL's full state dict when model.state_dict() is not it (FSDP shards), or
            with INT8 the tensors of lmkit.quantize.int8_tensors(MODEL).
    """
    state = model.state_dict() if weights is None else weights
    if adapters_only:
        trainable = lora.trainable_state(model)
        weights, aliases = {k: v.detach().contiguous().cpu() for k, v in state.items() if k in trainable}, {}
    else:
        weights, aliases = _dedupe_shared(state, _tied_parameters(model))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lmkit_version": lmkit.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "arch": config.model.arch,
        "task": task,
        "run": run,
        "step": step,
        "parameters": count_parameters(model),
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "weights": "adapters" if adapters_only else "int8" if int8 else "full",
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                      "file": tokenizer.file_name, **({"special": tokenizer.special} if tokenizer.special else {}),
                      **({"options": tokenizer.options()} if tokenizer.options() else {})},
        "tied_weights": aliases,
        "metrics": metrics or {},
        **(extra or {}),
        "config": config.to_dict(),
    }
    with atomic_dir(path) as tmp:
        save_tensors(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / tokenizer.file_name).write_bytes(tokenizer.model_bytes)
        if trainer is not None:
            tensors, trainer_meta = _flatten_trainer(trainer)
            save_tensors(tensors, tmp / "trainer.safetensors")
            (tmp / "trainer.json").write_text(json.dumps(trainer_meta, indent=2) + "\n", encoding="utf-8")
        # damage that still parses (a bad block, a copy gone wrong) shows only as other bytes: loading checks these
        meta["sha256"] = {file.name: file_sha256(file) for file in sorted(tmp.iterdir())}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def save_tensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, whose I/O failures (a full disk, a read-only folder) become the
    OSError they are, naming FILE; safetensors reports them as text with the errno inside."""
    try:
        save_file(tensors, file, metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(file)) from None


def is_checkpoint_dir(path: Path) -> bool:
    """Whether PATH is a folder lmkit wrote as a checkpoint (its config.json says so)."""
    try:
        meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


# What a checkpoint's config.json may name another checkpoint as: (keys, how the error says it).
_REFERENCES = ((("base", "path"), "as the base of its adapters"), (("finetune", "base"), "as its finetuning base"),
               (("distill", "teacher"), "as its teacher"), (("distill", "student"), "as its student's start"),
               (("merged_from",), "as the adapters it was merged from"),
               (("quantized_from",), "as the checkpoint it was quantized from"))


def _named_checkpoints(meta: Any) -> list[tuple[Path, str]]:
    found = []
    for keys, how in _REFERENCES:
        value = meta
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str) and value:
            found.append((Path(value).resolve(), how))
    return found


def referrers(path: Path, *related: Path, ignore_latest: bool = False) -> list[str]:
    """What refers to the checkpoint folder PATH, in the projects of PATH and of the checkpoints
    RELATED (and in RELATED themselves): a project's latest.json (unless IGNORE_LATEST), and every
    checkpoint that names it (an adapter's base, a finetune's base, a distillation's teacher or
    student, the source of a merged or int8 checkpoint). Replacing it would break each of them."""
    target, found = path.resolve(), []
    projects = {p.root for p in map(project_holding, (path, *related)) if p is not None}
    metas = [ckpt for ckpt in related if (ckpt / "config.json").is_file()]
    for root in sorted(projects):
        project = Project(root)
        try:
            if not ignore_latest and project.latest_checkpoint().resolve() == target:
                found.append(str(project.latest_pointer))
        except CheckpointError:
            pass
        metas += [m.parent for m in project.checkpoints_dir.rglob("config.json")
                  if not any(part.startswith(".") for part in m.relative_to(project.checkpoints_dir).parts)]
    for folder in dict.fromkeys(p.resolve() for p in metas):
        try:
            meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if folder != target:
            found += [f"{folder} ({how})" for named, how in _named_checkpoints(meta) if named == target]
    return found


def refuse_referenced(path: Path, *related: Path, ignore_latest: bool = False) -> None:
    """Refuse to replace the checkpoint PATH when anything refers to it (see referrers).

    Args:
        ignore_latest: a latest.json that names PATH does not count (the caller points it anew).

    Raises:
        CheckpointError: naming what refers to PATH.
    """
    found = referrers(path, *related, ignore_latest=ignore_latest)
    if found:
        shown = "; ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise CheckpointError(f"{path} is in use, so lmkit will not replace it: {shown} refers to it; "
                              "write to a new folder")


def file_sha256(file: Path) -> str:
    """The sha256 (hex) of FILE's bytes, read a block at a time."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def set_latest(project: Project, path: Path) -> None:
    """Point the project's latest.json at checkpoint PATH (atomic)."""
    atomic_write_json(project.latest_pointer, {"path": path.relative_to(project.checkpoints_dir).as_posix()})


def prune(project: Project, run: str, keep: int) -> None:
    """Delete all but the newest KEEP step folders of RUN; the one latest.json names always stays."""
    try:
        latest = project.latest_checkpoint().resolve()
    except CheckpointError:
        latest = None
    for old in project.run_checkpoints(run)[:-keep]:
        if old.resolve() != latest:
            shutil.rmtree(old, ignore_errors=True)


def resolve(path: Path | None, project: Project) -> Path:
    """The checkpoint folder meant by PATH: a checkpoint, a run folder (its newest step), or a
    project (its latest); None means PROJECT's latest."""
    if path is None:
        return project.latest_checkpoint()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / "config.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        return Project(path).latest_checkpoint()
    steps = Project(path.parent.parent).run_checkpoints(path.name) if path.is_dir() else []
    if steps:
        return steps[-1]
    raise CheckpointError(f"{path} is not an lmkit checkpoint, run folder or project")


def resumable(path: Path | None, project: Project, warn: Callable[[str], None]
              ) -> tuple[Checkpoint, TrainerSnapshot]:
    """The checkpoint to resume from and its training state: the one PATH means (see resolve),
    or -- when that one is damaged (a crash or a full disk mid-write, a truncated copy) and PATH
    did not name a checkpoint folder itself -- the newest older step of the same run that is whole,
    with a warning.

    Raises:
        CheckpointError: no whole checkpoint to resume from.
    """
    try:
        first = resolve(path, project)
    except CheckpointError as err:  # a damaged or dangling latest.json: the run's folders tell as well
        newest = project.newest_step_checkpoint() if path is None else None
        if newest is None:
            raise
        warn(f"warning: {err}; resuming from the newest checkpoint folder, {newest}")
        first = newest
    explicit = path is not None and (path / "config.json").is_file()
    steps = [] if explicit else list(reversed(project.run_checkpoints(first.parent.name)))
    if steps and first.name == "best":  # a finished run's latest is its best; training goes on from its end
        first = steps[0]
    older = [p for p in steps if p.resolve() != first.resolve()]
    problem = None
    for candidate in [first, *older]:
        try:
            ckpt = Checkpoint(candidate)
            snapshot = ckpt.trainer()
            if snapshot is None:
                raise CheckpointError(f"{candidate} holds weights only and cannot be resumed")
            ckpt.tokenizer()
            ckpt.verify()  # damage that still parses; the weights themselves are read later, by whoever resumes
            with safe_open(candidate / "model.safetensors", "pt"):  # the header covers the whole file: not
                pass  # truncated (all a checkpoint saved before checksums can tell)
        except (CheckpointError, SafetensorError, OSError, ValueError, KeyError) as err:
            problem = problem or f"{candidate}: {err}"
            continue
        if candidate != first:
            warn(f"warning: {problem}; resuming from the previous good checkpoint {candidate}")
        return ckpt, snapshot
    raise CheckpointError(f"cannot resume: {problem}")


class Checkpoint:
    """A checkpoint folder opened for reading. Construction checks config.json only."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} is not an lmkit checkpoint (no config.json)") from None
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{self.path}/config.json is damaged") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise CheckpointError(f"{self.path} is not an lmkit checkpoint")
        if self.meta.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{self.path} was written by a newer lmkit ({self.meta.get('lmkit_version')}); "
                                  "upgrade lmkit to read it")
        _check_meta(self.meta, self.path / "config.json")
        try:
            self.config = RunConfig.from_dict(self.meta["config"], f"{self.path}/config.json")
        except (KeyError, ConfigError) as err:
            raise CheckpointError(f"{self.path}/config.json has an invalid config: {err}") from None
        self._digests: dict[str, str] = {}  # sha256 of the files hashed so far, so none is hashed twice

    def sha256(self, name: str) -> str:
        """The sha256 of this checkpoint's file NAME as it is now (hashed once per Checkpoint)."""
        if name not in self._digests:
            try:
                self._digests[name] = file_sha256(self.path / name)
            except OSError as err:
                raise CheckpointError(f"cannot read {self.path / name}: {err.strerror or err}") from None
        return self._digests[name]

    def verify(self, *names: str) -> None:
        """Check the files NAMES (default: all) against the checksums config.json holds for them
        (checkpoints saved before lmkit kept checksums have none, and pass).

        Raises:
            CheckpointError: a file whose bytes changed since it was saved, named.
        """
        checksums = self.meta.get("sha256", {})
        for name in names or checksums:
            if name in checksums and self.sha256(name) != checksums[name]:
                raise damaged(self.path / name)

    def weights_fingerprint(self) -> str:
        """What identifies these weights (an adapter's base, a student's teacher): the first 16 hex
        digits of model.safetensors' sha256 as it is now (no second hashing once loaded)."""
        return self.sha256("model.safetensors")[:16]

    def require_arch(self, arch: str, command: str) -> Checkpoint:
        if self.config.model.arch != arch:
            raise CheckpointError(f"{self.path} is a {self.config.model.arch} checkpoint; "
                                  f"'lmkit {command}' needs a {arch} one")
        return self

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def run(self) -> str:
        return str(self.meta["run"])

    @property
    def is_int8(self) -> bool:
        return self.meta.get("weights") == "int8"

    @property
    def tokenizer_fingerprint(self) -> str:
        return str(self.meta["tokenizer"]["fingerprint"])

    def tokenizer(self) -> AnyTokenizer:
        info = self.meta["tokenizer"]
        self.verify(info["file"])
        tokenizer = load_tokenizer(self.path / info["file"], info.get("special"), info.get("options"))
        if tokenizer.fingerprint != self.tokenizer_fingerprint:
            raise CheckpointError(f"{self.path}: tokenizer.model does not match the fingerprint in config.json")
        return tokenizer

    @property
    def task(self) -> str:
        """What the model was trained for: a key of lmkit.tasks.TASKS ("lm" for a pretrained model).
        A finetune's task is its spec's (before lmkit saved it, a chat or instruct finetune said "lm")."""
        return str(self.meta.get("finetune", {}).get("task") or self.meta.get("task", "lm"))

    @property
    def labels(self) -> list[str]:
        """A classifier's labels; index i is class i."""
        return list(self.meta.get("labels", []))

    def model(self, device: torch.device | str = "cpu", model_config: ModelConfig | None = None) -> nn.Module:
        """The model with its saved float weights, on DEVICE, in eval mode.

        An adapter checkpoint first loads its base checkpoint, then adds and loads the adapters.
        MODEL_CONFIG may change what does not touch the weights (dropout) for further training.
        An int8 checkpoint (`lmkit quantize`) is for decoding and scoring only: generate, eval and
        serve load it with lmkit.quantize.model_for_decoding; training and export need float weights.
        """
        if self.is_int8:
            raise CheckpointError(f"{self.path} holds int8 weights (lmkit quantize), for generate, eval, chat "
                                  f"and serve only; use the checkpoint it came from: "
                                  f"{self.meta.get('quantized_from', 'its source')}")
        adapters = self.meta.get("weights") == "adapters"
        model_config = model_config or self.config.model
        model = self._base_model(model_config) if adapters else build_model(model_config)
        if self.labels:  # a classifier: its head is part of the weights
            model = SequenceClassifier(model, len(self.labels))
        if adapters:
            lora.add_adapters(model, self.config.lora)
        expected = self.meta.get("sha256", {}).get("model.safetensors")
        if "model.safetensors" in self._digests:  # hashed already (resumable, an adapter's base check)
            self.verify("model.safetensors")
            expected = None
        stored, missing, unexpected = load_weights(model, self.path / "model.safetensors", sha256=expected)
        if expected is not None:
            self._digests["model.safetensors"] = expected
        if adapters:  # everything trainable must be in the file; the frozen rest came from the base
            complete = {n for n, p in model.named_parameters() if p.requires_grad} <= stored
        else:
            complete = set(missing) == set(self.meta.get("tied_weights", {}))
        if not complete or unexpected:
            raise CheckpointError(f"{self.path}/model.safetensors does not match its config "
                                  f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        broken = [name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
        if broken:
            raise CheckpointError(f"{self.path} has weights that are not finite (NaN or inf, e.g. {broken[0]}): the "
                                  "run diverged before this step; use an earlier checkpoint")
        return model.to(device).eval()

    def _base_model(self, model_config: ModelConfig) -> nn.Module:
        base = self.meta["base"]
        path = Path(base["path"])
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{self.path} holds adapters for {path}, which is gone; restore it, or use a "
                                  "merged checkpoint (lmkit finetune --merge)")
        base_ckpt = Checkpoint(path)
        if base_ckpt.weights_fingerprint() != base["weights"]:
            raise CheckpointError(f"{path} has changed since the adapters in {self.path} were trained on it")
        return base_ckpt.model(model_config=model_config)  # the adapters' run may have changed dropout

    def trainer(self) -> TrainerSnapshot | None:
        """The saved training state, or None for a weights-only checkpoint."""
        if not (self.path / "trainer.json").is_file():
            return None
        self.verify("trainer.json", "trainer.safetensors")
        try:
            meta = json.loads((self.path / "trainer.json").read_text(encoding="utf-8"))
            _check_trainer_meta(meta)
            return _unflatten_trainer(load_file(self.path / "trainer.safetensors"), meta)
        except (ValueError, KeyError, OSError, SafetensorError) as err:
            raise CheckpointError(f"{self.path}: the training state is damaged ({err})") from None


# config.json keys every reader relies on, and their types (bool is not an int here); _OPTIONAL
# ones may be absent.
_META_TYPES: dict[str, type] = {"step": int, "run": str, "tokenizer": dict, "config": dict, "task": str,
                                "weights": str, "metrics": dict, "tied_weights": dict, "sha256": dict}
_OPTIONAL = {"task", "weights", "metrics", "tied_weights", "sha256"}  # sha256: absent before lmkit kept checksums
_KIND_NAMES = {int: "an integer", str: "a string", dict: "an object"}
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def _check_meta(meta: dict[str, Any], where: Path) -> None:
    """Refuse a config.json whose fields have the wrong types (a hand edit, another tool's file), so
    no reader fails later with a TypeError."""
    for key, kind in _META_TYPES.items():
        value = meta.get(key)
        if key in _OPTIONAL and key not in meta:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{where} is damaged: {key!r} should be {_KIND_NAMES[kind]}, not {value!r:.40}")
    tokenizer = meta["tokenizer"]
    if not isinstance(tokenizer.get("fingerprint"), str) or tokenizer.get("file") not in _TOKENIZER_FILES:
        raise CheckpointError(f"{where} is damaged: 'tokenizer' needs a fingerprint and a file "
                              f"({' or '.join(_TOKENIZER_FILES)})")


def _check_trainer_meta(meta: Any) -> None:
    """trainer.json's shape: {"state": {counter: number}, "param_groups": [{...}], ...}.

    Raises:
        ValueError: what is wrong.
    """
    if not isinstance(meta, dict):
        raise ValueError("trainer.json is not an object")
    state, groups = meta.get("state"), meta.get("param_groups")
    if not isinstance(state, dict) or not all(isinstance(v, int | float | None) and not isinstance(v, bool)
                                              for v in state.values()):
        raise ValueError("trainer.json's state is not an object of numbers")
    if not isinstance(state.get("step"), int) or state["step"] < 0:
        raise ValueError("trainer.json has no step count")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ValueError("trainer.json's param_groups is not a list of objects")
    if not isinstance(meta.get("optimizer_scalars"), dict) or not isinstance(meta.get("scaler", {}), dict):
        raise ValueError("trainer.json's optimizer_scalars or scaler is not an object")


def load_weights(model: nn.Module, path: Path, sha256: str | None = None) -> tuple[set[str], list[str], list[str]]:
    """Copy the tensors of the safetensors file PATH into MODEL's parameters and buffers of the same
    names, one tensor at a time (so loading holds the model plus one tensor, not two copies of the
    weights); converts dtypes (bf16 on disk -> the model's fp32). With SHA256, the file's checksum
    is taken while reading and must be that.

    Returns:
        (names in the file, model names the file lacks, file names the model lacks)

    Raises:
        CheckpointError: an unreadable or damaged file, or a tensor whose shape differs from the model's.
    """
    state = model.state_dict()  # views of the parameters themselves: copying into them loads the model
    digest = hashlib.sha256() if sha256 is not None else None
    misfit = None  # a shape that differs from the model's; damage, when the checksum tells of it, comes first
    try:
        with safe_open(path, "pt") as f:  # checks the header against the file's size and that the tensors tile it
            stored = set(f.keys())
        # Read each tensor's bytes with plain file reads: safe_open's tensors are views of a memory
        # map, whose pages would all count as resident at once (a second copy of the weights).
        # In file order, so that the checksum covers every byte in one pass.
        with open(path, "rb") as f, torch.no_grad():
            prefix = f.read(8)
            header_size = int.from_bytes(prefix, "little")
            raw_header = f.read(header_size)
            header = json.loads(raw_header)
            if digest is not None:
                digest.update(prefix + raw_header)
            for name in sorted(stored, key=lambda n: header[n]["data_offsets"][0]):
                info = header[name]
                wanted = name in state
                if wanted and tuple(info["shape"]) != tuple(state[name].shape):
                    misfit = misfit or (f"{path}: {name} has shape {tuple(info['shape'])}, the model's is "
                                        f"{tuple(state[name].shape)}")
                    wanted = False
                if not wanted and digest is None:
                    continue
                start, end = info["data_offsets"]
                f.seek(8 + header_size + start)
                data = bytearray(end - start)
                f.readinto(data)
                if digest is not None:
                    digest.update(data)
                if wanted and data:
                    state[name].copy_(torch.frombuffer(data, dtype=_DTYPES[info["dtype"]]).view(info["shape"]))
    except (FileNotFoundError, SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if digest is not None and digest.hexdigest() != sha256:
        raise damaged(path)
    if misfit:
        raise CheckpointError(misfit)
    return stored, sorted(state.keys() - stored), sorted(stored - state.keys())


def damaged(file: Path) -> CheckpointError:
    """The error for a checkpoint's FILE whose bytes no longer match the sha256 saved with it."""
    return CheckpointError(f"{file} is damaged: its bytes no longer match the sha256 in config.json (a disk or "
                           "copy error); restore it from a copy, or use another checkpoint")


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # safetensors' names


def _tied_parameters(model: nn.Module) -> dict[str, str]:
    """{name: first name} of parameters registered under more than one name (GPT ties lm_head.weight
    to transformer.wte.weight)."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def _dedupe_shared(state: dict[str, torch.Tensor], tied: dict[str, str]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory: keep the first name of each tied parameter
    (TIED) or tensor sharing storage, record the rest as aliases {dropped name: kept name}."""
    kept: dict[tuple[int, int], str] = {}
    weights, aliases = {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if name in tied:
            aliases[name] = tied[name]
            continue
        if key in kept and state[kept[key]].shape == tensor.shape:
            aliases[name] = kept[key]
            continue
        kept[key] = name
        weights[name] = tensor.detach().contiguous().cpu()
    return weights, aliases


def _flatten_trainer(snapshot: TrainerSnapshot) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, param_state in snapshot.optimizer["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    for prefix, group in (("rng", snapshot.rng), ("sampler", snapshot.sampler)):
        for key, value in group.items():
            tensors[f"{prefix}.{key}"] = value.contiguous().cpu()
    meta = {"state": snapshot.state, "param_groups": snapshot.optimizer["param_groups"],
            "optimizer_scalars": scalars, "scaler": snapshot.scaler}
    return tensors, meta


def _unflatten_trainer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> TrainerSnapshot:
    optimizer_state: dict[int, dict[str, Any]] = {}
    rng, sampler = {}, {}
    for name, value in tensors.items():
        prefix, _, rest = name.partition(".")
        if prefix == "optimizer":
            index, _, key = rest.partition(".")
            optimizer_state.setdefault(int(index), {})[key] = value
        elif prefix == "rng":
            rng[rest] = value
        elif prefix == "sampler":
            sampler[rest] = value
    for name, value in meta["optimizer_scalars"].items():
        index, _, key = name.partition(".")
        optimizer_state.setdefault(int(index), {})[key] = value
    optimizer = {"state": optimizer_state, "param_groups": meta["param_groups"]}
    return TrainerSnapshot(state=meta["state"], optimizer=optimizer, rng=rng, sampler=sampler,
                           scaler=meta.get("scaler", {}))
