from __future__ import annotations

import copy as copy_module
import dataclasses
import signal

import pytest
import torch
from safetensors import safe_open

from lmkit import train
from lmkit.config import ModelConfig, TrainConfig
from lmkit.errors import ConfigError
from lmkit.models import build_model
from lmkit.models.heads import SequenceClassifier
from lmkit.optim import MuonAndAdamW, make_optimizer
from lmkit.project import Project
from tests.conftest import tiny_run_config
from tests.test_train import fresh_copy, losses, signal_at

LLAMA = ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=48,
                    max_seq_len=16, bias=False, activation="silu")


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest() -> None:
    model = build_model(dataclasses.replace(LLAMA, tie_embeddings=False))
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(optimizer, MuonAndAdamW) and isinstance(optimizer.muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for group in optimizer.muon.param_groups for p in group["params"]}
    adamw = {names[id(p)] for group in optimizer.adamw.param_groups for p in group["params"]}
    assert "model.layers.0.self_attn.q_proj.weight" in muon and "model.layers.1.mlp.down_proj.weight" in muon
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= adamw
    assert not muon & adamw and len(muon | adamw) == len(names)
    assert len(optimizer.param_groups) == len(optimizer.adamw.param_groups) + len(optimizer.muon.param_groups)


def _muon_and_adamw_names(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"))
    names = {id(p): n for n, p in model.named_parameters()}
    return ({names[id(p)] for group in optimizer.muon.param_groups for p in group["params"]},
            {names[id(p)] for group in optimizer.adamw.param_groups for p in group["params"]})


def test_heads_of_every_kind_go_to_adamw() -> None:
    bert = ModelConfig(arch="bert", vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=16)
    muon, adamw = _muon_and_adamw_names(build_model(bert))
    assert {"nsp_head.weight", "pooler.weight", "mlm_dense.weight", "embeddings.word.weight"} <= adamw
    assert {"layers.0.attn.c_attn.weight", "layers.1.mlp.c_fc.weight"} <= muon
    assert all(name.startswith("layers.") for name in muon)
    gpt = ModelConfig(arch="gpt", vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=16, tie_embeddings=False)
    muon, adamw = _muon_and_adamw_names(SequenceClassifier(build_model(gpt), 3))
    assert {"head.weight", "backbone.lm_head.weight"} <= adamw and "backbone.transformer.h.0.attn.c_attn.weight" in muon
    seq2seq = ModelConfig(arch="seq2seq", vocab_size=64, d_model=32, n_layer=1, n_head=4, max_seq_len=16)
    muon, adamw = _muon_and_adamw_names(build_model(seq2seq))
    assert {"encoder.h.0.attn.c_attn.weight", "decoder.h.0.cross_attn.q_attn.weight"} <= muon
    assert not any("wte" in name or "wpe" in name for name in muon)


def test_a_fused_attention_weight_is_orthogonalised_one_matrix_at_a_time() -> None:
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

    torch.manual_seed(0)
    cfg = ModelConfig(arch="seq2seq", vocab_size=64, d_model=32, n_layer=1, n_head=4, max_seq_len=16)
    model = build_model(cfg)
    fused = {"self (q, k, v)": model.decoder.h[0].attn.c_attn, "cross (k, v)": model.decoder.h[0].cross_attn.c_attn}
    before = {name: linear.weight.detach().clone() for name, linear in fused.items()}
    for linear in fused.values():
        linear.weight.grad = torch.randn_like(linear.weight)
        linear.weight.grad[:32] *= 100  # one matrix's gradient far larger: a fused update would be mostly its
    grads = {name: linear.weight.grad.clone() for name, linear in fused.items()}
    lr = 0.01
    make_optimizer(model, TrainConfig(optimizer="muon", lr=lr, weight_decay=0.0, muon_momentum=0.0)).step()
    for name, linear in fused.items():
        parts = grads[name].split(32)
        expected = torch.cat([-lr * 0.2 * 32 ** 0.5 * _zeropower_via_newtonschulz(g, (DEFAULT_A, DEFAULT_B, DEFAULT_C),
                                                                                 5, EPS).float() for g in parts])
        torch.testing.assert_close(linear.weight.detach() - before[name], expected, rtol=0, atol=1e-6, msg=name)
        whole = _zeropower_via_newtonschulz(grads[name], (DEFAULT_A, DEFAULT_B, DEFAULT_C), 5, EPS).float()
        assert (whole * (0.2 * (len(parts) * 32) ** 0.5 * -lr) - expected).abs().max() > 1e-3  # tells them apart


def test_state_dict_round_trip_continues_exactly() -> None:
    torch.manual_seed(0)
    model = build_model(LLAMA)
    idx = torch.randint(0, 64, (4, 16))
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"))

    def step(m: torch.nn.Module, opt) -> None:  # noqa: ANN001
        m(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()

    step(model, optimizer)
    copy = build_model(LLAMA)
    copy.load_state_dict(model.state_dict())
    restored = make_optimizer(copy, TrainConfig(optimizer="muon"))
    restored.load_state_dict(copy_module.deepcopy(optimizer.state_dict()))  # as if read from disk: not shared
    for group in restored.param_groups:  # the loop sets the learning rate through these
        group["lr"] = 1e-3
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    step(model, optimizer)
    step(copy, restored)
    for a, b in zip(model.parameters(), copy.parameters()):
        assert torch.equal(a, b)


def test_interrupted_muon_run_resumes_exactly(tiny_project: Project, tmp_path) -> None:
    cfg = tiny_run_config(max_steps=16, eval_interval=8, save_interval=100, optimizer="muon")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="llama", bias=False, activation="silu",
                                                             n_kv_head=2))
    straight = fresh_copy(tiny_project, tmp_path / "a")
    train.pretrain(straight, [], cfg)
    interrupted = fresh_copy(tiny_project, tmp_path / "b")
    first = train.pretrain(interrupted, [], cfg, progress=signal_at(7, signal.SIGINT))
    assert first.state.step == 7
    with safe_open(interrupted.latest_checkpoint() / "trainer.safetensors", "pt") as saved:
        assert any(name.endswith(".momentum_buffer") for name in saved.keys())  # Muon's state is kept
    train.resume(interrupted)
    assert losses(interrupted, "run1") == losses(straight, "run1")


def test_muon_with_fsdp_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="muon needs whole weight matrices"):
        TrainConfig(optimizer="muon", strategy="fsdp")


def test_layer_lr_decay_gives_each_layer_down_from_the_head_a_smaller_rate() -> None:
    cfg = ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layer=3, n_head=4, n_kv_head=2, d_ff=48,
                      max_seq_len=16, bias=False, activation="silu")
    model = SequenceClassifier(build_model(cfg), 3)
    optimizer = make_optimizer(model, TrainConfig(layer_lr_decay=0.5))
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    blocks = model.backbone.model.layers
    assert scale[id(model.head.weight)] == scale[id(model.backbone.model.norm.weight)] == 1.0
    assert [scale[id(b.self_attn.q_proj.weight)] for b in blocks] == [0.125, 0.25, 0.5]
    assert scale[id(model.backbone.model.embed_tokens.weight)] == 0.0625
    assert len(scale) == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(g["lr_scale"] == 1.0 for g in make_optimizer(model, TrainConfig()).param_groups)
    with pytest.raises(ConfigError, match="layer_lr_decay"):
        TrainConfig(layer_lr_decay=0.0)
