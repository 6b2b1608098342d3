"""Which architecture learns most in the same wall time? `lmkit pretrain` on the sample corpus,
one configuration after another (never two at once: they would share the cores), each with the
same time budget, scored by held-out bits per byte (`lmkit eval sample_data/shakespeare_heldout.txt`).
Every run starts from the same tokenizer and prepared data, trained once here.

    python bench/archs.py -o /tmp/archs --budget 300s                 # the default comparison
    python bench/archs.py -o /tmp/archs --budget 150s --rounds 2 \\
        --run "gpt=--arch gpt" --run "llama-muon=--arch llama --set train.optimizer=muon"

--rounds N repeats every configuration N times, taking turns, and reports the median. Results go
to OUT/results.json and a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
from pathlib import Path

from common import DATA, lmkit

DEFAULT_RUNS = ["gpt=--arch gpt", "llama=--arch llama", "llama-muon=--arch llama --set train.optimizer=muon"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, required=True, help="Folder for the projects and results.")
    parser.add_argument("--budget", default="300s", help="Training time of every run (lmkit's --time-budget).")
    parser.add_argument("--rounds", type=int, default=1, help="Runs of each configuration, taken in turns.")
    parser.add_argument("--run", action="append", help="NAME=PRETRAIN ARGS (repeatable; default: gpt, llama, "
                        "llama with Muon). The budget decides the length: --max-steps is set very high.")
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in (args.run or DEFAULT_RUNS))
    corpus, heldout = str(DATA / "shakespeare_train.txt"), str(DATA / "shakespeare_heldout.txt")
    base = args.out / "base"
    if not (base / "data").is_dir():
        lmkit("tokenize", "train", corpus, "-p", str(base), "-q")
        lmkit("tokenize", "prepare", corpus, "-p", str(base), "-q")

    results: dict[str, list[dict]] = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name, extra in runs.items():
            project = args.out / f"{name}-{round_}"
            shutil.rmtree(project, ignore_errors=True)
            for part in ("tokenizer", "data"):
                shutil.copytree(base / part, project / part)
            trained = lmkit("pretrain", "-p", str(project), "--time-budget", args.budget, "--max-steps", "1000000",
                            *shlex.split(extra), "-q")
            scored = lmkit("eval", heldout, "-p", str(project), "-q")
            results[name].append({"bits_per_byte": scored["bits_per_byte"], "steps": trained["step"],
                                  "tokens_per_sec": trained["tokens_per_sec"], "parameters": trained["parameters"],
                                  "elapsed": trained["elapsed"]})
    (args.out / "results.json").write_text(json.dumps({"budget": args.budget, "runs": runs, "results": results},
                                                      indent=2) + "\n")
    print(f"| configuration | held-out bits/byte (median of {args.rounds}) | steps | tokens/s | parameters |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        def median(key: str, rows: list[dict] = rows) -> float:
            return statistics.median(r[key] for r in rows)
        print(f"| {name}: `{runs[name]}` | {median('bits_per_byte'):.3f} | {median('steps'):.0f} | "
              f"{median('tokens_per_sec'):,.0f} | {rows[0]['parameters']:,} |")


if __name__ == "__main__":
    main()
