"""LoRA adapters: frozen base, zero start, exact merge."""

from __future__ import annotations

import copy

import pytest
import torch

from lmkit import lora
from lmkit.config import LoraConfig, ModelConfig
from lmkit.models import build_model
from lmkit.models.heads import SequenceClassifier


@pytest.fixture(params=["gpt", "bert"])
def classifier(request) -> SequenceClassifier:
    cfg = ModelConfig(arch=request.param, vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=16)
    return SequenceClassifier(build_model(cfg), 3)


def batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (4, 12), generator=g)
    pad = torch.ones(4, 12, dtype=torch.bool)
    pad[1, 8:] = False
    return ids, torch.zeros_like(ids), pad, torch.tensor([0, 1, 2, 1])


def train_a_little(model: torch.nn.Module, steps: int = 5) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        _, loss = model(*batch(step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("targets", ["attn", "mlp", "all"])
def test_only_adapters_and_the_head_train_and_the_base_stays_bit_identical(classifier, targets) -> None:
    frozen = {name: p.clone() for name, p in classifier.backbone.named_parameters()}
    lora.add_adapters(classifier, LoraConfig(rank=4, alpha=8, targets=targets))
    trainable = {name for name, p in classifier.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name or name.startswith("head.") for name in trainable)
    assert any(".lora_" in name for name in trainable)
    train_a_little(classifier)
    after = {name.replace(".base.", "."): p for name, p in classifier.backbone.named_parameters()
             if ".lora_" not in name}
    assert after.keys() == frozen.keys()
    assert all(torch.equal(after[name], frozen[name]) for name in frozen)


def test_adapters_start_as_a_no_op(classifier) -> None:
    classifier.eval()
    before, _ = classifier(*batch())
    lora.add_adapters(classifier, LoraConfig(rank=4, targets="all"))
    after, _ = classifier(*batch())
    assert torch.equal(before, after)


def test_a_merged_model_gives_the_logits_of_base_plus_adapters(classifier) -> None:
    classifier.eval()
    base_logits, _ = classifier(*batch(9))
    lora.add_adapters(classifier, LoraConfig(rank=4, alpha=16, targets="all"))
    train_a_little(classifier)
    with_adapters, _ = classifier(*batch(9))
    merged = lora.merge_adapters(copy.deepcopy(classifier))
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    merged_logits, _ = merged(*batch(9))
    assert not torch.allclose(with_adapters, base_logits)  # training moved the outputs
    torch.testing.assert_close(merged_logits, with_adapters, rtol=1e-5, atol=1e-5)


def test_llama_adapters_cover_attention_and_the_gated_mlp() -> None:
    model = build_model(ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                                    d_ff=48, max_seq_len=16, bias=False, activation="silu"))
    lora.add_adapters(model, LoraConfig(rank=2, targets="all"))
    wrapped = sorted(name for name, module in model.named_modules() if isinstance(module, lora.LoRALinear))
    assert len(wrapped) == 2 * 7 and "model.layers.1.mlp.gate_proj" in wrapped
    assert "model.layers.0.self_attn.k_proj" in wrapped and "lm_head" not in wrapped
