"""Hugging Face interop: Hub-format model directories in (`lmkit import`) and back out (`lmkit export`).

A Hub-format directory is config.json + model.safetensors (or shards with an index) + the
tokenizer (tokenizer.json and its special tokens). Each architecture declares its Hugging Face
mapping (config keys and weight names, in lmkit.models.<arch>: GPT-2 for gpt, BERT for bert,
Llama, Qwen2, Qwen3 and Mistral for llama);
this module reads and writes the files. Only safetensors, tokenizers and json are needed here;
transformers is not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmkit import checkpoint
from lmkit.checkpoint import save_tensors
from lmkit.config import RunConfig
from lmkit.errors import CheckpointError, ConfigError, LmkitError
from lmkit.fileio import atomic_dir, check_target_dir
from lmkit.models import ARCHS, build_model
from lmkit.project import Project, project_holding
from lmkit.tokenizer import SPECIAL_PIECES, HFTokenizer, Tokenizer

_SPECIAL_KEYS = {"pad": "pad_token", "unk": "unk_token", "bos": "bos_token", "eos": "eos_token",
                 "cls": "cls_token", "sep": "sep_token", "mask": "mask_token"}
# BERT's per-layer names -> lmkit's (query/key/value are fused separately).

# --- import -------------------------------------------------------------------------------------

def import_hf(source: Path, project: Project) -> Path:
    """Convert the Hugging Face model directory SOURCE (GPT-2 or BERT) into an lmkit checkpoint
    in PROJECT (run "hf-<name>", step 0) and make it the project's latest; returns its folder.

    Raises:
        CheckpointError: not a model directory, pickled weights only, an architecture or config
            option lmkit does not have, or weights that do not match the config.
        LmkitError: another process holds PROJECT's lock.
    """
    with project.lock():
        return _import_hf(source, project)


def _import_hf(source: Path, project: Project) -> Path:
    if source.exists() and not source.is_dir():
        raise CheckpointError(f"{source} is a file; give the Hugging Face model directory that holds it")
    config = _ConfigFields(_read_json(source / "config.json", "a Hugging Face model directory"),
                           source / "config.json")
    model_type = config.get("model_type")
    architectures = _architectures(config)
    hf = next((arch.hf for arch in ARCHS.values() if arch.hf and model_type in arch.hf.model_types), None)
    if hf is None:
        known = [t for arch in ARCHS.values() if arch.hf for t in arch.hf.model_types]
        if model_type is None:
            raise CheckpointError(f"{source}/config.json has no model_type; lmkit imports {', '.join(known)}")
        raise CheckpointError(f"{source}: model_type {model_type!r} ({', '.join(architectures)})"
                              f" is not supported; lmkit imports {', '.join(known)}")
    try:
        model_config = hf.config_in(config)
    except ConfigError as err:
        raise CheckpointError(f"{source}/config.json does not describe a model lmkit can build: {err}") from None
    except (TypeError, ValueError) as err:  # arithmetic on a value of the wrong type, e.g. "hidden_size": "32"
        raise CheckpointError(f"{source}/config.json has a value of the wrong type for a {model_type} model "
                              f"({err})") from None
    tokenizer = _read_tokenizer(source, config, hf.tokenizer_prompts)
    project.require_tokenizer(tokenizer.fingerprint, f"the model in {source}")
    if tokenizer.vocab_size > model_config.vocab_size:
        raise CheckpointError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model_config.vocab_size} embeddings")
    model = build_model(model_config)
    files = _weight_files(source)
    if hf.weights_in is None:  # lmkit's names: stream the tensors in, one at a time (one copy of the weights)
        stored, unexpected = set(), set()
        for file in files:
            found, _, extra = checkpoint.load_weights(model, file)
            stored |= found
            unexpected |= set(extra)
        missing = sorted(set(model.state_dict()) - stored)
    else:
        try:
            missing, unexpected = model.load_state_dict(hf.weights_in(_read_weights(files)), strict=False)
        except RuntimeError as err:  # "size mismatch for ...": the weights are not the shapes config.json gives
            detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
            raise CheckpointError(f"{source}: the weights do not match config.json ({detail})") from None
    allowed = hf.may_lack(config)
    if unexpected or not set(missing) <= allowed:
        raise CheckpointError(f"{source}: the weights do not match the config (missing "
                              f"{sorted(set(missing) - allowed)[:3]}, unexpected {sorted(unexpected)[:3]})")
    run = f"hf-{source.resolve().name}"
    path = project.checkpoint_dir(run, 0)
    cfg = RunConfig(preset="imported", model=model_config)
    # Parts that a checkpoint lacks (BERT's pooler and NSP head in a masked-LM one) keep their fresh
    # init; a tied output layer is not missing, it is the embedding.
    tied = {"lm_head.weight"} if model_config.tie_embeddings else set()
    fresh = sorted(set(missing) - tied)
    checkpoint.save(path, model=model, config=cfg, tokenizer=tokenizer, run=run, step=0,
                    extra={"imported": {"from": str(source.resolve()), "model_type": model_type,
                                        "architectures": architectures, "initialised": fresh,
                                        "config": dict(config)}})
    checkpoint.set_latest(project, path)
    return path


class _ConfigFields(dict):  # type: ignore[type-arg]
    """A Hugging Face config.json whose missing or null required keys are user errors naming the
    key and the file (the architectures' config_in read required keys as config[key])."""

    def __init__(self, data: dict[str, Any], path: Path) -> None:
        super().__init__(data)
        self.path = path

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise CheckpointError(f"{self.path} lacks {key!r}, which a {self.get('model_type')} model needs")
        value = super().__getitem__(key)
        if value is None:
            raise CheckpointError(f"{self.path} has {key!r}: null, which a {self.get('model_type')} model needs")
        return value


def _architectures(config: dict[str, Any]) -> list[str]:
    """config.json's "architectures" as a list of class names (a lone string is one name)."""
    value = config.get("architectures")
    names = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [name for name in names if isinstance(name, str)]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} is not {what} (no {path.name})") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _read_optional_json(path: Path) -> dict[str, Any]:
    """A JSON object a Hub directory may have (tokenizer and generation settings); {} when absent."""
    return _read_json(path, "a Hugging Face model directory") if path.is_file() else {}


