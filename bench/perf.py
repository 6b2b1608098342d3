"""lmkit against Hugging Face transformers on this machine, side by side in one run: training
throughput and MFU, KV-cached greedy generation, tokenization speed, and CLI start-up.

    pip install -e '.[bench]'          # transformers, for the side-by-side figures
    python bench/perf.py -o /tmp/perf  # OUT/results.json and OUT/results.md; the table is printed too

Every figure is a median over --repeats measurements (min-max beside it), and every comparison is
a ratio of two medians measured in the same run, the two sides taking turns so that a noisy
neighbour hurts both alike. Both sides use the same threads (torch.get_num_threads()), fp32, the
same weights (lmkit's copied into transformers' GPT2LMHeadModel), the same batches, fused AdamW
(transformers' Trainer default on torch >= 2.8) and gradient clipping at 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmkit import search, train  # noqa: E402
from lmkit.batches import LMBatch  # noqa: E402
from lmkit.config import ModelConfig, SampleConfig, TokenizerConfig, TrainConfig  # noqa: E402
from lmkit.corpus import split_lines  # noqa: E402
from lmkit.generate import CausalStepper  # noqa: E402
from lmkit.models.gpt import GPT  # noqa: E402
from lmkit.objectives import causal_lm_loss  # noqa: E402
from lmkit.project import Project  # noqa: E402
from lmkit.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    d_model: int
    context: int
    batch: int
    vocab: int

    def model_config(self, max_seq_len: int | None = None) -> ModelConfig:
        return ModelConfig(arch="gpt", vocab_size=self.vocab, d_model=self.d_model, n_layer=self.n_layer,
                           n_head=max(1, self.d_model // 64), max_seq_len=max_seq_len or self.context, dropout=0.0)


SHAPES = [Shape("a", 4, 128, 64, 12, 65), Shape("b", 6, 384, 256, 8, 8192)]


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def side_by_side(works: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each work, the works taking turns REPEATS times after WARMUP rounds."""
    for _ in range(warmup):
        for work in works.values():
            work()
    times: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(repeats):
        for name, work in works.items():
            times[name].append(timed(work))
    return times


# --- the peer: transformers' GPT-2 with lmkit's weights ------------------------------------------

