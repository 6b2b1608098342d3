"""int8 weights for decoding on a CPU: a quarter of the bytes each token reads.

Every nn.Linear (the output layer included) becomes int8 weights with one scale per output channel
(symmetric), run by FBGEMM's int8 matrix products through torch.ao's dynamic quantized Linear: the
activations are quantized per call, with one scale for the whole input (so rows computed together
can differ slightly from each alone), and the result comes back in float32.
Weight-only int8 kernels (torch's _weight_int8pack_mm, torchao's Int8WeightOnlyConfig) were
measured 2-12x slower than float32 on this CPU, so they are not used (bench/perf.py).

`lmkit quantize` saves such a model: int8 weights and float32 scales in safetensors (embeddings int8
per row too, turned back into float32 on loading), under half the bytes of the float32 checkpoint.
`--quantize int8` rounds a float checkpoint's embeddings the same way, through the same code, so the
two give the same logits to the bit.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lmkit import checkpoint
from lmkit.errors import CheckpointError
from lmkit.fileio import check_target_dir
from lmkit.models import build_model
from lmkit.project import project_holding

SCALE = ".weight_scale"  # beside NAME.weight (int8) in a quantized checkpoint


def _dynamic_linear() -> type:
    from torch.ao.nn.quantized.dynamic import Linear

    return Linear


def check_device(device: torch.device) -> None:
    if device.type != "cpu":
        raise CheckpointError(f"int8 decoding runs on the CPU (FBGEMM); on {device.type} use the float weights "
                              "(bf16 autocast)")


def to_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per row): symmetric, the largest magnitude of a row at 127."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (out,)
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _int8_linear(linear: nn.Linear, weight: torch.Tensor, scale: torch.Tensor) -> nn.Module:
    """LINEAR's int8 counterpart, from WEIGHT (out, in) int8 and SCALE (out,)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    with warnings.catch_warnings():  # torch marks quantized tensors deprecated; they are what FBGEMM runs on
        warnings.simplefilter("ignore", UserWarning)
        q = _dynamic_linear()(linear.in_features, linear.out_features, bias_=linear.bias is not None,
                              dtype=torch.qint8)
        q.qconfig = per_channel_dynamic_qconfig
        scale = scale.double()
        packed = torch._make_per_channel_quantized_tensor(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0)
        q.set_weight_bias(packed, linear.bias.detach().float() if linear.bias is not None else None)
    return q


def quantize_int8(model: nn.Module) -> nn.Module:
    """MODEL with every nn.Linear replaced by its int8 counterpart (per-output-channel scales) and
    every nn.Embedding rounded to int8 per row, in place: through the same tensors and code as a
    checkpoint written by `lmkit quantize` and loaded, so the same numbers to the bit."""
    return _from_int8(model, int8_tensors(model), "the model")


def int8_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a quantized checkpoint stores for MODEL (float32, not yet quantized): each Linear's and
    Embedding's weight as int8 with a float32 scale per output channel (row); everything else as is."""
    tensors: dict[str, torch.Tensor] = {}
    quantized_names = set()
    for name, module in model.named_modules():
        if type(module) in (nn.Linear, nn.Embedding):
            tensors[f"{name}.weight"], tensors[f"{name}{SCALE}"] = to_int8(module.weight)
            quantized_names.add(f"{name}.weight")
    for name, tensor in model.state_dict(keep_vars=False).items():
        if name not in quantized_names and name not in tensors:
            tensors[name] = tensor.detach().contiguous()
    return {k: v.contiguous() for k, v in tensors.items()}


def load_int8(model: nn.Module, file: Path, aliases: dict[str, str]) -> nn.Module:
    """The float32 skeleton MODEL filled from a quantized checkpoint's FILE, its Linears int8;
    ALIASES name the stored tensor of a tied weight (an output layer tied to the embedding).

    Raises:
        CheckpointError: FILE does not hold MODEL's tensors.
    """
    stored = load_file(file)
    for dropped, kept in aliases.items():
        if kept in stored:
            stored.setdefault(dropped, stored[kept])
    return _from_int8(model, stored, str(file))


def _from_int8(model: nn.Module, stored: dict[str, torch.Tensor], source: str) -> nn.Module:
    """MODEL (in place) from STORED, the tensors of int8_tensors: embeddings (and everything else)
    as float32, Linears int8; SOURCE names STORED in errors."""
    modules = dict(model.named_modules())
    plain = {}
    for name, tensor in stored.items():
        if name.endswith(SCALE):
            continue
        owner = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{owner}{SCALE}" in stored:
            plain[name] = tensor.float() * stored[f"{owner}{SCALE}"][:, None]  # Embedding, or the Linear's float copy
        else:
            plain[name] = tensor
    missing, unexpected = model.load_state_dict(plain, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match its config (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
    for name, module in modules.items():
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or f"{full}.weight" not in stored:
                continue
            setattr(module, child_name, _int8_linear(child, stored[f"{full}.weight"], stored[f"{full}{SCALE}"]))
    return model.eval()


def quantize_checkpoint(source: Path, out: Path, force: bool = False) -> Path:
    """Write the int8 checkpoint of the float checkpoint SOURCE at OUT (new or empty, or with
    FORCE an lmkit checkpoint that nothing refers to: checkpoint.referrers). Holds the lock of the
    project OUT lies in.

    Raises:
        CheckpointError: SOURCE holds adapters or is int8 already, OUT is SOURCE, or something
            refers to OUT.
    """
    ckpt = checkpoint.Checkpoint(source)
    if ckpt.is_int8:
        raise CheckpointError(f"{source} is int8 already")
    if ckpt.labels:
        raise CheckpointError(f"{source} is a {ckpt.task} checkpoint; int8 checkpoints are for language models "
                              "(generate, eval, chat, serve)")
    if ckpt.meta.get("weights") == "adapters":
        raise CheckpointError(f"{source} holds LoRA adapters: merge them first (lmkit merge {source} -o DIR)")
    if out.resolve() == ckpt.path.resolve():
        raise CheckpointError(f"{out} is the checkpoint itself; write the int8 one somewhere else")
    owner = project_holding(out)
    with owner.lock() if owner else contextlib.nullcontext():
        check_target_dir(out, "checkpoint", checkpoint.is_checkpoint_dir, force)
        if out.exists():
            checkpoint.refuse_referenced(out, ckpt.path)
        model = ckpt.model()
        extra = {k: ckpt.meta[k] for k in ("labels", "finetune") if k in ckpt.meta}
        checkpoint.save(out, model=model, config=ckpt.config, tokenizer=ckpt.tokenizer(), run=ckpt.run,
                        step=ckpt.step, metrics=ckpt.meta.get("metrics"), task=ckpt.task,
                        weights=int8_tensors(model), int8=True, extra={**extra, "quantized_from": str(ckpt.path)})
    return out


def model_for_decoding(ckpt: checkpoint.Checkpoint, device: torch.device, quantize: str | None = None) -> nn.Module:
    """CKPT's model for generate, eval, chat and serve, in eval mode: an int8 checkpoint as it is
    (on the CPU); a float one as it is, or with QUANTIZE "int8" quantized now."""
    if ckpt.is_int8:
        check_device(torch.device(device))
        ckpt.verify("model.safetensors")
        return load_int8(build_model(ckpt.config.model), ckpt.path / "model.safetensors",
                         ckpt.meta.get("tied_weights", {}))
    if quantize not in (None, "int8"):
        raise CheckpointError(f"unknown quantization {quantize!r} (lmkit has int8)")
    if quantize == "int8":
        check_device(device)
        return quantize_int8(ckpt.model(device))
    return ckpt.model(device)