def _weight_files(source: Path) -> list[Path]:
    """model.safetensors, or the shards its index names. Pickled weights (pytorch_model.bin) are
    refused: loading a pickle can run arbitrary code."""
    files = [source / "model.safetensors"]
    index = source / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "a sharded model").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map object (tensor name -> shard file)")
        for name in weight_map.values():  # checked before set(): a list there is unhashable
            if not isinstance(name, str) or Path(name).name != name or not (source / name).is_file():
                raise CheckpointError(f"{index} names the shard {name!r}, which is not a file in {source}")
        names = set(weight_map.values())
        files = [source / name for name in sorted(names)]
    if not files[0].is_file():
        if any(source.glob("pytorch_model*.bin")):
            raise CheckpointError(f"{source} holds pickled weights (pytorch_model.bin), which lmkit does not load; "
                                  "save them as safetensors first (transformers: model.save_pretrained(DIR))")
        raise CheckpointError(f"{source} has no model.safetensors")
    return files


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of FILES, floating point ones as fp32."""
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {file}: {err}") from None
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in weights.items()}


def _read_tokenizer(source: Path, config: dict[str, Any], tokenizer_prompts: bool) -> HFTokenizer:
    """tokenizer.json with the special tokens of tokenizer_config.json / special_tokens_map.json.

    TOKENIZER_PROMPTS (Llama-family models): prompts are encoded as AutoTokenizer encodes them, with
    the special tokens its post-processor adds, and that post-processor is the one transformers
    uses: tokenizer.json's, unless tokenizer_config.json sets add_bos_token / add_eos_token or
    there is none (then BOS / EOS as those say, default none). Generation stops at the model's
    eos_token_id (generation_config.json's, else config.json's; one or a list). The chat template
    (tokenizer_config.json's chat_template, or chat_template.jinja) is kept.
    """
    path = source / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{source} has no tokenizer.json (a 'fast' tokenizer file); save the tokenizer with "
                              "transformers' AutoTokenizer.save_pretrained first")
    settings = _read_optional_json(source / "tokenizer_config.json")
    named = {**_read_optional_json(source / "special_tokens_map.json"), **settings}
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception on a bad file
        raise CheckpointError(f"{path} is not a readable tokenizer ({err})") from None
    special, tokens = {}, {}
    for role, key in _SPECIAL_KEYS.items():
        token = named.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and backend.token_to_id(token) is not None:
            special[role], tokens[role] = backend.token_to_id(token), token
    json_bytes = path.read_bytes()
    if not tokenizer_prompts:
        return HFTokenizer(json_bytes, special, source=path)
    if {"add_bos_token", "add_eos_token"} & set(settings) or backend.post_processor is None:
        backend.post_processor = _template(settings, tokens, special)
        json_bytes = backend.to_str().encode("utf-8")
    generation = _read_optional_json(source / "generation_config.json")
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    stop_ids = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    template = settings.get("chat_template")
    if (source / "chat_template.jinja").is_file():
        template = (source / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return HFTokenizer(json_bytes, special, source=path, prompts="tokenizer", stop_ids=stop_ids,
                       chat_template=template if isinstance(template, str) else None)


def _template(settings: dict[str, Any], tokens: dict[str, str], ids: dict[str, int]) -> Any:
    """The post-processor transformers builds from add_bos_token / add_eos_token (both default off)."""
    from tokenizers import processors

    bos = settings.get("add_bos_token", False) and "bos" in tokens
    eos = settings.get("add_eos_token", False) and "eos" in tokens
    single = f"{tokens['bos'] + ':0 ' if bos else ''}$A:0{' ' + tokens['eos'] + ':0' if eos else ''}"
    pair = f"{single}{' ' + tokens['bos'] + ':1' if bos else ''} $B:1{' ' + tokens['eos'] + ':1' if eos else ''}"
    special = ([(tokens["bos"], ids["bos"])] if bos else []) + ([(tokens["eos"], ids["eos"])] if eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


# --- export -------------------------------------------------------------------------------------

def is_model_dir(path: Path) -> bool:
    """Whether PATH looks like an earlier export: a Hugging Face model directory (config.json,
    model.safetensors, no folders inside) that is not an lmkit checkpoint."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() and \
        not checkpoint.is_checkpoint_dir(path) and not any(p.is_dir() for p in path.iterdir())


def export_hf(ckpt_path: Path, out: Path, force: bool = False) -> Path:
    """Write the lmkit checkpoint CKPT_PATH as a Hugging Face model directory OUT, as its
    architecture's mapping says (a GPT as GPT2LMHeadModel, a BERT as BertForMaskedLM, a BERT
    classifier as BertForSequenceClassification), with its tokenizer. OUT must be new or empty, or
    with FORCE an earlier export (is_model_dir) to overwrite; never an lmkit checkpoint, a project or
    a folder inside a project's own (project.project_holding).

    Raises:
        CheckpointError: a checkpoint kind that has no transformers counterpart here.
        LmkitError: OUT cannot be written (see fileio.check_target_dir).
    """
    if checkpoint.is_checkpoint_dir(out):
        raise LmkitError(f"{out} is an lmkit checkpoint, which export never replaces (--force replaces only an "
                         "earlier export); give a new folder")
    owner = project_holding(out)
    if owner is not None:
        where = "is the project" if owner.root == out.resolve() else "lies in the lmkit-managed folders of the project"
        raise LmkitError(f"{out} {where} {owner.root}, which export never writes into; give a folder outside them")
    check_target_dir(out, "model directory", is_model_dir, force)
    ckpt = checkpoint.Checkpoint(ckpt_path)
    if ckpt.meta.get("weights") == "adapters":
        raise CheckpointError(f"{ckpt.path} holds LoRA adapters; merge them first (lmkit merge)")
    cfg = ckpt.config.model
    hf = ARCHS[cfg.arch].hf
    if hf is None:
        raise CheckpointError(f"{ckpt.path} is a {cfg.arch} checkpoint, which has no Hugging Face counterpart here")
    imported = ckpt.meta.get("imported", {}).get("config", {})
    config, weights = hf.export(cfg, ckpt.model().state_dict(), ckpt.labels, imported)
    tokenizer = ckpt.tokenizer()
    with atomic_dir(out) as tmp:  # a full disk or Ctrl-C midway leaves no half-written model directory
        _write_hf_dir(tmp, hf, ckpt, tokenizer, config, weights)
    return out


def _write_hf_dir(out: Path, hf: Any, ckpt: checkpoint.Checkpoint, tokenizer: Tokenizer | HFTokenizer,
                  config: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """The files of a Hugging Face model directory (HF: the architecture's mapping), into the empty
    folder OUT."""
    cfg = ckpt.config.model
    save_tensors({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
    for key, value in hf.special_ids(tokenizer).items():
        config.setdefault(key, value)  # an imported model's own ids stay
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    template = {"chat_template": tokenizer.chat_template} if tokenizer.chat_template else {}
    if isinstance(tokenizer, HFTokenizer):
        (out / "tokenizer.json").write_bytes(tokenizer.model_bytes)
        tokens = {_SPECIAL_KEYS[role]: tokenizer.backend.id_to_token(i) for role, i in tokenizer.special.items()}
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": hf.tokenizer_class, "model_max_length": cfg.max_seq_len, **tokens, **template},
            indent=2) + "\n", encoding="utf-8")
    elif ckpt.config.tokenizer.model_type in ("bpe", "unigram"):
        (out / "tokenizer.json").write_bytes(sentencepiece_to_hf(tokenizer, ckpt.config.tokenizer.model_type))
        tokens = {_SPECIAL_KEYS[role]: piece for role, piece in SPECIAL_PIECES.items()}
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len, **tokens, **template},
            indent=2) + "\n", encoding="utf-8")
    else:  # char and word models: the sentencepiece file travels as is
        (out / "tokenizer.model").write_bytes(tokenizer.model_bytes)


