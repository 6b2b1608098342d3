"""Hugging Face interop: GPT-2 and BERT checkpoints in (`lmkit import`) and back out (`lmkit export`).

A Hub-format directory is config.json + model.safetensors (or shards with an index) + the
tokenizer (tokenizer.json and its special tokens). lmkit's GPT is GPT-2 name for name, except
that GPT-2 stores its projections as Conv1D, (in, out), where lmkit has nn.Linear, (out, in); lmkit's
BERT is BERT's structure with the query, key and value projections fused into one c_attn. Only
safetensors, tokenizers and json are needed here; transformers is not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmkit import checkpoint
from lmkit.config import ModelConfig, RunConfig
from lmkit.errors import CheckpointError
from lmkit.models import build_model
from lmkit.project import Project
from lmkit.tokenizer import SPECIAL_PIECES, HFTokenizer, Tokenizer

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPT-2 activations lmkit has: gelu_new and gelu_pytorch_tanh are the tanh approximation.
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_SPECIAL_KEYS = {"pad": "pad_token", "unk": "unk_token", "bos": "bos_token", "eos": "eos_token",
                 "cls": "cls_token", "sep": "sep_token", "mask": "mask_token"}
# BERT's per-layer names -> lmkit's (query/key/value are fused separately).
_BERT_LAYER = {"attention.output.dense": "attn.c_proj", "attention.output.LayerNorm": "ln_1",
               "intermediate.dense": "mlp.c_fc", "output.dense": "mlp.c_proj", "output.LayerNorm": "ln_2"}
_BERT_TOP = {"embeddings.word_embeddings": "embeddings.word", "embeddings.position_embeddings": "embeddings.position",
             "embeddings.token_type_embeddings": "embeddings.token_type", "embeddings.LayerNorm": "embeddings.ln",
             "pooler.dense": "pooler"}
_BERT_HEADS = {"cls.predictions.transform.dense": "mlm_dense", "cls.predictions.transform.LayerNorm": "mlm_ln",
               "cls.seq_relationship": "nsp_head"}


# --- import -------------------------------------------------------------------------------------

def import_hf(source: Path, project: Project) -> Path:
    """Convert the Hugging Face model directory SOURCE (GPT-2 or BERT) into an lmkit checkpoint
    in PROJECT (run "hf-<name>", step 0) and make it the project's latest; returns its folder.

    Raises:
        CheckpointError: not a model directory, pickled weights only, an architecture or config
            option lmkit does not have, or weights that do not match the config.
    """
    config = _read_json(source / "config.json", "a Hugging Face model directory")
    model_type = config.get("model_type")
    if model_type == "gpt2":
        model_config, weights = _gpt2_config(config), _gpt2_weights_in(_read_weights(source))
    elif model_type == "bert":
        model_config, weights = _bert_config(config), _bert_weights_in(_read_weights(source))
    else:
        raise CheckpointError(f"{source}: model_type {model_type!r} ({', '.join(config.get('architectures') or [])})"
                              " is not supported; lmkit imports gpt2 and bert")
    tokenizer = _read_tokenizer(source)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise CheckpointError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model_config.vocab_size} embeddings")
    model = build_model(model_config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    allowed = {"lm_head.weight"} | ({"pooler.weight", "pooler.bias", "nsp_head.weight", "nsp_head.bias"}
                                    if model_type == "bert" else set())
    if unexpected or not set(missing) <= allowed:
        raise CheckpointError(f"{source}: the weights do not match the config (missing "
                              f"{sorted(set(missing) - allowed)[:3]}, unexpected {sorted(unexpected)[:3]})")
    run = f"hf-{source.resolve().name}"
    path = project.checkpoint_dir(run, 0)
    cfg = RunConfig(preset="imported", model=model_config)
    # Parts of lmkit's BERT that a masked-LM checkpoint lacks (pooler, NSP head) keep their fresh init.
    fresh = sorted(set(missing) - {"lm_head.weight"})
    checkpoint.save(path, model=model, config=cfg, tokenizer=tokenizer, run=run, step=0,
                    extra={"imported": {"from": str(source.resolve()), "model_type": model_type,
                                        "architectures": config.get("architectures"), "initialised": fresh}})
    checkpoint.set_latest(project, path)
    return path


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


def _read_weights(source: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards its index names. Pickled weights
    (pytorch_model.bin) are refused: loading a pickle can run arbitrary code."""
    files = [source / "model.safetensors"]
    index = source / "model.safetensors.index.json"
    if index.is_file():
        files = [source / name for name in sorted(set(_read_json(index, "a sharded model")["weight_map"].values()))]
    if not files[0].is_file():
        if any(source.glob("pytorch_model*.bin")):
            raise CheckpointError(f"{source} holds pickled weights (pytorch_model.bin), which lmkit does not load; "
                                  "save them as safetensors first (transformers: model.save_pretrained(DIR))")
        raise CheckpointError(f"{source} has no model.safetensors")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {file}: {err}") from None
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in weights.items()}


