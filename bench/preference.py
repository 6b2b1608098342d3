"""Does preference tuning pay? Sample preference pairs from the plays' splits, then measure how
often a model scores the real reply above its own sample, before and after DPO and SimPO
(issue 30, item 5):

    python bench/preference.py -o OUT              # stages 1-3, each skipped when its output exists
    python bench/preference.py -o OUT --dry-run    # print the commands instead of running them

1. The starting model: a GPT (context 128, batch 16, 600 steps: a fixed count, so that a rerun
   trains the same model) pretrained on shakespeare_pretrain.txt (the 28 plays of the tasks' train split, so the
   val and test plays are new to it), then `--task instruct` on speech_train.jsonl (prompt: a cue
   speech with the speakers' names; completion: the next speech; the recipe's 500 steps of 16),
   validated on speech_val.jsonl; its best checkpoint is the starting model.
2. Pairs: the first --pairs prompts of speech_{train,val,test}.jsonl in file order (the rows are
   shuffled already). "chosen" is the real next speech; "rejected" the starting model's own reply
   to the same prompt, sampled at temperature 1.0 (top-p 0.95, the default) until EOS or the blank
   line that starts the next speech, at most 80 new tokens; prompt i of a split (0-based) is sampled
   with seed i. Pairs whose reply is empty or the real one are dropped and counted; replies cut at
   the token limit are kept and counted. OUT/pairs_{train,val,test}.jsonl: {"prompt", "chosen",
   "rejected"}; OUT/samples_SPLIT.jsonl keeps every reply with its seed and finish reason.
3. The measurement: `lmkit eval` of the starting model on pairs_test; `lmkit finetune --task dpo`
   (sigmoid, beta 0.1) and with `dpo.loss=simpo` from the starting model on pairs_train (validated
   on pairs_val), each evaluated on pairs_test with the starting model as reference. The flags are
   in STAGE3 and EVAL_KEYS below, to adjust if the commands' final spelling differs.

It drives the `lmkit` on PATH (run it with PYTHONPATH at a checkout to use that one's code) and
samples with the library. On a machine shared with other jobs, OMP_NUM_THREADS=1 trains faster
(measured here with two other test runs on 2 cores: instruct steps 1.3-5 s with two threads, 0.5 s
with one).
Every stage's settings, wall time and result go to OUT/preference.json; the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from common import DATA

PRETRAIN = ["--arch", "gpt", "--set", "model.max_seq_len=128", "--set", "train.batch_size=16",
            "--max-steps", "600", "--seed", "0"]
INSTRUCT = ["--task", "instruct", "--seed", "0"]  # the instruct recipe: 500 steps of 16, lr 3e-4
# As `lmkit generate --temperature 1.0 --top-p 0.95 --max-new-tokens 80 --stop "\n\n"`: the real
# replies are 29 tokens long at the median (with EOS), 58 at the 75th percentile, 110 at the 90th;
# with 80 new tokens a prompt keeps its last 48 (the median prompt has 45). seed: of prompt 0
GENERATE = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 80, "stop": ("\n\n",), "seed": 0}
BATCH = 32  # prompts decoded together
PAIRS = {"train": 1500, "val": 200, "test": 400}  # prompts taken from the start of each split
CHUNK = 200  # prompts per step of progress (and resume point)

# Stage 3: the commands of issue 30 items 4 and 5, as planned; {placeholders} are filled in.
STAGE3 = {
    "eval": ["eval", "{pairs}", "-c", "{model}"],
    "reference": ["--reference", "{reference}"],  # added to "eval" for a tuned model
    "finetune": ["finetune", "{train}", "--task", "dpo", "--from", "{start}", "--val", "{val}",
                 "-p", "{project}", "--seed", "0"],
}
VARIANTS = {  # name -> extra finetune flags
    "dpo": ["--set", "dpo.loss=sigmoid", "--set", "dpo.beta=0.1"],
    "simpo": ["--set", "dpo.loss=simpo"],
}
EVAL_KEYS = {  # what this script calls it -> the key in `lmkit eval --json`
    "accuracy": "accuracy",  # chosen above rejected by mean log-likelihood per token: the headline
    "accuracy_summed": "accuracy_summed",  # by summed log-likelihood
    "chosen_logp": "chosen_logp_per_token",
    "rejected_logp": "rejected_logp_per_token",
    "reward_accuracy": "reward_accuracy",  # with --reference: DPO's implicit reward
    "reward_margin": "reward_margin",
}


class Runner:
    """Runs `lmkit ARGS` (or, with dry_run, prints it) and records wall times."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run

    def lmkit(self, *args: str) -> tuple[dict, float]:
        """`lmkit ARGS --json`: its last stdout line, parsed, and the seconds it took."""
        command = ["lmkit", *args, "--json"]
        if self.dry_run:
            print("+ " + shlex.join(command), flush=True)
            return {}, 0.0
        start = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.monotonic() - start
        if done.returncode != 0:
            raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.splitlines()[-1]), seconds