def hf_gpt2(model: GPT):  # noqa: ANN201 - transformers is optional
    """transformers' GPT2LMHeadModel with MODEL's shape and weights (nn.Linear -> GPT-2's Conv1D:
    transposed), dropout off, tied embeddings, SDPA attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.ff_dim, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config._attn_implementation = "sdpa"
    hf = GPT2LMHeadModel(config)
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ours = model.state_dict()
    theirs = {name: ours[name].t() if name.endswith(conv1d) else ours[name]
              for name in hf.state_dict() if name in ours}
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.train()


def logits_agree(model: GPT, hf, vocab: int, context: int) -> float:  # noqa: ANN001
    """Max |logit difference| between the two models on one random batch (a check on the copy)."""
    x = torch.randint(0, vocab, (2, context))
    with torch.no_grad():
        return (model.eval()(x)[0] - hf.eval()(x).logits).abs().max().item()


# --- measurements --------------------------------------------------------------------------------

def matmul_peak(repeats: int) -> dict[str, float]:
    """fp32 matmul GFLOP/s on this machine with these threads: the best median over square sizes
    and the (tokens x d_model) @ (d_model x 4 d_model) product of shape b, ~10 GFLOP per measurement."""
    best = {"gflops": 0.0}
    for m, k, n in ((512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (2048, 384, 1536)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        calls = max(1, int(1e10 // (2 * m * k * n)))
        times = side_by_side({"mm": lambda a=a, b=b, calls=calls: [torch.mm(a, b) for _ in range(calls)]},
                             repeats)["mm"]
        gflops = [2 * m * k * n * calls / t / 1e9 for t in times]
        if statistics.median(gflops) > best["gflops"]:
            best = {"size": f"{m}x{k}x{n}", "gflops": statistics.median(gflops), "min": min(gflops),
                    "max": max(gflops)}
    return best


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6N for the weight matmuls (N: parameters but the position table,
    the tied head counted once) + 12 * layers * d_model * context for attention scores and values
    (PaLM appendix B; the causal half is not subtracted, as is customary)."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * cfg.n_layer * cfg.d_model * cfg.max_seq_len


def training(shape: Shape, repeats: int, steps: int, peak: float) -> dict:
    """ms/step, tokens/s and MFU of one training step (forward, backward, clip, fused AdamW)."""
    torch.manual_seed(0)
    model = GPT(shape.model_config()).train()
    hf = hf_gpt2(model)
    difference = logits_agree(model, hf, shape.vocab, shape.context)
    model.train(), hf.train()
    data = torch.randint(0, shape.vocab, (shape.batch, shape.context + 1))
    inputs, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    cfg = TrainConfig(grad_accum=1, grad_clip=1.0)
    ours_opt = train.make_optimizer(model, cfg)
    ours_params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(lambda: LMBatch(inputs, targets), None)

    def ours() -> None:
        for _ in range(steps):
            train._optimizer_step(model, ours_params, batches, causal_lm_loss, ours_opt, 1e-4, cfg,
                                  torch.device("cpu"))

    theirs_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)

    def theirs() -> None:
        for _ in range(steps):
            loss = hf(input_ids=inputs, labels=inputs).loss  # GPT-2 shifts the labels itself
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            theirs_opt.step()
            theirs_opt.zero_grad(set_to_none=True)

    times = side_by_side({"lmkit": ours, "transformers": theirs}, repeats)
    tokens = shape.batch * shape.context * steps
    result = {"shape": shape.__dict__, "parameters": sum(p.numel() for p in model.parameters()),
              "max_logit_difference": difference, "flops_per_token": flops_per_token(model)}
    for name, ts in times.items():
        rates = [tokens / t for t in ts]
        result[name] = {"ms_per_step": summary([1000 * t / steps for t in ts]), "tokens_per_s": summary(rates),
                        "mfu": statistics.median(rates) * result["flops_per_token"] / (peak * 1e9)}
    result["ratio"] = result["lmkit"]["tokens_per_s"]["median"] / result["transformers"]["tokens_per_s"]["median"]
    return result


def generation(shape: Shape, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Greedy decoding with a KV cache from a PROMPT_LEN-token prompt, NEW_TOKENS tokens per row.
    The position table is widened to fit prompt + new tokens (shape b's context is 256)."""
    torch.manual_seed(0)
    model = GPT(shape.model_config(max_seq_len=512)).eval()
    hf = hf_gpt2(model).eval()
    prompt = torch.randint(7, shape.vocab, (1, prompt_len)).expand(batch, -1)  # one prompt, BATCH rows
    cfg = SampleConfig(greedy=True, max_new_tokens=new_tokens)
    out: dict[str, list[list[int]]] = {}

    @torch.inference_mode()
    def ours() -> None:  # what `lmkit generate` runs, less tokenizing and printing
        stepper = CausalStepper(model, prompt[0].tolist(), batch, torch.device("cpu"))
        rows = search.sample(stepper, batch, cfg, eos_id=-1)  # no end-of-text: always NEW_TOKENS
        out["lmkit"] = [h.tokens for h in rows]

    @torch.inference_mode()
    def theirs() -> None:
        generated = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
        out["transformers"] = generated[:, prompt_len:].tolist()

    times = side_by_side({"lmkit": ours, "transformers": theirs}, repeats)
    same = sum(a == b for x, y in zip(out["lmkit"], out["transformers"]) for a, b in zip(x, y))
    result = {"batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
              "greedy_tokens_identical": same / (batch * new_tokens)}
    for name, ts in times.items():
        result[name] = {"tokens_per_s": summary([batch * new_tokens / t for t in ts]),
                        "ms_per_token": summary([1000 * t / new_tokens for t in ts])}
    result["ratio"] = result["lmkit"]["tokens_per_s"]["median"] / result["transformers"]["tokens_per_s"]["median"]
    return result