def _read_tokenizer(source: Path) -> HFTokenizer:
    """tokenizer.json with the special tokens of tokenizer_config.json / special_tokens_map.json."""
    path = source / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{source} has no tokenizer.json (a 'fast' tokenizer file); save the tokenizer with "
                              "transformers' AutoTokenizer.save_pretrained first")
    named: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (source / name).is_file():
            named.update(_read_json(source / name, "a tokenizer directory"))
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception on a bad file
        raise CheckpointError(f"{path} is not a readable tokenizer ({err})") from None
    special = {}
    for role, key in _SPECIAL_KEYS.items():
        token = named.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and backend.token_to_id(token) is not None:
            special[role] = backend.token_to_id(token)
    return HFTokenizer(path.read_bytes(), special, source=path)


def _gpt2_config(config: dict[str, Any]) -> ModelConfig:
    _unsupported(config, {"scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
                          "tie_word_embeddings": True})
    activation = config.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS:
        raise CheckpointError(f"GPT-2 activation_function {activation!r} is not supported ({', '.join(_ACTIVATIONS)})")
    n_embd = config["n_embd"]
    return ModelConfig(arch="gpt", vocab_size=config["vocab_size"], d_model=n_embd, n_layer=config["n_layer"],
                       n_head=config["n_head"], d_ff=config.get("n_inner") or 4 * n_embd,
                       max_seq_len=config["n_positions"], dropout=float(config.get("resid_pdrop", 0.0)),
                       activation=_ACTIVATIONS[activation], norm_eps=float(config.get("layer_norm_epsilon", 1e-5)))


def _bert_config(config: dict[str, Any]) -> ModelConfig:
    _unsupported(config, {"position_embedding_type": "absolute", "type_vocab_size": 2, "is_decoder": False,
                          "add_cross_attention": False, "tie_word_embeddings": True})
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"BERT hidden_act {config.get('hidden_act')!r} is not supported (only gelu)")
    return ModelConfig(arch="bert", vocab_size=config["vocab_size"], d_model=config["hidden_size"],
                       n_layer=config["num_hidden_layers"], n_head=config["num_attention_heads"],
                       d_ff=config["intermediate_size"], max_seq_len=config["max_position_embeddings"],
                       dropout=float(config.get("hidden_dropout_prob", 0.1)), activation="gelu",
                       norm_eps=float(config.get("layer_norm_eps", 1e-12)))


def _unsupported(config: dict[str, Any], required: dict[str, Any]) -> None:
    wrong = [f"{key}={config[key]!r} (lmkit has {value!r})" for key, value in required.items()
             if key in config and config[key] != value]
    if wrong:
        raise CheckpointError(f"unsupported config options: {', '.join(wrong)}")


