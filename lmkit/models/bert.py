"""BERT: a bidirectional Transformer encoder pretrained with masked-LM and next-sentence prediction.

Post-LayerNorm blocks; token + position + token-type (segment) embeddings; a tanh pooler on the
first ([CLS]) position; an MLM head (dense, GELU, LayerNorm, then the token embeddings transposed,
plus a bias) and an NSP head on the pooled state. The structure is BERT-base's, parameter for
parameter (BERT's separate query/key/value weights are one fused c_attn here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmkit import data, objectives
from lmkit.batches import IGNORE, ClassifyBatch, MaskedLMBatch
from lmkit.config import ModelConfig, RunConfig
from lmkit.errors import CheckpointError
from lmkit.finetune_data import PairLayout
from lmkit.models import flops
from lmkit.models.arch import Arch, Distillation, HFMapping, Pretraining, Scored, require_options
from lmkit.models.layers import MLP, Attention, init_weights, mean_over_tokens, run_block
from lmkit.tokenizer import Tokenizer

N_SEGMENTS = 2  # token types: sentence A and sentence B


@dataclass
class BertLogits:
    mlm: torch.Tensor  # (N, V) at the N positions with an MLM label, or (B, T, V) without labels
    nsp: torch.Tensor  # (B, 2): [is next, is random]


class Block(nn.Module):
    """x -> ln_1(x + attn(x)) -> ln_2(x + mlp(x)); (B, T, C) in and out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg.d_model, cfg.n_head, causal=False, dropout=cfg.dropout, bias=cfg.bias)
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg.d_model, cfg.ff_dim, activation=cfg.activation, dropout=cfg.dropout, bias=cfg.bias)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x, pad_mask=pad_mask))
        return self.ln_2(x + self.mlp(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.token_type = nn.Embedding(N_SEGMENTS, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor, token_types: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
        x = self.word(idx) + self.position(pos) + self.token_type(token_types)  # (B, T, C)
        return self.dropout(self.ln(x))


class BERT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.grad_checkpoint = False  # set by the training loop from train.grad_checkpoint
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlm_dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlm_ln = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.nsp_head = nn.Linear(cfg.d_model, 2)
        init_weights(self, cfg.n_layer, scale_residual=False)

    def hidden_states(self, idx: torch.Tensor, token_types: torch.Tensor | None = None,
                      pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final states (B, T, C) for ids IDX (B, T); TOKEN_TYPES (B, T) are 0 for sentence A and 1
        for B; PAD_MASK (B, T) is True at real tokens."""
        if idx.size(1) > self.config.max_seq_len:
            raise ValueError(f"sequence of {idx.size(1)} tokens exceeds max_seq_len={self.config.max_seq_len}")
        x = self.embeddings(idx, torch.zeros_like(idx) if token_types is None else token_types)
        for block in self.layers:
            x = run_block(block, self.grad_checkpoint and self.training, x, pad_mask)
        return x

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., V), the output layer sharing the input embeddings' weights."""
        h = self.mlm_ln(F.gelu(self.mlm_dense(hidden)))
        return F.linear(h, self.embeddings.word.weight, self.mlm_bias)

    def nsp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, 2) from the pooled [CLS] state."""
        return self.nsp_head(torch.tanh(self.pooler(hidden[:, 0])))

    def forward(self, idx: torch.Tensor, token_types: torch.Tensor | None = None,
                pad_mask: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None,
                nsp_labels: torch.Tensor | None = None) -> tuple[BertLogits, torch.Tensor | None]:
        """MLM and NSP logits, and with labels the loss MLM + NSP (each a mean cross-entropy).

        With MLM_LABELS (B, T) (objectives.IGNORE where nothing is predicted), MLM logits are
        computed only at the labelled positions, (N, V): the vocabulary projection is the costliest
        layer and 85% of positions would be thrown away.
        """
        hidden = self.hidden_states(idx, token_types, pad_mask)
        nsp = self.nsp_logits(hidden)
        if mlm_labels is None:
            return BertLogits(self.mlm_logits(hidden), nsp), None
        chosen = mlm_labels != objectives.IGNORE  # (B, T)
        logits = BertLogits(self.mlm_logits(hidden[chosen]), nsp)  # (N, V)
        loss = objectives.classification_loss(logits.mlm, mlm_labels[chosen])
        if nsp_labels is not None:
            loss = loss + objectives.classification_loss(nsp, nsp_labels)
        return logits, loss

    def sequence_summary(self, idx: torch.Tensor, token_types: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, C): the state a classifier reads, the pooled [CLS] state (through the
        pretrained pooler), or with config.pooling "mean" the mean over the real tokens."""
        hidden = self.hidden_states(idx, token_types, pad_mask)  # (B, T, C)
        if self.config.pooling == "mean":
            return mean_over_tokens(hidden, pad_mask)
        return torch.tanh(self.pooler(hidden[:, 0]))


def pretraining(cfg: RunConfig, train: np.ndarray, val: np.ndarray, tokenizer: Tokenizer) -> Pretraining:
    """Masked-LM + next-sentence prediction on sentence pairs; the validation pairs and masks are
    drawn once, from a generator of their own."""
    tcfg, seq_len = cfg.train, cfg.model.max_seq_len
    batches = data.BertPairs(train, seq_len, tcfg.batch_size, tcfg.seed, tokenizer, cfg.data.mask_prob)
    val_batches = data.BertPairs(val, seq_len, tcfg.batch_size, tcfg.seed + 1, tokenizer,
                                 cfg.data.mask_prob).fixed_batches(tcfg.eval_batches)
    return Pretraining(batches, val_batches, objectives.mlm_nsp_loss, objectives.mlm_nsp_metrics,
                       tcfg.batch_size * seq_len)


def scored(model: BERT, batch: MaskedLMBatch) -> Scored:
    """MLM logits at the masked positions; hidden states of every real token (DistilBERT's cosine loss)."""
    hidden = model.hidden_states(batch.ids, batch.token_types, batch.pad_mask)
    chosen = batch.mlm_labels != IGNORE
    return Scored(model.mlm_logits(hidden[chosen]), batch.mlm_labels[chosen], hidden[batch.pad_mask])


def train_flops(cfg: ModelConfig, batch: MaskedLMBatch | ClassifyBatch) -> float:
    """The encoder over each row's real tokens; the MLM head (dense, then the vocabulary) at the
    masked positions only, as BERT.forward computes it, and the pooler and NSP head once per pair;
    a classifier reads the pooled [CLS] state (pooling "mean": no pooler). The position and segment
    tables are looked up, not multiplied."""
    d = cfg.d_model
    lengths = batch.pad_mask.sum(dim=1)
    forward = flops.stack(cfg.n_layer, lengths, 4 * d * d + 2 * d * cfg.ff_dim, d)
    if isinstance(batch, MaskedLMBatch):
        masked = int((batch.mlm_labels != IGNORE).sum())
        forward += flops.matmul(masked, d * d + d * cfg.vocab_size) + flops.matmul(len(lengths), d * d + d * 2)
    elif cfg.pooling != "mean":
        forward += flops.matmul(len(lengths), d * d)
    return flops.TRAINING * forward


# --- Hugging Face BERT --------------------------------------------------------------------------
# lmkit's BERT is BERT's structure with the query, key and value projections fused into one c_attn.

_BERT_LAYER = {"attention.output.dense": "attn.c_proj", "attention.output.LayerNorm": "ln_1",
               "intermediate.dense": "mlp.c_fc", "output.dense": "mlp.c_proj", "output.LayerNorm": "ln_2"}
_BERT_TOP = {"embeddings.word_embeddings": "embeddings.word", "embeddings.position_embeddings": "embeddings.position",
             "embeddings.token_type_embeddings": "embeddings.token_type", "embeddings.LayerNorm": "embeddings.ln",
             "pooler.dense": "pooler"}
_BERT_HEADS = {"cls.predictions.transform.dense": "mlm_dense", "cls.predictions.transform.LayerNorm": "mlm_ln",
               "cls.seq_relationship": "nsp_head"}


def config_from_hf(config: dict[str, Any]) -> ModelConfig:
    require_options(config, {"position_embedding_type": "absolute", "type_vocab_size": 2, "is_decoder": False,
                             "add_cross_attention": False, "tie_word_embeddings": True})
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"BERT hidden_act {config.get('hidden_act')!r} is not supported (only gelu)")
    return ModelConfig(arch="bert", vocab_size=config["vocab_size"], d_model=config["hidden_size"],
                       n_layer=config["num_hidden_layers"], n_head=config["num_attention_heads"],
                       d_ff=config["intermediate_size"], max_seq_len=config["max_position_embeddings"],
                       dropout=float(config.get("hidden_dropout_prob", 0.1)), activation="gelu",
                       norm_eps=float(config.get("layer_norm_eps", 1e-12)))


def weights_from_hf(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def export_hf(cfg: ModelConfig, state: dict[str, torch.Tensor], labels: list[str],
              imported: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A BERT language model as BertForMaskedLM, a BERT classifier as BertForSequenceClassification."""
    config = {"model_type": "bert", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
              "intermediate_size": cfg.ff_dim, "hidden_act": "gelu", "max_position_embeddings": cfg.max_seq_len,
              "type_vocab_size": 2, "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
              "layer_norm_eps": cfg.norm_eps, "position_embedding_type": "absolute", "tie_word_embeddings": True}
    if not labels:  # a language model
        return {"architectures": ["BertForMaskedLM"], **config}, _weights_to_hf(state, heads=True)
    if cfg.pooling != "auto":
        raise CheckpointError(f"BertForSequenceClassification reads the pooled [CLS] state; this classifier "
                              f"reads model.pooling={cfg.pooling!r}, so it has no transformers counterpart")
    config.update(architectures=["BertForSequenceClassification"], id2label=dict(enumerate(labels)),
                  label2id={label: i for i, label in enumerate(labels)})
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    weights = _weights_to_hf(backbone, heads=False)
    weights.update({"classifier.weight": state["head.weight"], "classifier.bias": state["head.bias"]})
    return config, weights


def _weights_to_hf(state: dict[str, torch.Tensor], heads: bool) -> dict[str, torch.Tensor]:
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


ARCH = Arch(
    name="bert",
    summary="BERT: bidirectional encoder, masked LM + next-sentence prediction",
    model=BERT,
    objectives=("masked-lm", "next-sentence"),
    pretraining=pretraining,
    # DistilBERT's 5 : 2 : 1 (soft MLM, hard MLM, cosine on the hidden states)
    distillation=Distillation(scored, {"soft_weight": 5.0, "hard_weight": 2.0, "cosine_weight": 1.0},
                              "val_mlm_accuracy"),
    tasks=("classify", "lm"),  # lm: more masked-LM pretraining on new text
    decoding="fill-mask",
    evaluation="masked-text",
    train_flops=train_flops,
    pair_layout=lambda tok: PairLayout([tok.cls_id], [tok.sep_id], [tok.sep_id]),
    lora_targets={"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")},
    hf=HFMapping(model_types=("bert",), config_in=config_from_hf, weights_in=weights_from_hf,
                 may_lack=lambda config: {"pooler.weight", "pooler.bias", "nsp_head.weight", "nsp_head.bias"},
                 export=export_hf, special_ids=lambda tok: {"pad_token_id": tok.pad_id},
                 tokenizer_class="BertTokenizerFast"),
)