def decode_bound(shape: Shape, repeats: int) -> dict[str, float]:
    """What limits batch-1 decoding: one token multiplies a vector by every weight matrix once.
    Times those products alone (fp32, and with bf16 weights), and memory's read bandwidth."""
    torch.manual_seed(0)
    weights = [p.detach().clone() for p in GPT(shape.model_config()).parameters() if p.dim() == 2][2:]  # no tables
    weights.append(torch.randn(shape.vocab, shape.d_model))  # the (tied) output layer
    vectors = {n: torch.randn(n) for n in {w.size(1) for w in weights}}
    half = [w.bfloat16() for w in weights]
    half_vectors = {n: v.bfloat16() for n, v in vectors.items()}
    flat = torch.randn(sum(w.numel() for w in weights))
    times = side_by_side({"fp32": lambda: [torch.mv(w, vectors[w.size(1)]) for w in weights],
                          "bf16": lambda: [torch.mv(w, half_vectors[w.size(1)]) for w in half],
                          "read": flat.sum}, repeats * 4)
    megabytes = flat.numel() * 4 / 1e6
    return {"weight_mb": megabytes, "fp32_gemv_ms": 1000 * statistics.median(times["fp32"]),
            "bf16_gemv_ms": 1000 * statistics.median(times["bf16"]),
            "read_gb_per_s": megabytes / 1000 / statistics.median(times["read"])}


def tokenization(tokenizer: Tokenizer, text: str, repeats: int) -> dict:
    """Encode MB/s of TEXT: a direct sentencepiece call on the lines (1 thread) vs lmkit's
    encode_lines (which also keeps newlines and literal U+2581 exact) on 1 and 2 threads."""
    lines = split_lines(text)
    bodies = [line.removesuffix("\n") for line in lines]
    megabytes = len(text.encode("utf-8")) / 1e6
    works = {"sentencepiece_1": lambda: tokenizer.sp.encode(bodies, num_threads=1),
             "lmkit_1": lambda: tokenizer.encode_lines(lines, threads=1),
             "sentencepiece_2": lambda: tokenizer.sp.encode(bodies, num_threads=2),
             "lmkit_2": lambda: tokenizer.encode_lines(lines, threads=2)}
    times = side_by_side(works, repeats)
    result: dict = {"megabytes": megabytes, "lines": len(lines)}
    for name, ts in times.items():
        result[name] = {"mb_per_s": summary([megabytes / t for t in ts])}
    base = result["sentencepiece_1"]["mb_per_s"]["median"]
    result["ratio_1"] = result["lmkit_1"]["mb_per_s"]["median"] / base
    result["ratio_2"] = result["lmkit_2"]["mb_per_s"]["median"] / base
    return result


def startup(project: Path, repeats: int) -> dict:
    """Wall time of `lmkit --help` and of encoding one line, as a user runs them."""
    lmkit = [sys.executable, "-m", "lmkit"]
    commands = {"help": [*lmkit, "--help"],
                "tokenize_encode": [*lmkit, "tokenize", "encode", "-p", str(project)]}

    def run(command: list[str]) -> Callable[[], object]:
        return lambda: subprocess.run(command, input="To be, or not to be.\n", capture_output=True, text=True,
                                      check=True, cwd=ROOT)

    times = side_by_side({name: run(c) for name, c in commands.items()}, repeats)
    return {name: {"seconds": summary(ts)} for name, ts in times.items()}


# --- the report ----------------------------------------------------------------------------------

