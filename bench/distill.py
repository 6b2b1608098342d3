"""Does distillation beat training the small model alone? Two experiments on the sample data:

(a) GPT: a student with half the teacher's layers (initialised from every other teacher layer),
    and one with half its width (random init: what the soft targets alone give), each distilled
    from the teacher on the training corpus, vs the same student shape trained from scratch on the
    same data for the same steps; held-out bits per byte of each (and of the teacher).
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


def gpt_experiment(teacher: str, out: Path, shape: str) -> dict:
    """SHAPE "layers": every other teacher layer; "width": half the width, as many layers."""
    info = lmkit("info", teacher)
    info = info.get("latest", info)  # a project's info describes its latest checkpoint there
    if shape == "layers":
        layers = ",".join(str(i) for i in range(0, info["layers"], 2))
        student, overrides = ["--student-layers", layers], [f"model.n_layer={len(layers.split(','))}"]
    else:
        overrides = [f"model.d_model={info['model']['d_model'] // 2}"]
        student = ["--set", overrides[0]]
    corpus, heldout = str(DATA / "shakespeare_train.txt"), str(DATA / "shakespeare_heldout.txt")
    distilled, distill_seconds = timed("distill", corpus, "--teacher", teacher, *student,
                                       "-p", str(out / f"gpt-{shape}-distilled"), "-q")
    # The same student shape from scratch: the teacher's config and recipe, the student's shape.
    scratch, scratch_seconds = timed("pretrain", corpus, "-p", str(out / f"gpt-{shape}-scratch"), "--config",
                                     str(Path(info["checkpoint"]) / "config.json"),
                                     *[a for o in overrides for a in ("--set", o)], "-q")
    scores = {name: lmkit("eval", heldout, "-c", path, "-q")["bits_per_byte"] for name, path in
              [("teacher", teacher), ("distilled", distilled["best_checkpoint"] or distilled["checkpoint"]),
               ("scratch", scratch["checkpoint"])]}
    return {"student": " ".join(student), "heldout_bits_per_byte": scores, "summary": distilled["summary"],
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
    parser.add_argument("--gpt-students", default="layers,width", help="layers, width or both (comma-separated)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for shape in args.gpt_students.split(",") if args.gpt_teacher else []:
        if f"gpt-{shape}" not in results:
            results[f"gpt-{shape}"] = gpt_experiment(args.gpt_teacher, args.out, shape)
            results_file.write_text(json.dumps(results, indent=2))
            print(json.dumps(results[f"gpt-{shape}"]), flush=True)
    if args.classifier_teacher and "classifier" not in results:
        results["classifier"] = classifier_experiment(args.classifier_teacher, args.out)
        results_file.write_text(json.dumps(results, indent=2))
        print(json.dumps(results["classifier"]), flush=True)
    for shape in ("layers", "width"):
        if f"gpt-{shape}" in results:
            r = results[f"gpt-{shape}"]
            bpb, s = r["heldout_bits_per_byte"], r["summary"]
            print(f"GPT, student {r['student']} ({s['parameter_ratio']:.0%} of the parameters, {s['speedup']:.2f}x "
                  f"the speed): held-out bits per byte teacher {bpb['teacher']:.4f}, distilled "
                  f"{bpb['distilled']:.4f}, scratch {bpb['scratch']:.4f}")
    if "classifier" in results:
        r = results["classifier"]
        s = r["summary"]
        print(f"Genre classifier, student = teacher layers {r['layers']} ({s['parameter_ratio']:.0%} of the "
              f"parameters, {s['speedup']:.2f}x the speed): test accuracy teacher {r['test_accuracy']['teacher']:.3f},"
              f" student {r['test_accuracy']['student']:.3f}, retention {r['retention']:.1f}%")


if __name__ == "__main__":
    main()
