"""Does denoising pretraining help the encoder-decoder? The sample spelling task (First Folio line
-> the same line in modern spelling; train, val and test split by play): copying the source
unchanged (the baseline to beat), a seq2seq model trained from scratch, and the same shape
pretrained by text infilling then finetuned -- the same finetuning budget for both, each decoded
greedily and with beam search, scored with sacrebleu's BLEU and chrF and exact match.

    python bench/seq2seq.py --pretrained SEQ2SEQ_PROJECT_OR_CKPT -o /tmp/spelling

Results go to OUT/results.jsonl (finished runs are skipped when rerun) and a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import DATA, lmkit

SETUPS = {"scratch": ["--scratch"], "pretrained": []}


def finetune(name: str, base: str, out: Path, steps: int, batch: int, lr: float) -> tuple[str, float]:
    """Finetune; (its best checkpoint, training seconds)."""
    start = time.monotonic()
    trained = lmkit("finetune", str(DATA / "spelling_train.tsv"), "--task", "seq2seq",
                    "--val", str(DATA / "spelling_val.tsv"), "--from", base, "-p", str(out / name),
                    "--max-steps", str(steps), "--set", f"train.batch_size={batch}", "--set", f"train.lr={lr}",
                    "--set", f"train.min_lr={lr / 10}", "-q", *SETUPS[name])
    return trained["best_checkpoint"], time.monotonic() - start


def score(checkpoint: str, beam: int) -> dict:
    return lmkit("eval", str(DATA / "spelling_test.tsv"), "-c", checkpoint, "--beam", str(beam), "-q")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", required=True, help="a seq2seq project, run or checkpoint (denoising)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beam", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.jsonl"
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    for name in SETUPS:
        if any(r["setup"] == name for r in results):
            continue
        best, seconds = finetune(name, args.pretrained, args.out, args.steps, args.batch, args.lr)
        for beam in (1, args.beam):
            report = score(best, beam)
            result = {"setup": name, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                      "train_seconds": round(seconds, 1), **report}
            results.append(result)
            with results_file.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
    first = results[0]
    lines = ["| system | decoding | BLEU | chrF | exact match | finetune time | decode time |",
             "|---|---|---|---|---|---|---|",
             f"| copy the source | - | {first['copy_bleu']:.1f} | {first['copy_chrf']:.1f} | "
             f"{first['copy_exact_match']:.3f} | - | - |"]
    lines += [f"| {r['setup']} | {r['decoding']} | {r['bleu']:.1f} | {r['chrf']:.1f} | {r['exact_match']:.3f} | "
              f"{r['train_seconds']:.0f}s | {r['seconds']:.0f}s |" for r in results]
    print("\n".join(lines))
    print(f"\n{first['pairs']} test pairs; {args.steps} finetuning steps of batch {args.batch} at lr {args.lr:g}; "
          f"BLEU {first['bleu_signature']}")


if __name__ == "__main__":
    main()
