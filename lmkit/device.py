"""Where tensors live and in which precision: device auto-detection and mixed-precision autocast."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from lmkit.errors import ConfigError
from lmkit.fileio import atomic_write_json


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda, else mps, else cpu; an explicitly named device must exist."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if not available.get(name, False):
        raise ConfigError(f"device {name!r} is not available on this machine; use --device auto or cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in for train.precision, or None for plain fp32.

    auto: bf16 on CUDA GPUs that have it, fp32 elsewhere (bf16 matmuls are ~15x slower than fp32
    on AVX2 CPUs). fp16 is for GPUs without bf16 (V100, T4); training then needs a gradient scaler.
    """
    if precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 gradients underflow: scale the loss up before backward and the gradients down before
    the step, skipping steps whose gradients overflowed. A no-op unless training in fp16."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def peak_flops(device: torch.device) -> float:
    """Dense matmul FLOP/s of DEVICE in the dtype training computes in (fp32 on a CPU, bf16 on
    CUDA), the reference of MFU: $LMKIT_PEAK_FLOPS when set, else measured once (a second or so
    of large products) and cached in $XDG_CACHE_HOME/lmkit/peak_flops.json, per device and threads."""
    if os.environ.get("LMKIT_PEAK_FLOPS"):
        return float(os.environ["LMKIT_PEAK_FLOPS"])
    name, cache, known = _known_peaks(device)
    if isinstance(known.get(name), (int, float)):
        return float(known[name])
    best = measure_peak_flops(device)
    _remember(cache, {**known, name: best})
    return best


def remeasure_peak_flops(device: torch.device) -> float:
    """The peak once a run has achieved more than it: measured again (the cached measurement may
    have been taken on a busy machine) and the larger of the two measurements cached. What the
    run achieved is never cached: only the benchmark sets the reference every run is measured by.
    $LMKIT_PEAK_FLOPS, when set, stays the peak."""
    if os.environ.get("LMKIT_PEAK_FLOPS"):
        return float(os.environ["LMKIT_PEAK_FLOPS"])
    name, cache, known = _known_peaks(device)
    earlier = known.get(name)
    best = max(measure_peak_flops(device), float(earlier) if isinstance(earlier, (int, float)) else 0.0)
    _remember(cache, {**known, name: best})
    return best


def measure_peak_flops(device: torch.device) -> float:
    """The matmul benchmark: the best of four rounds of four square products (a second or so)."""
    import time

    size = 4096 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def _known_peaks(device: torch.device) -> tuple[str, Path, dict]:
    """(this device's name in the cache, the cache file, the peaks it holds)."""
    import json

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}threads"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmkit" / "peak_flops.json"
    try:
        known = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    return name, cache, known if isinstance(known, dict) else {}


def _remember(cache: Path, peaks: dict) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, peaks)
    except OSError:
        pass  # an unwritable cache only means measuring again next time
