"""`lmkit tokenize prepare` at scale: a generated corpus of SIZE MB (the sample plays repeated, in
files of ~64 MB, one of them gzipped), encoded with 1 and with 2 worker processes; wall time,
MB/s, tokens/s and peak resident memory of each run (the command and its workers).

    python bench/prepare_scale.py --tokenizer-from PROJECT --size-mb 1024 -o /tmp/prepare_scale
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from common import DATA


def make_corpus(folder: Path, size_mb: int) -> int:
    """Write ~SIZE_MB of text under FOLDER; returns the bytes written (uncompressed)."""
    text = (DATA / "shakespeare_all.txt").read_bytes()
    per_file = 64 * 1024 * 1024
    folder.mkdir(parents=True, exist_ok=True)
    written, index = 0, 0
    while written < size_mb * 1024 * 1024:
        chunk = text * (per_file // len(text))
        if index == 0:
            with gzip.open(folder / f"part-{index:03d}.txt.gz", "wb", compresslevel=1) as f:
                f.write(chunk)
        else:
            (folder / f"part-{index:03d}.txt").write_bytes(chunk)
        written += len(chunk)
        index += 1
    return written


def run(args: list[str]) -> tuple[str, float, float]:
    """(stdout, seconds, peak RSS in MB of the process and the workers it waited for)."""
    start = time.monotonic()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - start
    out = process.stdout.read() if process.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed: {process.stderr.read() if process.stderr else ''}")
    return out, seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer-from", required=True, type=Path, help="a project whose tokenizer to use")
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    corpus = args.out / "corpus"
    size = make_corpus(corpus, args.size_mb) if not corpus.is_dir() else sum(
        f.stat().st_size for f in corpus.iterdir())
    results = []
    for workers in (1, 2):
        project = args.out / f"project-{workers}"
        (project / "tokenizer").mkdir(parents=True, exist_ok=True)
        shutil.copy(args.tokenizer_from / "tokenizer" / "tokenizer.model", project / "tokenizer")
        out, seconds, rss = run(["lmkit", "tokenize", "prepare", str(corpus), "-p", str(project), "--force",
                                 "--workers", str(workers), "-q"])
        tokens = sum(json.loads((project / "data" / f"{s}.json").read_text())["tokens"] for s in ("train", "val"))
        mb = sum(json.loads((project / "data" / f"{s}.json").read_text())["bytes"] for s in ("train", "val")) / 1e6
        result = {"workers": workers, "seconds": round(seconds, 1), "mb": round(mb, 1),
                  "mb_per_s": round(mb / seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds),
                  "peak_rss_mb": round(rss, 1)}
        results.append(result)
        print(json.dumps(result), flush=True)
    print("\n| workers | MB | seconds | MB/s | tokens/s | peak RSS |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workers']} | {r['mb']:,.0f} | {r['seconds']:.0f} | {r['mb_per_s']:.1f} | "
              f"{r['tokens_per_s']:,} | {r['peak_rss_mb']:.0f} MB |")
    print(f"\ncorpus: {size / 1e6:,.0f} MB in {len(list(corpus.iterdir()))} files under {corpus}")


if __name__ == "__main__":
    main()