def _gpt2_weights_in(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 (GPT2LMHeadModel, or GPT2Model without the 'transformer.' prefix) -> lmkit's GPT."""
    out = {}
    for name, tensor in hf.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        ours = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        out[ours] = tensor.t().contiguous() if ours.endswith(_CONV1D) else tensor
    return out


def _bert_weights_in(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BERT (BertForPreTraining / BertForMaskedLM / BertModel) -> lmkit's BERT."""
    out, qkv = {}, {}
    for name, tensor in hf.items():
        bare = name.removeprefix("bert.")
        stem, _, kind = bare.rpartition(".")  # kind: weight / bias
        if stem.startswith("encoder.layer."):
            layer, _, part = stem.removeprefix("encoder.layer.").partition(".")
            if part.startswith("attention.self."):
                qkv.setdefault((layer, kind), {})[part.removeprefix("attention.self.")] = tensor
            elif part in _BERT_LAYER:
                out[f"layers.{layer}.{_BERT_LAYER[part]}.{kind}"] = tensor
        elif stem in _BERT_TOP:
            out[f"{_BERT_TOP[stem]}.{kind}"] = tensor
        elif stem in _BERT_HEADS:
            out[f"{_BERT_HEADS[stem]}.{kind}"] = tensor
        elif bare in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
            out["mlm_bias"] = tensor
    for (layer, kind), parts in qkv.items():
        out[f"layers.{layer}.attn.c_attn.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


# --- export -------------------------------------------------------------------------------------

def export_hf(ckpt_path: Path, out: Path) -> Path:
    """Write the lmkit checkpoint CKPT_PATH as a Hugging Face model directory OUT: a GPT as
    GPT2LMHeadModel, a BERT as BertForMaskedLM, a BERT classifier as BertForSequenceClassification,
    with the tokenizer when it is a Hugging Face one (imported).

    Raises:
        CheckpointError: a checkpoint kind that has no transformers counterpart here.
    """
    ckpt = checkpoint.Checkpoint(ckpt_path)
    if ckpt.meta.get("weights") == "adapters":
        raise CheckpointError(f"{ckpt.path} holds LoRA adapters; merge them first (lmkit merge)")
    cfg, state = ckpt.config.model, ckpt.model().state_dict()
    if cfg.arch == "gpt" and ckpt.task == "lm":
        config, weights = _gpt2_config_out(cfg), _gpt2_weights_out(state)
    elif cfg.arch == "bert" and ckpt.task == "lm":
        config, weights = _bert_config_out(cfg, "BertForMaskedLM"), _bert_weights_out(state, heads=True)
    elif cfg.arch == "bert" and ckpt.task == "classify":
        config = _bert_config_out(cfg, "BertForSequenceClassification")
        labels = ckpt.labels
        config.update(id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
        backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        weights = _bert_weights_out(backbone, heads=False)
        weights.update({"classifier.weight": state["head.weight"], "classifier.bias": state["head.bias"]})
    else:
        raise CheckpointError(f"{ckpt.path} is a {cfg.arch} checkpoint for task {ckpt.task!r}; lmkit exports GPT "
                              "language models and BERT masked-LM models and classifiers")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
    tokenizer = ckpt.tokenizer()
    config.update(_special_ids(tokenizer, cfg.arch))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if isinstance(tokenizer, HFTokenizer):
        (out / "tokenizer.json").write_bytes(tokenizer.model_bytes)
        tokens = {_SPECIAL_KEYS[role]: tokenizer.backend.id_to_token(i) for role, i in tokenizer.special.items()}
        tokenizer_class = "GPT2TokenizerFast" if cfg.arch == "gpt" else "BertTokenizerFast"
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": tokenizer_class, "model_max_length": cfg.max_seq_len, **tokens}, indent=2) + "\n",
            encoding="utf-8")
    elif ckpt.config.tokenizer.model_type in ("bpe", "unigram"):
        (out / "tokenizer.json").write_bytes(sentencepiece_to_hf(tokenizer, ckpt.config.tokenizer.model_type))
        tokens = {_SPECIAL_KEYS[role]: piece for role, piece in SPECIAL_PIECES.items()}
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len, **tokens},
            indent=2) + "\n", encoding="utf-8")
    else:  # char and word models: the sentencepiece file travels as is
        (out / "tokenizer.model").write_bytes(tokenizer.model_bytes)
    return out


