"""Where tensors live and in which precision: device auto-detection and mixed-precision autocast."""

from __future__ import annotations

import contextlib

import torch

from lmkit.errors import ConfigError


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
