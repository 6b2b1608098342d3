"""Does distillation beat training the small model alone? Two experiments on the sample data:

(a) GPT: a student with half the teacher's layers, distilled from the teacher on the training
    corpus, vs the same student shape trained from scratch on the same data for the same steps;
    held-out bits per byte of each (and of the teacher).
(b) Genre classifier: a finetuned BERT teacher; a student with half its layers distilled on the
    genre task; test accuracy retention, parameter ratio and measured speedup.

    python bench/distill.py --gpt-teacher DEMO_PROJECT --classifier-teacher GENRE_PROJECT -o /tmp/distill

It drives the installed `lmkit`; results go to OUT/results.json and a markdown summary to stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import DATA, lmkit


def timed(*args: str) -> tuple[dict, float]:
    start = time.monotonic()
    result = lmkit(*args)
    return result, time.monotonic() - start


def gpt_experiment(teacher: str, out: Path) -> dict:
    info = lmkit("info", teacher)
    info = info.get("latest", info)  # a project's info describes its latest checkpoint there
    layers = ",".join(str(i) for i in range(0, info["layers"], 2))
    corpus, heldout = str(DATA / "shakespeare_train.txt"), str(DATA / "shakespeare_heldout.txt")
    distilled, distill_seconds = timed("distill", corpus, "--teacher", teacher, "--student-layers", layers,
                                       "-p", str(out / "gpt-distilled"), "-q")
    # The same student shape from scratch: the teacher's config with fewer layers, the same recipe.
    scratch, scratch_seconds = timed("pretrain", corpus, "-p", str(out / "gpt-scratch"), "--config",
                                     str(Path(info["checkpoint"]) / "config.json"), "--set",
                                     f"model.n_layer={len(layers.split(','))}", "-q")
    scores = {name: lmkit("eval", heldout, "-c", path, "-q")["bits_per_byte"] for name, path in
              [("teacher", teacher), ("distilled", distilled["best_checkpoint"] or distilled["checkpoint"]),
               ("scratch", scratch["checkpoint"])]}
    return {"layers": layers, "heldout_bits_per_byte": scores, "summary": distilled["summary"],
            "seconds": {"distill": round(distill_seconds), "scratch": round(scratch_seconds)}}


def classifier_experiment(teacher: str, out: Path) -> dict:
    info = lmkit("info", teacher)
    info = info.get("latest", info)  # a project's info describes its latest checkpoint there
    layers = ",".join(str(i) for i in range(0, info["layers"], 2))
    train, val, test = (str(DATA / f"genre_{split}.csv") for split in ("train", "val", "test"))
    distilled, seconds = timed("distill", train, "--val", val, "--teacher", teacher, "--student-layers", layers,
                               "-p", str(out / "genre-distilled"), "-q")
    accuracy = {name: lmkit("eval", test, "-c", path, "-q")["accuracy"] for name, path in
                [("teacher", teacher), ("student", distilled["best_checkpoint"])]}
    return {"layers": layers, "test_accuracy": accuracy,
            "retention": round(100 * accuracy["student"] / accuracy["teacher"], 2),
            "summary": distilled["summary"], "seconds": round(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpt-teacher", help="a pretrained GPT: project, run or checkpoint")
    parser.add_argument("--classifier-teacher", help="a finetuned genre classifier: project, run or checkpoint")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.gpt_teacher:
        results["gpt"] = gpt_experiment(args.gpt_teacher, args.out)
        print(json.dumps(results["gpt"]), flush=True)
    if args.classifier_teacher:
        results["classifier"] = classifier_experiment(args.classifier_teacher, args.out)
        print(json.dumps(results["classifier"]), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    if "gpt" in results:
        r = results["gpt"]
        bpb, s = r["heldout_bits_per_byte"], r["summary"]
        print(f"\nGPT, student = teacher layers {r['layers']} ({s['parameter_ratio']:.0%} of the parameters, "
              f"{s['speedup']:.2f}x the speed): held-out bits per byte teacher {bpb['teacher']:.4f}, distilled "
              f"{bpb['distilled']:.4f}, scratch {bpb['scratch']:.4f}")
    if "classifier" in results:
        r = results["classifier"]
        s = r["summary"]
        print(f"Genre classifier, student = teacher layers {r['layers']} ({s['parameter_ratio']:.0%} of the "
              f"parameters, {s['speedup']:.2f}x the speed): test accuracy teacher {r['test_accuracy']['teacher']:.3f},"
              f" student {r['test_accuracy']['student']:.3f}, retention {r['retention']:.1f}%")


if __name__ == "__main__":
    main()
