"""Hugging Face interop figures: logit agreement of imported GPT-2 and BERT models with
transformers (max |difference|, fp32, with and without padding), and the time to import and
export a GPT-2-small-sized (124M parameters) random model.

    pip install -e '.[bench]'
    python bench/interop.py -o /tmp/interop
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmkit import interop  # noqa: E402
from lmkit.checkpoint import Checkpoint  # noqa: E402
from lmkit.project import Project  # noqa: E402
from tests.test_interop import _bert_dir, _gpt2_dir  # noqa: E402


def logit_differences(out: Path, text: str) -> dict[str, float]:
    import transformers

    gpt_dir, bert_dir = _gpt2_dir(out / "tiny-gpt2", text), _bert_dir(out / "tiny-bert", text)
    project = Project.open(out / "project")
    gpt = Checkpoint(interop.import_hf(gpt_dir, project)).model()
    bert = Checkpoint(interop.import_hf(bert_dir, project)).model()
    hf_gpt = transformers.AutoModelForCausalLM.from_pretrained(gpt_dir).eval()
    hf_bert = transformers.AutoModelForMaskedLM.from_pretrained(bert_dir).eval()
    torch.manual_seed(0)
    ids = torch.randint(5, 300, (4, 48))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 30:], mask[2, 12:] = False, False
    with torch.no_grad():
        return {
            "gpt2": (gpt(ids)[0] - hf_gpt(ids).logits).abs().max().item(),
            "gpt2_padded": (gpt(ids)[0] - hf_gpt(ids, attention_mask=mask.long()).logits)[mask].abs().max().item(),
            "bert": (bert(ids)[0].mlm - hf_bert(ids).logits).abs().max().item(),
            "bert_padded": (bert(ids, None, mask)[0].mlm - hf_bert(ids, attention_mask=mask.long()).logits)[mask]
            .abs().max().item(),
        }


def gpt2_small_timing(out: Path) -> dict[str, float]:
    import transformers

    small = out / "gpt2-small"
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())  # 124M parameters, random
    model.save_pretrained(small)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (out / "tiny-gpt2" / name).is_file():
            (small / name).write_bytes((out / "tiny-gpt2" / name).read_bytes())
    start = time.perf_counter()
    path = interop.import_hf(small, Project.open(out / "small-project"))
    imported = time.perf_counter() - start
    start = time.perf_counter()
    interop.export_hf(path, out / "gpt2-small-exported")
    exported = time.perf_counter() - start
    return {"parameters": sum(p.numel() for p in model.parameters()), "import_s": imported, "export_s": exported}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    text = (ROOT / "sample_data" / "shakespeare_train.txt").read_text(encoding="utf-8")
    args.out.mkdir(parents=True, exist_ok=True)
    print(logit_differences(args.out, text))
    print(gpt2_small_timing(args.out))


if __name__ == "__main__":
    main()
