"""Does pretraining transfer? Finetune on the sample genre task (comedy / tragedy / history,
train/val/test split by play) from: a pretrained BERT, the same BERT shape from scratch, a
pretrained GPT, LoRA (rank 8) on the pretrained BERT, and the GPT shape from scratch -- the
same budget for each, a sweep of learning rates, the best learning rate picked on validation,
test accuracy and macro-F1 reported.

It drives the installed `lmkit` command, as a user would:

    python bench/transfer.py --bert BERT_PROJECT_OR_CKPT --gpt GPT_PROJECT_OR_CKPT -o /tmp/transfer

`--train-examples N` finetunes on a stratified sample of N training passages instead of all of
them: the few-labels regime, where transfer learning is expected to matter most.

Results go to OUT/results.jsonl (one line per run; finished runs are skipped when rerun) and a
markdown table to stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

from common import DATA, lmkit

SETUPS = {  # name -> (base flag, extra finetune arguments)
    "bert-pretrained": ("bert", []),
    "bert-scratch": ("bert", ["--scratch"]),
    "gpt-pretrained": ("gpt", []),
    "bert-lora8": ("bert", ["--lora-rank", "8"]),
    "gpt-scratch": ("gpt", ["--scratch"]),  # not asked for: does GPT pretraining transfer?
}


def run_one(name: str, lr: float, base: str, extra: list[str], out: Path, steps: int, batch: int,
            train: Path) -> dict:
    project = out / f"{name}-lr{lr:g}"
    start = time.monotonic()
    trained = lmkit("finetune", str(train), "--val", str(DATA / "genre_val.csv"),
                    "--from", base, "-p", str(project), "--max-steps", str(steps), "--set", f"train.lr={lr}",
                    "--set", f"train.min_lr={lr / 10}", "--set", f"train.batch_size={batch}", "-q", *extra)
    seconds = time.monotonic() - start
    test = lmkit("eval", "-p", str(project), str(DATA / "genre_test.csv"))
    info = lmkit("info", trained["best_checkpoint"])
    return {"setup": name, "lr": lr, "steps": steps, "batch": batch, "best_step": trained["best_step"],
            "val_accuracy": trained["best"], "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
            "trainable": info["trainable_parameters"], "parameters": info["parameters"],
            "seconds": round(seconds, 1)}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def stratified_sample(n: int, out: Path) -> Path:
    """Write n training rows, the same share of each label as the full set, to out; fixed seed."""
    rows = read_rows(DATA / "genre_train.csv")
    by_label: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row)
    rng = random.Random(0)
    sample = [row for group in by_label.values() for row in rng.sample(group, round(n * len(group) / len(rows)))]
    rng.shuffle(sample)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(sample)
    return out


def bag_of_words_accuracy(train: Path) -> float:
    """Test accuracy of multinomial naive Bayes on lower-cased words (add-one smoothing, uniform
    prior): what word counts alone tell about the genre, for scale."""
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z']+", text.lower())

    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for row in read_rows(train):
        counts[row["label"]].update(words(row["text"]))
    vocab = len(set().union(*counts.values()))
    totals = {label: sum(c.values()) for label, c in counts.items()}

    def predict(text: str) -> str:
        return max(counts, key=lambda label: sum(math.log((counts[label][w] + 1) / (totals[label] + vocab))
                                                 for w in words(text)))

    test = read_rows(DATA / "genre_test.csv")
    return sum(predict(row["text"]) == row["label"] for row in test) / len(test)


def table(results: list[dict]) -> str:
    lines = ["| setup | lr | best step | val acc | test acc | test macro-F1 | trainable | time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        share = f"{r['trainable']:,} ({r['trainable'] / r['parameters']:.1%})"
        lines.append(f"| {r['setup']} | {r['lr']:g} | {r['best_step']} | {r['val_accuracy']:.3f} | "
                     f"{r['test_accuracy']:.3f} | {r['test_macro_f1']:.3f} | {share} | {r['seconds']:.0f}s |")
    lines += ["", "Picked on validation accuracy:", "",
              "| setup | lr | test acc | test macro-F1 |", "|---|---|---|---|"]
    for name in dict.fromkeys(r["setup"] for r in results):
        best = max((r for r in results if r["setup"] == name), key=lambda r: r["val_accuracy"])
        lines.append(f"| {name} | {best['lr']:g} | {best['test_accuracy']:.3f} | {best['test_macro_f1']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bert", required=True, help="pretrained BERT: a project, run or checkpoint folder")
    parser.add_argument("--gpt", required=True, help="pretrained GPT: a project, run or checkpoint folder")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="comma-separated learning rates")
    parser.add_argument("--train-examples", type=int, help="finetune on a stratified sample of this many")
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated, from: " + ", ".join(SETUPS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.jsonl"
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    bases = {"bert": args.bert, "gpt": args.gpt}
    train = DATA / "genre_train.csv"
    if args.train_examples:
        train = stratified_sample(args.train_examples, args.out / f"genre_train_{args.train_examples}.csv")
    for name in args.setups.split(","):
        arch, extra = SETUPS[name]
        for lr in (float(x) for x in args.lrs.split(",")):
            if any(r["setup"] == name and r["lr"] == lr and r["steps"] == args.steps for r in results):
                continue
            result = run_one(name, lr, bases[arch], extra, args.out, args.steps, args.batch, train)
            results.append(result)
            with results_file.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
    print(table([r for r in results if r["steps"] == args.steps]))
    print(f"\nFor scale: naive Bayes on word counts (same training rows), test accuracy "
          f"{bag_of_words_accuracy(train):.3f}; chance 0.333.")


if __name__ == "__main__":
    main()
