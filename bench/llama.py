"""A SmolLM2-135M-shaped model (random weights, its real config) through lmkit and transformers:
peak memory of `lmkit import` and of greedy generation, and greedy decoding speed side by side.

    pip install -e '.[bench]'
    python bench/llama.py -o /tmp/smollm --repeats 3

1. Builds the model with transformers (30 layers, 576 wide, 9 heads, 3 KV heads, 1536 MLP, 49,152
   vocab, tied; fp32) and a byte-level BPE tokenizer, saved as a Hub directory.
2. Peak RSS (the kernel's own accounting of the maximum resident set) of `lmkit import`
   and of `lmkit generate --greedy --max-new-tokens 256`, each in a fresh process, against the
   target 1.5x the fp32 weights + 300 MB.
3. Batch 1, a 32-token prompt, 256 greedy tokens, fp32, the same weights: lmkit's generate vs
   transformers' model.generate(do_sample=False), taking turns, median of --repeats; the tokens
   must agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)


def build(out: Path) -> Path:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if (out / "model.safetensors").is_file():
        return out
    text = (Path(__file__).resolve().parent.parent / "sample_data" / "shakespeare_train.txt").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=8000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M))
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


_MEASURE = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True); "
            "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_mb(*args: str) -> float:
    """Peak resident set (MB) of `lmkit ARGS`, run under a fresh Python that reports its child's
    maximum (the kernel's accounting, in KiB on Linux)."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, "lmkit", *args], capture_output=True, text=True, check=True)
    code, kib = done.stdout.split()
    if code != "0":
        raise SystemExit(f"lmkit {' '.join(args)} failed with exit code {code}")
    return int(kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    source = build(args.out / "smollm2-135m-shaped")
    weights_mb = (source / "model.safetensors").stat().st_size / 1e6
    results: dict[str, object] = {"fp32_weights_mb": round(weights_mb), "target_mb": round(1.5 * weights_mb + 300)}
    project = args.out / "project"
    start = time.perf_counter()
    results["import_peak_rss_mb"] = round(peak_rss_mb("import", str(source), "-p", str(project), "-q"))
    results["import_seconds"] = round(time.perf_counter() - start, 1)
    results["generate_peak_rss_mb"] = round(peak_rss_mb("generate", "-p", str(project), "--greedy",
                                                        "--max-new-tokens", "256", "-q", "To be, or not to be"))
    results.update(speed(source, project, args.repeats))
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def speed(source: Path, project: Path, repeats: int) -> dict[str, object]:
    import transformers

    from lmkit import generate
    from lmkit.checkpoint import Checkpoint
    from lmkit.config import SampleConfig
    from lmkit.project import Project

    ckpt = Checkpoint(Project(project).latest_checkpoint())
    ours, tokenizer = ckpt.model(), ckpt.tokenizer()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    text = (Path(__file__).resolve().parent.parent / "sample_data" / "shakespeare_heldout.txt").read_text()
    ids = tokenizer.encode_document(text[:400])[:32]
    prompt = tokenizer.decode(ids)
    ids = tokenizer.encode_document(prompt)
    cfg = SampleConfig(greedy=True, max_new_tokens=256)
    times: dict[str, list[float]] = {"lmkit": [], "transformers": []}
    tokens: dict[str, list[int]] = {}
    for _ in range(repeats):
        start = time.perf_counter()
        tokens["lmkit"] = generate.generate(ours, tokenizer, prompt, cfg, torch.device("cpu")).samples[0].tokens
        times["lmkit"].append((time.perf_counter() - start) / len(tokens["lmkit"]))
        start = time.perf_counter()
        with torch.no_grad():
            out = theirs.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=256,
                                  eos_token_id=tokenizer.stop_ids)[0, len(ids):].tolist()
        tokens["transformers"] = [t for t in out if t not in tokenizer.stop_ids]
        times["transformers"].append((time.perf_counter() - start) / len(out))
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    return {"prompt_tokens": len(ids), "new_tokens": len(tokens["lmkit"]),
            "tokens_agree": tokens["lmkit"] == tokens["transformers"],
            "ms_per_token": {k: round(v, 2) for k, v in ms.items()},
            "ms_per_token_range": {k: [round(1000 * min(v), 2), round(1000 * max(v), 2)] for k, v in times.items()},
            "speedup": round(ms["transformers"] / ms["lmkit"], 3)}


if __name__ == "__main__":
    main()
