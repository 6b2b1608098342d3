"""Fast decoding, side by side in one run, taking turns (medians of --repeats):

1. Shape (b) of the performance table (GPT 6x384, vocabulary 8192, random weights), greedy, a
   32-token prompt and 256 new tokens, batch 1 and 8: lmkit float32, lmkit int8, and transformers'
   GPT2LMHeadModel float32 on the same weights (the reference).
2. Speculative decoding: a trained TARGET with a DRAFT that shares its tokenizer (e.g. its student
   from `lmkit distill`), greedy, NEW tokens after each of 8 held-out prompts: one prompt at a time
   without and with the draft (and int8), and the 8 together (batch 8: lmkit's batching engine, the
   decoder of `lmkit serve`, against speculative decoding of the 8 rows at once); tokens/s, the
   acceptance rate, and whether the output is identical.

    pip install -e '.[bench]'
    python bench/decode.py -o OUT [--target CKPT --draft CKPT] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import SHAPES, hf_gpt2, side_by_side  # noqa: E402

from lmkit import quantize, search  # noqa: E402
from lmkit.batching import Engine, Job  # noqa: E402
from lmkit.checkpoint import Checkpoint  # noqa: E402
from lmkit.config import SampleConfig  # noqa: E402
from lmkit.generate import CausalStepper, generate  # noqa: E402
from lmkit.models.gpt import GPT  # noqa: E402
from lmkit.speculative import generate_with_draft, speculate  # noqa: E402

CPU = torch.device("cpu")
DATA = Path(__file__).resolve().parent.parent / "sample_data"


def shape_b(batch: int, repeats: int, new_tokens: int = 256, prompt_len: int = 32) -> dict:
    shape = SHAPES[1]
    torch.manual_seed(0)
    model = GPT(shape.model_config(max_seq_len=512)).eval()
    int8 = quantize.quantize_int8(copy.deepcopy(model))
    hf = hf_gpt2(model).eval()
    prompt = torch.randint(7, shape.vocab, (1, prompt_len)).expand(batch, -1)
    cfg = SampleConfig(greedy=True, max_new_tokens=new_tokens)

    def ours(m: torch.nn.Module):  # noqa: ANN202
        @torch.inference_mode()
        def work() -> None:
            search.sample(CausalStepper(m, prompt[0].tolist(), batch, CPU), batch, cfg, eos_id=-1)
        return work

    @torch.inference_mode()
    def theirs() -> None:
        hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    times = side_by_side({"lmkit fp32": ours(model), "lmkit int8": ours(int8), "transformers fp32": theirs}, repeats)
    tokens = batch * new_tokens
    rates = {name: tokens / statistics.median(t) for name, t in times.items()}
    return {"batch": batch, "tokens_per_s": rates, "seconds": times,
            "int8_vs_transformers": rates["lmkit int8"] / rates["transformers fp32"],
            "fp32_vs_transformers": rates["lmkit fp32"] / rates["transformers fp32"]}


def speculative(target_path: Path, draft_path: Path, repeats: int, new_tokens: int, k: int) -> dict:
    target_ckpt, draft_ckpt = Checkpoint(target_path), Checkpoint(draft_path)
    if target_ckpt.tokenizer_fingerprint != draft_ckpt.tokenizer_fingerprint:
        raise SystemExit("the draft must share the target's tokenizer")
    target, draft, tokenizer = target_ckpt.model(), draft_ckpt.model(), target_ckpt.tokenizer()
    target8, draft8 = quantize.quantize_int8(copy.deepcopy(target)), quantize.quantize_int8(copy.deepcopy(draft))
    text = (DATA / "shakespeare_heldout.txt").read_text(encoding="utf-8")
    prompts = [text[i:i + 80] for i in range(5_000, 85_000, 10_000)]  # 8 held-out passages
    ids = [tokenizer.encode_document(p) for p in prompts]
    cfg = SampleConfig(greedy=True, max_new_tokens=new_tokens)
    stop_ids = set(tokenizer.stop_ids)
    outputs: dict[str, list[list[int]]] = {}
    stats: dict[str, list] = {}
    engine = Engine(target, tokenizer, CPU, max_batch=len(prompts))

    def plain(model: torch.nn.Module, name: str):  # noqa: ANN202
        @torch.inference_mode()
        def work() -> None:
            outputs[name] = [generate(model, tokenizer, p, cfg, CPU).samples[0].tokens for p in prompts]
        return work

    def drafted(model: torch.nn.Module, small: torch.nn.Module, name: str):  # noqa: ANN202
        @torch.inference_mode()
        def work() -> None:
            runs = [generate_with_draft(model, small, tokenizer, p, cfg, CPU, draft_tokens=k) for p in prompts]
            outputs[name] = [c.samples[0].tokens for c, _ in runs]
            stats[name] = [s for _, s in runs]
        return work

    def batched() -> None:  # lmkit's batched decoder for different prompts (what serve runs)
        done, results = threading.Semaphore(0), {}
        for i, prompt in enumerate(ids):
            def finish(samples: list, seed: int, i: int = i) -> None:
                results[i] = samples[0].tokens
                done.release()
            engine.submit(Job(prompt, cfg, tokenizer.stop_ids, finish))
        for _ in ids:
            done.acquire()
        outputs["batch 8"] = [results[i] for i in range(len(ids))]

    @torch.inference_mode()
    def batched_with_draft() -> None:
        got: list[list[int]] = [[] for _ in ids]

        def emit(row: int, token: int) -> bool:
            if token in stop_ids:
                return True
            got[row].append(token)
            return len(got[row]) == new_tokens

        stats["batch 8 + draft"] = [speculate(target, draft, ids, cfg, CPU, emit, draft_tokens=k)]
        outputs["batch 8 + draft"] = got

    works = {"fp32": plain(target, "fp32"), "fp32 + draft": drafted(target, draft, "fp32 + draft"),
             "fp32 + int8 draft": drafted(target, draft8, "fp32 + int8 draft"),  # what `generate` allows
             "int8": plain(target8, "int8"), "int8 + draft": drafted(target8, draft8, "int8 + draft"),
             "batch 8": batched, "batch 8 + draft": batched_with_draft}
    try:
        times = side_by_side(works, repeats)
    finally:
        engine.close()
    tokens = {name: sum(map(len, out)) for name, out in outputs.items()}
    rates = {name: tokens[name] / statistics.median(t) for name, t in times.items()}
    acceptance = {name: sum(s.accepted for s in st) / max(1, sum(s.proposed for s in st)) for name, st in stats.items()}
    return {"target": str(target_path), "draft": str(draft_path), "draft_tokens": k, "new_tokens": new_tokens,
            "prompts": len(prompts), "tokens_per_s": rates, "acceptance": acceptance,
            "identical": {"fp32 + draft": outputs["fp32 + draft"] == outputs["fp32"],
                          "fp32 + int8 draft": outputs["fp32 + int8 draft"] == outputs["fp32"],
                          "int8 + draft": outputs["int8 + draft"] == outputs["int8"],
                          "batch 8": outputs["batch 8"] == outputs["fp32"],
                          "batch 8 + draft": outputs["batch 8 + draft"] == outputs["fp32"]},
            "speedup": rates["fp32 + draft"] / rates["fp32"],
            "int8_draft_only_speedup": rates["fp32 + int8 draft"] / rates["fp32"],
            "int8_speedup": rates["int8"] / rates["fp32"],
            "int8_draft_speedup": rates["int8 + draft"] / rates["fp32"],
            "batch8_speedup": rates["batch 8 + draft"] / rates["batch 8"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=Path)
    parser.add_argument("--draft", type=Path)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=120)
    parser.add_argument("--speculative-only", action="store_true", help="leave out the shape (b) rows")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"shape_b": [] if args.speculative_only else [shape_b(batch, args.repeats) for batch in (1, 8)]}
    for row in results["shape_b"]:
        print(f"shape (b) batch {row['batch']}: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in
                                                             row["tokens_per_s"].items())
              + f"; int8 / transformers {row['int8_vs_transformers']:.2f}x", file=sys.stderr)
    if args.target and args.draft:
        results["speculative"] = speculative(args.target, args.draft, args.repeats, args.new_tokens, args.draft_tokens)
        s = results["speculative"]
        print(f"speculative: {s['speedup']:.2f}x (int8 draft {s['int8_draft_only_speedup']:.2f}x; "
              f"int8 {s['int8_speedup']:.2f}x, int8 + draft "
              f"{s['int8_draft_speedup']:.2f}x), batch 8 {s['batch8_speedup']:.2f}x over batch 8 without it; "
              f"tokens/s {s['tokens_per_s']}, acceptance {s['acceptance']}, identical {s['identical']}",
              file=sys.stderr)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