def sentencepiece_to_hf(tokenizer: Tokenizer, model_type: str) -> bytes:
    """lmkit's sentencepiece BPE or unigram model as a `tokenizers` tokenizer.json that encodes
    the same ids: the same pieces and scores (BPE merges ranked by the merged piece's score, as
    sentencepiece applies them), spaces as U+2581, digits one by one, a new piece at every
    whitespace run, newlines as the byte piece <0x0A> (byte fallback), no added prefix, the special
    tokens (chat markers included) as special added tokens. Identical on the whole sample corpus and
    mixed-script text (tested), and to encode_with_special_tokens on rendered chats. Two texts
    differ: a literal U+2581 (lmkit spells it as bytes; here it reads as a space), and special-token
    strings such as "<s>" typed in a text (transformers matches them as the special tokens;
    lmkit's encode never does)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    sp = tokenizer.sp
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    if model_type == "unigram":
        model = models.Unigram(pieces, unk_id=tokenizer.unk_id, byte_fallback=True)
    else:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        ranked = []  # (merged piece's score, left id, right id, left, right): every way to build a piece
        for i, (piece, score) in enumerate(pieces):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
                continue
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                if left in vocab and right in vocab:
                    ranked.append((-score, vocab[left], vocab[right], left, right))
        merges = [(left, right) for *_, left, right in sorted(ranked)]
        model = models.BPE(vocab=vocab, merges=merges, unk_token=pieces[tokenizer.unk_id][0], fuse_unk=True,
                           byte_fallback=True)
    backend = Backend(model)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), "isolated"), pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Split(Regex("\u2581+"), "merged_with_next")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                                for i in tokenizer.special_ids])
    return backend.to_str().encode("utf-8")


def describe(path: Path) -> dict[str, Any]:
    """What `lmkit import` reports about the checkpoint it wrote."""
    ckpt = checkpoint.Checkpoint(path)
    return {"checkpoint": str(path), "arch": ckpt.config.model.arch, "parameters": ckpt.meta["parameters"],
            "vocab_size": ckpt.meta["tokenizer"]["vocab_size"], **ckpt.meta["imported"],
            "model": ckpt.config.model.to_dict()}
