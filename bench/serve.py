"""`lmkit serve` under load: aggregate generated tokens/s and p50/p99 request latency with 1, 4
and 16 concurrent clients, against the same requests made one after another (1 client), on the
default llama shape and on shape (b) of the performance table (GPT 6x384, vocabulary 8192), random
weights (throughput does not depend on them). Each request: a ~12-token prompt, greedy, MAX_TOKENS
new tokens (128 on shape (b); the default shape's context of 64 holds 44). Also a burst: 16
requests at once, its p99 latency against one request alone.

    python bench/serve.py -o OUT [--requests 4]

Writes OUT/results.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from common import DATA

from lmkit import checkpoint
from lmkit.config import RunConfig, TokenizerConfig, resolve
from lmkit.corpus import split_lines
from lmkit.models import build_model
from lmkit.tokenizer import train_tokenizer

# name: (lmkit config flags, new tokens per request)
SHAPES = {
    "default (llama 4x128, ctx 64)": ({"arch": "llama", "preset": "default"}, 44),
    "shape (b) (GPT 6x384, ctx 256, vocab 8192)": ({"arch": "gpt", "model.d_model": 384, "model.n_layer": 6,
                                                     "model.n_head": 6, "model.max_seq_len": 256,
                                                     "model.dropout": 0.0}, 128),
}


def make_checkpoint(out: Path, flags: dict, vocab: int, tokenizer) -> Path:  # noqa: ANN001
    cfg: RunConfig = resolve(flags={**flags, "tokenizer.vocab_size": vocab})
    cfg = cfg.with_vocab_size(tokenizer.vocab_size)
    torch.manual_seed(0)
    path = out / f"{cfg.model.arch}-{cfg.model.d_model}" / "checkpoints" / "run1" / "step-000000"
    checkpoint.save(path, model=build_model(cfg.model), config=cfg, tokenizer=tokenizer, run="run1", step=0)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[float, int]:
    """(seconds, completion tokens) of one request."""
    start = time.perf_counter()
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - start, answer["usage"]["completion_tokens"]


def load(url: str, clients: int, per_client: int, new_tokens: int, prompts: list[str]) -> dict:
    """CLIENTS threads, each sending PER_CLIENT requests one after another."""
    def client(k: int) -> list[tuple[float, int]]:
        return [post(url, {"prompt": prompts[(k * per_client + i) % len(prompts)], "max_tokens": new_tokens,
                           "temperature": 0}) for i in range(per_client)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        done = [r for rows in pool.map(client, range(clients)) for r in rows]
    wall = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _ in done)
    return {"clients": clients, "requests": len(done), "tokens": sum(t for _, t in done), "seconds": wall,
            "tokens_per_s": sum(t for _, t in done) / wall, "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]}


def bench_shape(name: str, path: Path, new_tokens: int, per_client: int, log: Path) -> dict:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lmkit", "serve", "-c", str(path), "--port", str(port),
                               "--max-batch", "16", "--max-queue", "64", "-q"], stderr=log.open("w"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=5).read()
                break
            except OSError:
                time.sleep(0.2)
        text = (DATA / "shakespeare_train.txt").read_text(encoding="utf-8").split("\n\n")
        prompts = [p[:40] for p in text if len(p) > 40][:64]  # ~12 tokens each
        url += "/v1/completions"
        load(url, 2, 1, 8, prompts)  # warm up
        rows = [load(url, clients, per_client, new_tokens, prompts) for clients in (1, 4, 16)]
        single = statistics.median([post(url, {"prompt": prompts[0], "max_tokens": new_tokens,
                                               "temperature": 0})[0] for _ in range(3)])
        burst = load(url, 16, 1, new_tokens, prompts)
        return {"shape": name, "new_tokens": new_tokens, "rows": rows, "single_s": single, "burst": burst,
                "speedup_16": rows[2]["tokens_per_s"] / rows[0]["tokens_per_s"],
                "burst_p99_over_single": burst["p99_s"] / single}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    text = (DATA / "shakespeare_train.txt").read_text(encoding="utf-8")
    tokenizer = train_tokenizer([split_lines(text)], args.out / "tokenizer.model", TokenizerConfig(vocab_size=8192))
    results = []
    for name, (flags, new_tokens) in SHAPES.items():
        path = make_checkpoint(args.out, flags, 8192, tokenizer)
        results.append(bench_shape(name, path, new_tokens, args.requests, args.out / f"serve-{len(results)}.log"))
        print(f"{name}: {results[-1]['speedup_16']:.2f}x at 16 clients", file=sys.stderr)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| model | clients | requests | tokens/s | vs 1 client | p50 latency | p99 latency |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for row in r["rows"]:
            print(f"| {r['shape']} | {row['clients']} | {row['requests']} | {row['tokens_per_s']:,.0f} | "
                  f"{row['tokens_per_s'] / r['rows'][0]['tokens_per_s']:.2f}x | {row['p50_s']:.2f} s | "
                  f"{row['p99_s']:.2f} s |")
        print(f"| {r['shape']} | burst of 16 | 16 | {r['burst']['tokens_per_s']:,.0f} | | {r['burst']['p50_s']:.2f} s"
              f" | {r['burst']['p99_s']:.2f} s = {r['burst_p99_over_single']:.1f}x one alone "
              f"({r['single_s']:.2f} s) |")


if __name__ == "__main__":
    main()
