"""Does pretraining pay? Finetune one pretrained model and the same shape from scratch on the
sample tasks, with the same steps and batch, a learning-rate sweep for each side, the learning
rate picked on validation and the test set scored once per run:

    lmkit pretrain sample_data/shakespeare_pretrain.txt -p xfer --preset long   # 23 min, 2 CPU cores
    python bench/transfer.py --base xfer -o OUT --seeds 0 --setups pretrained,scratch   # genre, all labels
    python bench/transfer.py --base xfer -o OUT --seeds 0 --setups pretrained-ld,lora --poolings auto
    python bench/transfer.py --base xfer -o OUT --seeds 0 --train-examples 900 --steps 300 --poolings auto
    python bench/transfer.py --base xfer -o OUT --seeds 0 --task speech --batch 16 --setups pretrained,scratch

(the README's transfer table came from these).

Setups: `pretrained` (every weight trained), `scratch` (`lmkit finetune --scratch`: the base's shape
and tokenizer, fresh weights), `pretrained-ld` (discriminative learning rates,
`train.layer_lr_decay=0.6`) and `lora` (`--lora-rank 8 --lora-targets all` on the pretrained
model: the adapters and the head only). For each setup, every learning rate of --lrs (and for
the classifier every --poolings: the last token's state or the mean of all) runs with seed 0; the
one with the best validation score then runs with the other --seeds too, and the table
gives the mean (and spread) of their test scores. Genre: accuracy on genre_test.csv (6 plays in no
pretraining text); for scale, naive Bayes on word counts of the same training rows. Speech: loss per
completion token on speech_test.jsonl (lower is better).

`pretrain` on shakespeare_pretrain.txt (every play of the task train split) means the val and test
plays of every task are new to the model. Results go to OUT/results.jsonl, one line per run
(finished runs are skipped when rerun), and a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import re
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

from common import DATA, lmkit

SETUPS = {  # name -> (extra finetune arguments, learning rates swept)
    "pretrained": ([], "3e-4,1e-3"),
    "scratch": (["--scratch"], "1e-3,3e-3"),  # fresh weights take larger rates
    # discriminative learning rates: each layer down from the head at 0.6x the rate of the one above
    "pretrained-ld": (["--set", "train.layer_lr_decay=0.6"], "1e-3,3e-3"),
    "lora": (["--lora-rank", "8", "--lora-targets", "all"], "3e-3"),
}
TASKS = {  # name -> (finetune task, train, val, test, validation metric, higher is better)
    "genre": ("classify", "genre_train.csv", "genre_val.csv", "genre_test.csv", "val_accuracy", True),
    "speech": ("instruct", "speech_train.jsonl", "speech_val.jsonl", "speech_test.jsonl", "val_loss", False),
}


def test_score(task: str, checkpoint: str) -> float:
    """Genre: accuracy with `lmkit eval`. Speech: loss per completion token of the test pairs,
    computed as in validation (`lmkit eval` scores running text, not prompt/completion pairs)."""
    if task == "genre":
        return lmkit("eval", "-c", checkpoint, str(DATA / TASKS[task][3]))["accuracy"]
    import torch

    from lmkit import checkpoint as ckpt_lib
    from lmkit import finetune_data, objectives

    ckpt = ckpt_lib.Checkpoint(Path(checkpoint))
    model, tokenizer = ckpt.model().eval(), ckpt.tokenizer()
    pairs = finetune_data.encode_prompt_completions(finetune_data.read_prompt_completions(DATA / TASKS[task][3]), tokenizer,
                                            ckpt.config.model.max_seq_len)
    batches = finetune_data.fixed_batches(pairs, 32, finetune_data.collate_prompt_completions(tokenizer.pad_id))
    with torch.no_grad():
        return objectives.causal_lm_metrics(model, batches)["val_loss"]


def run_one(args: argparse.Namespace, setup: str, lr: float, pooling: str | None, seed: int, train: Path) -> dict:
    kind, _, val, _, metric, _ = TASKS[args.task]
    name = f"{args.task}-{args.train_examples or 'all'}-{setup}-lr{lr:g}{f'-{pooling}' if pooling else ''}-seed{seed}"
    project = args.out / name
    start = time.monotonic()
    pooling_flags = ["--set", f"model.pooling={pooling}"] if pooling else []
    trained = lmkit("finetune", str(train), "--task", kind, "--val", str(DATA / val), "--from", args.base,
                    "-p", str(project), "--max-steps", str(args.steps), "--seed", str(seed),
                    "--set", f"train.lr={lr}", "--set", f"train.min_lr={lr / 10}",
                    "--set", f"train.batch_size={args.batch}", *pooling_flags, "-q", *SETUPS[setup][0])
    seconds = time.monotonic() - start
    info = lmkit("info", trained["best_checkpoint"])
    return {"task": args.task, "examples": args.train_examples, "setup": setup, "lr": lr, "seed": seed,
            "steps": args.steps, "batch": args.batch, "pooling": pooling,
            "best_step": trained["best_step"], "val": trained["best"], "metric": metric,
            "test": test_score(args.task, trained["best_checkpoint"]),
            "trainable": info["trainable_parameters"], "parameters": info["parameters"], "seconds": round(seconds, 1)}


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


def sample_pairs(n: int, out: Path) -> Path:
    """Write the first n prompt/completion pairs of speech_train.jsonl (rows are shuffled) to out."""
    lines = (DATA / "speech_train.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def naive_bayes_accuracy(train: Path) -> float:
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


def picked(runs: list[dict], higher_is_better: bool) -> tuple[float, str | None]:
    """The (learning rate, pooling) whose seed-0 run scored best on validation."""
    best = (max if higher_is_better else min)((r for r in runs if r["seed"] == 0), key=lambda r: r["val"])
    return best["lr"], best["pooling"]


def table(results: list[dict], task: str) -> str:
    higher = TASKS[task][5]
    score = "test accuracy" if task == "genre" else "test loss / token"
    lines = ["| setup | lr | pooling | seed | best step | val | test | trainable | time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        share = f"{r['trainable']:,} ({r['trainable'] / r['parameters']:.1%})"
        lines.append(f"| {r['setup']} | {r['lr']:g} | {r['pooling'] or '-'} | {r['seed']} | {r['best_step']} | "
                     f"{r['val']:.3f} | {r['test']:.3f} | {share} | {r['seconds']:.0f}s |")
    lines += ["", f"Learning rate and pooling picked on validation; {score}, mean over seeds (min-max):", "",
              f"| setup | lr | pooling | seeds | {score} |", "|---|---|---|---|---|"]
    for setup in dict.fromkeys(r["setup"] for r in results):
        runs = [r for r in results if r["setup"] == setup]
        lr, pooling = picked(runs, higher)
        tests = [r["test"] for r in runs if (r["lr"], r["pooling"]) == (lr, pooling)]
        lines.append(f"| {setup} | {lr:g} | {pooling or '-'} | {len(tests)} | {statistics.mean(tests):.3f} "
                     f"({min(tests):.3f}-{max(tests):.3f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the pretrained model: a project, run or checkpoint folder")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--task", choices=TASKS, default="genre")
    parser.add_argument("--steps", type=int, help="finetuning steps (default: 600 genre, 500 speech)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lrs", action="append", default=[], metavar="SETUP=LR,LR",
                        help="learning rates to sweep for SETUP (repeatable; defaults: " +
                        ", ".join(f"{name}={lrs}" for name, (_, lrs) in SETUPS.items()) + ")")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the picked learning rate (seed 0 sweeps)")
    parser.add_argument("--train-examples", type=int, help="finetune on a sample of this many training rows")
    parser.add_argument("--poolings", default="auto,mean",
                        help="genre: the classifier's model.pooling values to sweep (auto: the last token; mean)")
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated, from: " + ", ".join(SETUPS))
    args = parser.parse_args()
    args.steps = args.steps or (600 if args.task == "genre" else 500)
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.jsonl"
    done = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    train = DATA / TASKS[args.task][1]
    if args.train_examples:
        sample = stratified_sample if args.task == "genre" else sample_pairs
        train = sample(args.train_examples, args.out / f"{args.task}_train_{args.train_examples}{train.suffix}")
    poolings = args.poolings.split(",") if TASKS[args.task][0] == "classify" else [None]

    def results_for(setup: str) -> list[dict]:
        want = {"task": args.task, "examples": args.train_examples, "setup": setup, "steps": args.steps,
                "batch": args.batch}
        return [r for r in done if all(r[k] == v for k, v in want.items()) and r["pooling"] in poolings]

    def ensure(setup: str, lr: float, pooling: str | None, seed: int) -> None:
        if any((r["lr"], r["pooling"], r["seed"]) == (lr, pooling, seed) for r in results_for(setup)):
            return
        result = run_one(args, setup, lr, pooling, seed, train)
        done.append(result)
        with results_file.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)

    setups = args.setups.split(",")
    lrs = {name: default for name, (_, default) in SETUPS.items()} | dict(item.split("=", 1) for item in args.lrs)
    for setup in setups:
        for lr in (float(x) for x in lrs[setup].split(",")):
            for pooling in poolings:
                ensure(setup, lr, pooling, 0)
        lr, pooling = picked(results_for(setup), TASKS[args.task][5])
        for seed in (int(s) for s in args.seeds.split(",")):
            ensure(setup, lr, pooling, seed)
    print(table([r for s in setups for r in results_for(s)], args.task))
    if args.task == "genre":
        print(f"\nFor scale: naive Bayes on word counts (same training rows), test accuracy "
              f"{naive_bayes_accuracy(train):.3f}; chance 0.333.")


if __name__ == "__main__":
    main()
