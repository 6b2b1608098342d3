"""The matmul peak behind MFU: measured once and cached, raised when a run beats it (a peak
measured on a busy machine comes out low), and a peak the user sets is kept."""

from __future__ import annotations

import json

import torch

from lmkit.device import peak_flops, raise_peak_flops

CPU = torch.device("cpu")


def test_the_cached_peak_is_raised_by_a_faster_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LMKIT_PEAK_FLOPS", raising=False)
    measured = peak_flops(CPU)
    cache = tmp_path / "lmkit" / "peak_flops.json"
    assert measured > 1e8 and json.loads(cache.read_text()) == {f"cpu-{torch.get_num_threads()}threads": measured}
    assert peak_flops(CPU) == measured  # from the cache, not measured again
    assert raise_peak_flops(CPU, measured * 3) == measured * 3
    assert peak_flops(CPU) == measured * 3


def test_a_peak_the_user_sets_is_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("LMKIT_PEAK_FLOPS", "5e9")
    assert peak_flops(CPU) == 5e9
    assert raise_peak_flops(CPU, 6e9) == 6e9 and not (tmp_path / "lmkit").exists()
    assert peak_flops(CPU) == 5e9