def _range(s: dict[str, float], fmt: str) -> str:
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def markdown(results: dict) -> str:
    peak = results["matmul"]
    lines = [f"Machine: {results['machine']}; torch {results['torch']}, transformers {results['transformers']}, "
             f"{results['threads']} threads, fp32. Medians (min-max) of {results['repeats']} repeats.",
             "", f"fp32 matmul peak: {peak['gflops']:.1f} GFLOP/s ({peak['size']}; MFU is measured against it)", "",
             "| training | lmkit tok/s | transformers tok/s | lmkit / transformers | lmkit ms/step | "
             "transformers ms/step | MFU lmkit | MFU transformers |", "|---|---|---|---|---|---|---|---|"]
    for r in results["training"]:
        s = r["shape"]
        lines.append(f"| ({s['name']}) {s['n_layer']}x{s['d_model']}, ctx {s['context']}, batch {s['batch']}, "
                     f"vocab {s['vocab']} | {_range(r['lmkit']['tokens_per_s'], ',.0f')} | "
                     f"{_range(r['transformers']['tokens_per_s'], ',.0f')} | **{r['ratio']:.2f}x** | "
                     f"{r['lmkit']['ms_per_step']['median']:.1f} | {r['transformers']['ms_per_step']['median']:.1f} | "
                     f"{r['lmkit']['mfu']:.0%} | {r['transformers']['mfu']:.0%} |")
    lines += ["", "| generation (shape b, greedy, KV cache) | lmkit tok/s | transformers tok/s | "
              "lmkit / transformers | lmkit ms/token | transformers ms/token | same tokens |",
              "|---|---|---|---|---|---|---|"]
    for r in results["generation"]:
        lines.append(f"| batch {r['batch']}, {r['prompt_tokens']}-token prompt, {r['new_tokens']} new | "
                     f"{_range(r['lmkit']['tokens_per_s'], ',.0f')} | "
                     f"{_range(r['transformers']['tokens_per_s'], ',.0f')} | **{r['ratio']:.2f}x** | "
                     f"{r['lmkit']['ms_per_token']['median']:.2f} | "
                     f"{r['transformers']['ms_per_token']['median']:.2f} | {r['greedy_tokens_identical']:.0%} |")
    b = results.get("decode_bound")
    if b:
        lines += ["", f"Batch-1 decoding reads all {b['weight_mb']:.0f} MB of weights per token: the matrix-vector "
                  f"products alone take {b['fp32_gemv_ms']:.2f} ms in fp32 ({b['bf16_gemv_ms']:.2f} ms with bf16 "
                  f"weights); memory reads at {b['read_gb_per_s']:.1f} GB/s."]
    t = results["tokenization"]
    lines += ["", f"| tokenization ({t['megabytes']:.1f} MB, {t['lines']:,} lines) | MB/s | "
              "vs sentencepiece 1 thread |",
              "|---|---|---|"]
    for name in ("sentencepiece_1", "lmkit_1", "sentencepiece_2", "lmkit_2"):
        s = t[name]["mb_per_s"]
        lines.append(f"| {name.replace('_', ', ')} thread(s) | {_range(s, '.2f')} | "
                     f"{s['median'] / t['sentencepiece_1']['mb_per_s']['median']:.2f}x |")
    st = results["startup"]
    lines += ["", "| CLI start-up | seconds |", "|---|---|",
              f"| `lmkit --help` | {_range(st['help']['seconds'], '.3f')} |",
              f"| `lmkit tokenize encode` (one line) | {_range(st['tokenize_encode']['seconds'], '.3f')} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, required=True, help="folder for results.json and results.md")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="training steps per measurement")
    parser.add_argument("--only", nargs="*", choices=["training", "generation", "tokenization", "startup"],
                        help="run only these parts (the report needs all four)")
    args = parser.parse_args()
    try:
        import transformers
    except ImportError:
        raise SystemExit("the side-by-side figures need transformers: pip install -e '.[bench]'") from None
    transformers.logging.set_verbosity_error()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = set(args.only or ["training", "generation", "tokenization", "startup"])
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results.update({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
                    "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                    "repeats": args.repeats})

    if "training" in parts:
        results["matmul"] = matmul_peak(args.repeats)
        print(f"matmul peak {results['matmul']['gflops']:.1f} GFLOP/s", file=sys.stderr)
        results["training"] = []
        for shape in SHAPES:
            results["training"].append(training(shape, args.repeats, args.steps, results["matmul"]["gflops"]))
            print(f"training ({shape.name}): {results['training'][-1]['ratio']:.2f}x", file=sys.stderr)
    if "generation" in parts:
        results["generation"] = [generation(SHAPES[1], batch, 32, 256, args.repeats) for batch in (1, 8)]
        results["decode_bound"] = decode_bound(SHAPES[1], args.repeats)
        print("generation: " + ", ".join(f"{r['ratio']:.2f}x" for r in results["generation"]), file=sys.stderr)
    project = Project.open(args.out / "project")
    text = (ROOT / "sample_data" / "shakespeare_all.txt").read_text(encoding="utf-8")
    if {"tokenization", "startup"} & parts and not project.has_tokenizer():
        train_tokenizer([split_lines(text)], project.tokenizer_model, TokenizerConfig())
    if "tokenization" in parts:
        tokenizer = Tokenizer.load(project.tokenizer_model)
        results["tokenization"] = tokenization(tokenizer, text, args.repeats)
    if "startup" in parts:
        results["startup"] = startup(project.root, max(args.repeats, 5))
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    if all(k in results for k in ("training", "generation", "tokenization", "startup")):
        table = markdown(results)
        (args.out / "results.md").write_text(table)
        print(table)


if __name__ == "__main__":
    main()
