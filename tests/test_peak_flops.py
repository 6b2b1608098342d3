"""The matmul peak behind MFU: measured once and cached; when a run beats it (a peak measured on a
busy machine comes out low) measured again, and the larger measurement cached, never what a run
achieved; a peak the user sets is kept."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from lmkit import device as device_lib
from lmkit import objectives, train
from lmkit.batches import LMBatch
from lmkit.config import ModelConfig, TrainConfig
from lmkit.device import peak_flops, remeasure_peak_flops
from lmkit.models import build_model

CPU = torch.device("cpu")
NAME = f"cpu-{torch.get_num_threads()}threads"


def test_the_peak_is_measured_once_and_cached(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LMKIT_PEAK_FLOPS", raising=False)
    measured = peak_flops(CPU)
    cache = tmp_path / "lmkit" / "peak_flops.json"
    assert measured > 1e8 and json.loads(cache.read_text()) == {NAME: measured}
    assert peak_flops(CPU) == measured  # from the cache, not measured again


@pytest.mark.parametrize(("cached", "fresh", "kept"), [(2e9, 5e9, 5e9), (8e9, 5e9, 8e9)])
def test_measuring_again_caches_the_larger_measurement(cached, fresh, kept, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LMKIT_PEAK_FLOPS", raising=False)
    (tmp_path / "lmkit").mkdir()
    (tmp_path / "lmkit" / "peak_flops.json").write_text(json.dumps({NAME: cached, "other-device": 1.0}))
    monkeypatch.setattr(device_lib, "measure_peak_flops", lambda device: fresh)
    assert remeasure_peak_flops(CPU) == kept
    assert peak_flops(CPU) == kept
    assert json.loads((tmp_path / "lmkit" / "peak_flops.json").read_text())["other-device"] == 1.0


def test_a_run_that_beats_the_cached_peak_has_it_measured_again_not_replaced_by_its_rate(tmp_path,
                                                                                         monkeypatch) -> None:
    """The cached peak (1 FLOP/s) is beaten at the first log: the benchmark runs again, once, and its
    result (2 FLOP/s, still beaten) is cached, and the MFU shown is capped against it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LMKIT_PEAK_FLOPS", raising=False)
    (tmp_path / "lmkit").mkdir()
    (tmp_path / "lmkit" / "peak_flops.json").write_text(json.dumps({NAME: 1.0}))
    measurements = []
    monkeypatch.setattr(device_lib, "measure_peak_flops", lambda device: measurements.append(2.0) or 2.0)
    model = build_model(ModelConfig(arch="gpt", vocab_size=64, d_model=32, n_layer=1, n_head=4, max_seq_len=16))
    batches = (LMBatch(*torch.randint(0, 64, (2, 4, 16))) for _ in itertools.count())
    metrics = tmp_path / "metrics.jsonl"
    train.train_loop(model, batches, objectives.causal_lm_loss, TrainConfig(max_steps=3, log_interval=1),
                     state=train.TrainState(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                     tokens_per_batch=64, validate=lambda: {"val_loss": 1.0}, save=lambda state, m: tmp_path,
                     metrics_file=metrics, device=CPU)
    assert measurements == [2.0]
    assert json.loads((tmp_path / "lmkit" / "peak_flops.json").read_text()) == {NAME: 2.0}
    assert [json.loads(line)["mfu"] for line in metrics.read_text().splitlines()] == [1.0, 1.0, 1.0]


def test_a_peak_the_user_sets_is_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("LMKIT_PEAK_FLOPS", "5e9")
    assert peak_flops(CPU) == 5e9
    assert remeasure_peak_flops(CPU) == 5e9 and not (tmp_path / "lmkit").exists()
    assert peak_flops(CPU) == 5e9