def sentencepiece_to_hf(tokenizer: Tokenizer, model_type: str) -> bytes:
    """lmkit's sentencepiece BPE or unigram model as a `tokenizers` tokenizer.json that encodes
    the same ids: the same pieces and scores (BPE merges ranked by the merged piece's score, as
    sentencepiece applies them), spaces as U+2581, digits one by one, a new piece at every
    whitespace run, newlines as the byte piece <0x0A> (byte fallback), no added prefix. Identical
    on the whole sample corpus and mixed-script text (tested). Two texts differ: a literal U+2581
    (lmkit spells it as bytes; here it reads as a space), and special-token strings such as "<s>"
    typed in a text (transformers matches them as the special tokens; sentencepiece never does)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
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
    return backend.to_str().encode("utf-8")


def _special_ids(tokenizer: Any, arch: str) -> dict[str, int]:
    if arch == "gpt":
        return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    return {"pad_token_id": tokenizer.pad_id}


def _gpt2_config_out(cfg: ModelConfig) -> dict[str, Any]:
    activation = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.activation]
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.ff_dim, "activation_function": activation, "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": True}


def _bert_config_out(cfg: ModelConfig, architecture: str) -> dict[str, Any]:
    return {"architectures": [architecture], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "intermediate_size": cfg.ff_dim, "hidden_act": "gelu", "max_position_embeddings": cfg.max_seq_len,
            "type_vocab_size": 2, "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
            "layer_norm_eps": cfg.norm_eps, "position_embedding_type": "absolute", "tie_word_embeddings": True}


def _gpt2_weights_out(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.t() if name.endswith(_CONV1D) else tensor for name, tensor in state.items()
            if name != "lm_head.weight"}  # tied to transformer.wte.weight


def _bert_weights_out(state: dict[str, torch.Tensor], heads: bool) -> dict[str, torch.Tensor]:
    """lmkit's BERT -> BertForMaskedLM names (HEADS: with the MLM head; without it, with the
    pooler, as BertForSequenceClassification has)."""
    top = {ours: theirs for theirs, ours in _BERT_TOP.items()}
    layer_names = {ours: theirs for theirs, ours in _BERT_LAYER.items()}
    out = {}
    for name, tensor in state.items():
        stem, _, kind = name.rpartition(".")
        if stem in top and (stem != "pooler" or not heads):
            out[f"bert.{top[stem]}.{kind}"] = tensor
        elif stem.startswith("layers."):
            layer, _, part = stem.removeprefix("layers.").partition(".")
            prefix = f"bert.encoder.layer.{layer}."
            if part == "attn.c_attn":
                for which, chunk in zip(("query", "key", "value"), tensor.chunk(3)):
                    out[f"{prefix}attention.self.{which}.{kind}"] = chunk
            else:
                out[f"{prefix}{layer_names[part]}.{kind}"] = tensor
        elif heads and stem in ("mlm_dense", "mlm_ln"):
            out[f"cls.predictions.transform.{'dense' if stem == 'mlm_dense' else 'LayerNorm'}.{kind}"] = tensor
    if heads:
        out["cls.predictions.bias"] = state["mlm_bias"]
    return out


def describe(path: Path) -> dict[str, Any]:
    """What `lmkit import` reports about the checkpoint it wrote."""
    ckpt = checkpoint.Checkpoint(path)
    return {"checkpoint": str(path), "arch": ckpt.config.model.arch, "parameters": ckpt.meta["parameters"],
            "vocab_size": ckpt.meta["tokenizer"]["vocab_size"], **ckpt.meta["imported"],
            "model": dataclasses.asdict(ckpt.config.model)}
