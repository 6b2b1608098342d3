"""int8 weights: scores within a whisker of float32, a checkpoint a quarter the size that every
decoding command takes, and refused where float weights are needed."""

from __future__ import annotations

import pytest
import torch

from lmkit import evaluate, quantize
from lmkit.checkpoint import Checkpoint
from lmkit.config import SampleConfig
from lmkit.errors import CheckpointError
from lmkit.generate import generate
from tests.cli.conftest import assert_user_error, lmkit

CPU = torch.device("cpu")


@pytest.fixture(params=["gpt", "llama"])
def source(request, tiny_project, tiny_llama_project):
    return (tiny_project if request.param == "gpt" else tiny_llama_project).latest_checkpoint()


def test_int8_scores_match_float_and_the_checkpoint_is_small(source, tmp_path, sample_text) -> None:
    out = quantize.quantize_checkpoint(source, tmp_path / "q8")
    ckpt = Checkpoint(out)
    assert ckpt.is_int8 and ckpt.meta["quantized_from"] == str(Checkpoint(source).path)
    assert (out / "model.safetensors").stat().st_size < 0.5 * (source / "model.safetensors").stat().st_size
    floats = Checkpoint(source).model()
    int8, now = quantize.model_for_decoding(ckpt, CPU), quantize.quantize_int8(Checkpoint(source).model())
    assert sum(type(m).__name__ == "Linear" and m.__module__.startswith("torch.ao") for m in int8.modules()) >= 5
    tokenizer = ckpt.tokenizer()
    text = sample_text[200_000:230_000]
    base = evaluate.evaluate_lm(floats, tokenizer, text, CPU).bits_per_byte
    for model in (int8, now):
        assert abs(evaluate.evaluate_lm(model, tokenizer, text, CPU).bits_per_byte / base - 1) < 0.01
    cfg = SampleConfig(greedy=True, max_new_tokens=10)
    assert len(generate(int8, tokenizer, "Ham.", cfg, CPU).samples[0].tokens) >= 1


def test_an_int8_checkpoint_and_quantizing_on_load_are_the_same_numbers(source, tmp_path) -> None:
    saved = Checkpoint(quantize.quantize_checkpoint(source, tmp_path / "q8"))
    loaded = quantize.model_for_decoding(saved, CPU)
    on_load = quantize.model_for_decoding(Checkpoint(source), CPU, "int8")
    int8_linear = quantize._dynamic_linear()
    assert any(type(m) is torch.nn.Embedding for m in loaded.modules())  # rounded to int8 per row both ways
    theirs = dict(on_load.named_modules())
    for name, module in loaded.named_modules():
        if isinstance(module, int8_linear):  # its int8 weight, scales and bias
            ours, other = module.weight(), theirs[name].weight()
            assert torch.equal(ours.int_repr(), other.int_repr()), name
            assert torch.equal(ours.q_per_channel_scales(), other.q_per_channel_scales()), name
            assert (module.bias() is None) == (theirs[name].bias() is None)
            assert module.bias() is None or torch.equal(module.bias(), theirs[name].bias()), name
        else:  # embeddings, norms, biases: float
            other = dict(theirs[name].named_parameters(recurse=False)) | dict(theirs[name].named_buffers(recurse=False))
            for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                assert torch.equal(tensor, other[key]), f"{name}.{key}"
    idx = torch.randint(0, saved.config.model.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], on_load(idx)[0])


def test_int8_in_every_decoding_command_and_refused_for_training(source, tmp_path, small_corpus) -> None:
    out = tmp_path / "q8"
    result = lmkit("quantize", source, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    assert '"ratio"' in result.stdout
    for args in (["generate", "-c", out, "Ham.", "--max-new-tokens", "4", "--seed", "1"],
                 ["generate", "-c", source, "Ham.", "--max-new-tokens", "4", "--seed", "1", "--quantize", "int8"],
                 ["eval", small_corpus, "-c", out], ["eval", small_corpus, "-c", source, "--quantize", "int8"]):
        run = lmkit(*args)
        assert run.exit_code == 0, (args, run.output)
    assert_user_error(lmkit("finetune", small_corpus, "--task", "lm", "--from", out, "-p", tmp_path / "ft"),
                      "int8 weights")
    assert_user_error(lmkit("export", tmp_path / "hf", "-c", out), "int8 weights")
    assert_user_error(lmkit("quantize", out, "-o", tmp_path / "again"), "int8 already")
    assert_user_error(lmkit("quantize", source, "-o", source), "the checkpoint itself")
    with pytest.raises(CheckpointError, match="CPU"):
        quantize.check_device(torch.device("cuda"))
