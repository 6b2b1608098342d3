from __future__ import annotations

import dataclasses

import pytest
import torch

from lmkit.config import ModelConfig
from lmkit.models import build_model
from lmkit.objectives import IGNORE


@pytest.fixture
def bert_config(tiny_model_config: ModelConfig) -> ModelConfig:
    return dataclasses.replace(tiny_model_config, arch="bert", activation="gelu", norm_eps=1e-12)


def test_outputs_and_tied_mlm_head(bert_config) -> None:
    model = build_model(bert_config).eval()
    idx = torch.randint(7, 64, (2, 16))
    logits, loss = model(idx)
    assert logits.mlm.shape == (2, 16, 64) and logits.nsp.shape == (2, 2) and loss is None
    labels = torch.full((2, 16), IGNORE)
    labels[0, 3], labels[1, 5] = 11, 12
    logits, loss = model(idx, mlm_labels=labels, nsp_labels=torch.tensor([0, 1]))
    assert logits.mlm.shape == (2, 64)  # only the labelled positions
    assert loss is not None and loss.item() > 0
    assert "mlm_bias" in dict(model.named_parameters())
    assert not any("decoder" in name for name, _ in model.named_parameters())  # the output layer is the embedding


def test_attention_is_bidirectional(bert_config) -> None:
    model = build_model(bert_config).eval()
    idx = torch.randint(7, 64, (1, 16))
    later = idx.clone()
    later[0, 12] = (later[0, 12] + 1) % 57 + 7
    assert not torch.allclose(model.hidden_states(idx)[0, 2], model.hidden_states(later)[0, 2])


def test_padding_does_not_change_real_positions(bert_config) -> None:
    model = build_model(bert_config).eval()
    idx = torch.randint(7, 64, (1, 10))
    types = torch.tensor([[0] * 5 + [1] * 5])
    alone = model.hidden_states(idx, types)
    padded = torch.cat([idx, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    padded_types = torch.cat([types, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    pad_mask = padded != 0
    torch.testing.assert_close(model.hidden_states(padded, padded_types, pad_mask)[:, :10], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model.hidden_states(padded, padded_types)[:, :10], alone, atol=1e-5)  # unmasked pads leak
