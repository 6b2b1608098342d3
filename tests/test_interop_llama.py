"""Hugging Face Llama-family interop, offline: tiny random Llama, Qwen2, Qwen3 and Mistral models with
byte-level BPE tokenizers trained here, imported into lmkit, compared with transformers output for
output (logits, greedy generation, perplexity), and exported back bit for bit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmkit import evaluate, generate, interop
from lmkit.checkpoint import Checkpoint
from lmkit.config import SampleConfig
from lmkit.errors import CheckpointError, LmkitError
from lmkit.project import Project
from tests.models.test_llama_transformers import TOLERANCE, sharpen_attention, tolerances_off

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SHAPE = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, rms_norm_eps=1e-6)
# name: (config class, model class, config options, whether the tokenizer adds BOS)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, rope_theta=500000.0,
                                                      rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                    "original_max_position_embeddings": 32}), True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1000000.0), False),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=16), False),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None), True),
}
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def _hf_dir(path: Path, family: str, sample_text: str, **overrides: object) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    config_class, model_class, options, adds_bos = FAMILIES[family]
    specials = ["<|begin|>", "<|end|>", "<|eot|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample_text.splitlines()[:2000], trainers.BpeTrainer(
        vocab_size=350, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A", pair="<|begin|> $A <|begin|> $B",
                                                           special_tokens=[("<|begin|>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>",
                                                chat_template=TEMPLATE)
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=[1, 2],
                                                 **SHAPE, **{**options, **overrides})
    model = getattr(transformers, model_class)(config)
    sharpen_attention(model)  # so that a wrong rotary setting moves the logits far past the tolerance
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def imported(request, tmp_path_factory, sample_text) -> tuple[str, Path, Checkpoint]:
    source = _hf_dir(tmp_path_factory.mktemp("hf") / f"tiny-{request.param}", request.param, sample_text)
    project = Project.open(tmp_path_factory.mktemp("project"))
    return request.param, source, Checkpoint(interop.import_hf(source, project))


def test_logits_agree_with_transformers_with_and_without_padding(imported) -> None:
    family, source, ckpt = imported
    assert ckpt.config.model.arch == "llama"
    hf = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    model = ckpt.model()
    idx = torch.randint(3, ckpt.config.model.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, **TOLERANCE)
        # Right padding: the real positions are unchanged (causal attention never sees the pad).
        padded = torch.cat([idx[:, :20], torch.zeros(2, 4, dtype=torch.long)], dim=1)
        mask = torch.cat([torch.ones(2, 20), torch.zeros(2, 4)], dim=1).long()
        expected = hf(padded, attention_mask=mask).logits[:, :20]
        torch.testing.assert_close(model(padded)[0][:, :20], expected, **TOLERANCE)


def test_a_wrong_rotary_setting_would_be_caught(imported) -> None:
    family, source, ckpt = imported
    hf = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    cfg = ckpt.config.model
    wrong = [dataclasses.replace(cfg, rope_theta=10000.0 if cfg.rope_theta != 10000.0 else 500000.0)]
    if cfg.rope_scaling != "none":
        wrong.append(dataclasses.replace(cfg, rope_scaling="none"))
    idx = torch.randint(3, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        expected = hf(idx).logits
        for model_config in wrong:
            assert tolerances_off(ckpt.model(model_config=model_config)(idx)[0], expected) >= 100, model_config


def test_prompts_encode_as_auto_tokenizer_and_greedy_generation_is_identical(imported) -> None:
    family, source, ckpt = imported
    auto = transformers.AutoTokenizer.from_pretrained(source)
    tokenizer = ckpt.tokenizer()
    prompt = "ROMEO: But soft, what light"
    ids = auto(prompt).input_ids
    assert tokenizer.encode_document(prompt) == ids
    assert (ids[0] == 0) == FAMILIES[family][3]  # a BOS where that tokenizer adds one, none where it does not
    assert tokenizer.stop_ids == [1, 2] and tokenizer.chat_template == TEMPLATE
    hf = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=50)[0, len(ids):].tolist()
    completion = generate.generate(ckpt.model(), tokenizer, prompt, SampleConfig(greedy=True, max_new_tokens=50),
                                   torch.device("cpu"))
    stop = next((i for i, t in enumerate(theirs) if t in (1, 2)), len(theirs))
    # The same tokens, and a stop at either end-of-text id, as transformers (which keeps that id).
    assert completion.samples[0].tokens == theirs[:stop]
    assert completion.samples[0].finish_reason == ("eos" if stop < len(theirs) else "length")


def test_eval_equals_transformers_perplexity(imported, sample_text) -> None:
    family, source, ckpt = imported
    text = "\n".join(sample_text.splitlines()[3000:3005])
    ours = evaluate.evaluate_lm(ckpt.model(), ckpt.tokenizer(), text, torch.device("cpu"))
    ids = transformers.AutoTokenizer.from_pretrained(source)(text).input_ids
    assert ours.tokens == len(ids) - 1 and len(ids) <= 128  # one window: the whole text
    hf = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert ours.loss == pytest.approx(loss, rel=1e-4)


def test_export_round_trip_is_bit_identical(imported, tmp_path) -> None:
    family, source, ckpt = imported
    out = interop.export_hf(ckpt.path, tmp_path / "out")
    original, exported = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) and original[k].dtype == exported[k].dtype for k in original)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[family][1]] and config["eos_token_id"] == [1, 2]
    with _no_warnings():
        _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    auto = transformers.AutoTokenizer.from_pretrained(out)
    prompt = "Good morrow, cousin."
    assert auto(prompt).input_ids == transformers.AutoTokenizer.from_pretrained(source)(prompt).input_ids
    with pytest.raises(LmkitError, match="already holds a model directory; --force"):
        interop.export_hf(ckpt.path, out)
    assert interop.export_hf(ckpt.path, out, force=True) == out
    with pytest.raises(LmkitError, match="holds other files"):
        interop.export_hf(ckpt.path, source.parent)
    with pytest.raises(LmkitError, match="is a file"):
        interop.export_hf(ckpt.path, out / "config.json")


class _no_warnings:  # noqa: N801 - a context manager read as a phrase
    """Fail on any warning inside (transformers warns about unknown or inconsistent config keys)."""

    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)


@pytest.mark.parametrize(("family", "overrides", "message"), [
    ("mistral", {"sliding_window": 16}, "sliding_window=16 (below max_position_embeddings=128) is not supported"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
     "rope_scaling type 'yarn' is not supported"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_what_lmkit_cannot_compute_is_named(family, overrides, message, tmp_path, sample_text) -> None:
    source = _hf_dir(tmp_path / "m", family, sample_text, **overrides)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        interop.import_hf(source, Project.open(tmp_path / "p"))


def test_own_llama_exports_with_a_tokenizer_that_gives_the_same_ids(tiny_llama_project, tmp_path,
                                                                    sample_text) -> None:
    ckpt = Checkpoint(tiny_llama_project.latest_checkpoint())
    out = interop.export_hf(ckpt.path, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]  # its QK-norm is Qwen3's; without it, LlamaForCausalLM
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, ckpt.config.model.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model()(idx)[0], hf(idx).logits, rtol=1e-4, atol=1e-4)
    auto, tokenizer = transformers.AutoTokenizer.from_pretrained(out), ckpt.tokenizer()
    for line in sample_text.splitlines()[:200]:
        assert auto(line, add_special_tokens=False).input_ids == tokenizer.encode(line)


def test_an_imported_model_works_in_every_command(task_files, small_corpus, sample_text, tmp_path) -> None:
    from tests.cli.conftest import lmkit

    source = _hf_dir(tmp_path / "tiny-qwen2", "qwen2", sample_text)
    project = tmp_path / "qwen"
    imported = lmkit("import", source, "-p", project, "--json")
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout)["arch"] == "llama"
    generated = lmkit("generate", "-p", project, "--max-new-tokens", "8", "--seed", "1", "--json", "Ham.")
    assert generated.exit_code == 0, generated.output
    quick = ["--max-steps", "4", "--set", "train.eval_interval=2", "--set", "train.batch_size=4",
             "--set", "model.dropout=0.0", "--quiet", "--json"]
    tuned = lmkit("finetune", task_files["instruct"], "--task", "instruct", "--lora-rank", "2", "--lora-targets",
                  "all", "--merge", "-p", project, *quick)
    assert tuned.exit_code == 0, tuned.output
    merged = Checkpoint(Project(project).latest_checkpoint())
    assert merged.path.name == "merged" and merged.tokenizer().stop_ids == [1, 2]
    classified = lmkit("finetune", task_files["train"], "--val", task_files["val"], "--from",
                       Checkpoint(Project(project).checkpoint_dir(f"hf-{source.name}", 0)).path, "-p",
                       tmp_path / "clf", *quick)
    assert classified.exit_code == 0, classified.output
    student = lmkit("distill", small_corpus, "--teacher", Project(project).checkpoint_dir(f"hf-{source.name}", 0),
                    "--student-layers", "1", "-p", tmp_path / "s", "--max-steps", "4", "--set",
                    "train.eval_interval=2", "--set", "train.batch_size=4", "--set", "model.max_seq_len=32",
                    "--quiet", "--json")
    assert student.exit_code == 0, student.output
    assert json.loads(lmkit("info", "-p", tmp_path / "s", "--json").output)["latest"]["layers"] == 1