class Record:
    """OUT/preference.json: every stage's settings, times and results, saved after each change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}

    def __getitem__(self, key: str) -> dict:
        return self.data[key]

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def set(self, key: str, value: dict) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)


def train(run: Runner, record: Record, key: str, args: list[str]) -> str:
    """Run a training command once (RECORD[KEY] marks it done); the checkpoint to go on from."""
    if key not in record:
        result, seconds = run.lmkit(*args, "-q")
        if run.dry_run:
            return f"<{key} checkpoint>"
        record.set(key, {"command": ["lmkit", *args], "seconds": round(seconds, 1), "result": result})
        print(f"{key}: {seconds:.0f}s, {result.get('step')} steps", file=sys.stderr, flush=True)
    result = record[key]["result"]
    return result.get("best_checkpoint") or result["checkpoint"]


def starting_model(run: Runner, record: Record, out: Path) -> str:
    """Stage 1: pretrain, then instruct-finetune; the instruct checkpoint."""
    base = train(run, record, "pretrain", ["pretrain", str(DATA / "shakespeare_pretrain.txt"),
                                           "-p", str(out / "pretrain"), *PRETRAIN])
    return train(run, record, "instruct", ["finetune", str(DATA / "speech_train.jsonl"), "--from", base,
                                           "--val", str(DATA / "speech_val.jsonl"),
                                           "-p", str(out / "instruct"), *INSTRUCT])


def read_prompts(split: str, n: int) -> list[dict]:
    with open(DATA / f"speech_{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def sample_replies(run: Runner, start: str, rows: list[dict], samples: Path) -> list[dict]:
    """The starting model's reply to each row's prompt, appended to SAMPLES (one JSON object a
    prompt) CHUNK prompts at a time, so that an interrupted stage goes on where it was.

    Decoded with lmkit.batching.Engine, the continuous batching of `lmkit serve`: BATCH prompts
    decode together, each sampled exactly as `lmkit generate --seed I` samples it alone (one prompt
    at a time was ~30x slower here: 20 prompts in 50 s against 64 in 6 s). The engine keeps prompt
    and reply inside the context, so a prompt longer than max_seq_len - max_new_tokens loses its
    beginning (finetuning cuts long prompts the same way), where `lmkit generate` would slide."""
    done = [json.loads(line) for line in samples.read_text().splitlines()] if samples.exists() else []
    if run.dry_run:
        print(f"+ sample {len(rows)} replies from {start} with {GENERATE}, {BATCH} prompts at a time", flush=True)
        return []
    if len(done) == len(rows):
        return done
    import torch

    from lmkit import batching
    from lmkit import checkpoint as ckpt_lib
    from lmkit import generate as gen

    ckpt = ckpt_lib.Checkpoint(Path(start))
    model, tokenizer = ckpt.model().eval(), ckpt.tokenizer()
    cfg = gen.sample_config(ckpt.config.model.arch, **GENERATE)
    keep = ckpt.config.model.max_seq_len - cfg.max_new_tokens  # prompt tokens that fit beside a reply
    engine = batching.Engine(model, tokenizer, torch.device("cpu"), max_batch=BATCH, max_queue=CHUNK)
    try:
        for first in range(len(done), len(rows), CHUNK):
            begin, chunk = time.monotonic(), rows[first:first + CHUNK]
            # prompt i of the split gets seed i: with one seed for all, a weak model's replies to
            # different prompts come out nearly the same (the same random draws decide them)
            jobs = [(tokenizer.encode_document(row["prompt"])[-keep:], replace(cfg, seed=cfg.seed + first + i))
                    for i, row in enumerate(chunk)]
            replies = _decode(engine, jobs, tokenizer.stop_ids)
            with samples.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(reply) + "\n" for reply in replies)
            done += replies
            print(f"  {samples.stem}: {len(done)}/{len(rows)} replies ({time.monotonic() - begin:.0f}s for "
                  f"{len(chunk)})", file=sys.stderr, flush=True)
    finally:
        engine.close()
    return done


def _decode(engine: object, jobs: list[tuple[list[int], object]], stop_ids: list[int]) -> list[dict]:
    """Each of JOBS (prompt ids, SampleConfig) continued by ENGINE (an lmkit.batching.Engine); its reply."""
    import threading

    from lmkit import batching

    replies: list[dict] = [{}] * len(jobs)
    errors: list[str] = []
    finished = threading.Semaphore(0)  # the callbacks run on the engine's thread

    def on_done(found: list, seed: int, i: int) -> None:
        replies[i] = {"text": found[0].text, "tokens": len(found[0].tokens), "finish_reason": found[0].finish_reason,
                      "seed": seed}
        finished.release()

    def on_error(message: str) -> None:
        errors.append(message)
        finished.release()

    for i, (ids, cfg) in enumerate(jobs):
        engine.submit(batching.Job(ids, cfg, stop_ids, on_done=lambda found, seed, i=i: on_done(found, seed, i),
                                   on_error=on_error))
    for _ in jobs:
        finished.acquire()
    if errors:
        raise SystemExit(f"sampling failed: {errors[0]}")
    return replies


def make_pairs(run: Runner, record: Record, start: str, out: Path, split: str, n: int) -> None:
    """Stage 2 for one split: OUT/pairs_SPLIT.jsonl and its counts in the record."""
    path = out / f"pairs_{split}.jsonl"
    if path.exists():
        return
    rows = read_prompts(split, n)
    begin = time.monotonic()
    replies = sample_replies(run, start, rows, out / f"samples_{split}.jsonl")
    if run.dry_run:
        return
    kept, empty, same, truncated = [], 0, 0, 0
    for row, reply in zip(rows, replies):
        text = reply["text"].strip()
        if not text:
            empty += 1
        elif text == row["completion"].strip():
            same += 1
        else:
            kept.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": text})
            truncated += reply["finish_reason"] == "length"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in kept), encoding="utf-8")
    tmp.replace(path)
    pairs = record["pairs"] if "pairs" in record else {}
    pairs[split] = {"prompts": len(rows), "kept": len(kept), "dropped_empty": empty, "dropped_same": same,
                    "kept_truncated": truncated, "mean_reply_tokens": round(sum(r["tokens"] for r in replies)
                                                                          / max(1, len(replies)), 1),
                    "seconds": round(time.monotonic() - begin, 1)}  # this session's share when resumed
    record.set("pairs", pairs)
    print(f"pairs_{split}: {json.dumps(pairs[split])}", file=sys.stderr, flush=True)


def fill(template: list[str], **values: str) -> list[str]:
    return [part.format(**values) for part in template]


def evaluate(run: Runner, model: str, pairs: Path, reference: str | None) -> dict:
    extra = fill(STAGE3["reference"], reference=reference) if reference else []
    result, seconds = run.lmkit(*fill(STAGE3["eval"], pairs=str(pairs), model=model), *extra)
    return {"raw": result, "seconds": round(seconds, 1),
            **{name: result.get(key) for name, key in EVAL_KEYS.items()}}


def measure(run: Runner, record: Record, start: str, out: Path) -> dict:
    """Stage 3: the starting model, DPO and SimPO on the test pairs (each model once)."""
    results = record["results"] if "results" in record else {}
    test = out / "pairs_test.jsonl"
    if "start" not in results:
        results["start"] = {"checkpoint": start, **evaluate(run, start, test, None)}
        run.dry_run or record.set("results", results)
    for name, flags in VARIANTS.items():
        if name in results:
            continue
        tuned = train(run, record, name, [*fill(STAGE3["finetune"], train=str(out / "pairs_train.jsonl"),
                                                 start=start, val=str(out / "pairs_val.jsonl"),
                                                 project=str(out / name)), *flags])
        results[name] = {"checkpoint": tuned, **evaluate(run, tuned, test, start)}
        run.dry_run or record.set("results", results)
    return results


def table(results: dict) -> str:
    def number(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    before = results["start"]["chosen_logp"]
    lines = ["| model | preference accuracy (per token) | (summed) | chosen logp/token | change | "
             "rejected logp/token | reward accuracy | reward margin |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        change = None if r["chosen_logp"] is None or before is None else r["chosen_logp"] - before
        lines.append(f"| {name} | {number(r['accuracy'], '.1%')} | {number(r['accuracy_summed'], '.1%')} | "
                     f"{number(r['chosen_logp'], '.3f')} | {number(change, '+.3f')} | "
                     f"{number(r['rejected_logp'], '.3f')} | {number(r['reward_accuracy'], '.1%')} | "
                     f"{number(r['reward_margin'], '.3f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--pairs", default=",".join(f"{k}={v}" for k, v in PAIRS.items()), metavar="SPLIT=N,...",
                        help="prompts taken from the start of each split (default: %(default)s)")
    parser.add_argument("--stages", default="2,3",
                        help="stages to run after stage 1, which runs whenever its results are missing (default: "
                        "%(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the lmkit commands, run nothing")
    args = parser.parse_args()
    counts = {split: int(n) for split, n in (item.split("=") for item in args.pairs.split(","))}
    stages = set(args.stages.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    run, record = Runner(args.dry_run), Record(args.out / "preference.json")
    record.data["settings"] = {"pretrain": PRETRAIN, "instruct": INSTRUCT, "generate": GENERATE, "batch": BATCH,
                               "pairs": counts, "stage3": STAGE3, "variants": VARIANTS}
    start = starting_model(run, record, args.out)  # skipped when recorded
    print(f"starting model: {start}", file=sys.stderr)
    if "2" in stages:
        for split, n in counts.items():
            make_pairs(run, record, start, args.out, split, n)
    if "3" in stages:
        results = measure(run, record, start, args.out)
        if not args.dry_run:
            print(table(results))


if __name__ == "__main__":
    main()
