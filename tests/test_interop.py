"""Hugging Face interop, offline: tiny GPT-2 and BERT models and tokenizers built here with
transformers and tokenizers, imported into lmkit, compared output for output, and exported back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmkit import interop, search
from lmkit.checkpoint import Checkpoint
from lmkit.config import SampleConfig
from lmkit.errors import CheckpointError
from lmkit.generate import CausalStepper
from lmkit.project import Project

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

MIXED = "Ünïcödé façade — naïve café, 東京 and emoji 🙂!\n  Tabs\tand  double  spaces. <|endoftext|> end"


def _corpus(sample_text: str) -> list[str]:
    return sample_text.splitlines()[:3000] + [MIXED]


def _gpt2_dir(path: Path, sample_text: str) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(sample_text), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=96, n_embd=48, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def _bert_dir(path: Path, sample_text: str) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_corpus(sample_text), trainers.WordPieceTrainer(vocab_size=500, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=96, max_position_embeddings=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    model = transformers.BertForMaskedLM(config)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, sample_text) -> Path:
    return _gpt2_dir(tmp_path_factory.mktemp("hf") / "tiny-gpt2", sample_text)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, sample_text) -> Path:
    return _bert_dir(tmp_path_factory.mktemp("hf") / "tiny-bert", sample_text)


def _tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_gpt2_imports_with_the_same_logits_generation_and_tokens(gpt2_dir, tmp_path) -> None:
    project = Project.open(tmp_path / "p")
    path = interop.import_hf(gpt2_dir, project)
    assert project.latest_checkpoint() == path
    ckpt = Checkpoint(path)
    ours, theirs = ckpt.model(), transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    tokenizer, hf_tokenizer = ckpt.tokenizer(), transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    assert tokenizer.encode(MIXED) == hf_tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tokenizer.encode(MIXED)) == MIXED  # byte-level BPE round-trips

    ids = torch.randint(0, tokenizer.vocab_size, (3, 40))
    with torch.no_grad():
        difference = (ours(ids)[0] - theirs(ids).logits).abs().max().item()
        # Right padding: rows 1 and 2 end early; the real positions must not change.
        mask = torch.ones_like(ids)
        mask[1, 25:], mask[2, 10:] = 0, 0
        padded = theirs(ids, attention_mask=mask).logits
        ours_padded = ours(ids)[0]
    assert difference < 1e-4
    assert (ours_padded - padded)[mask.bool()].abs().max().item() < 1e-4

    prompt = tokenizer.encode("To be, or not to be")
    with torch.no_grad():
        rows = search.sample(CausalStepper(ours, prompt, 1, torch.device("cpu")), 1,
                             SampleConfig(greedy=True, max_new_tokens=50), eos_id=-1)
        generated = theirs.generate(torch.tensor([prompt]), max_new_tokens=50, min_new_tokens=50, do_sample=False,
                                    pad_token_id=0)
    assert rows[0].tokens == generated[0, len(prompt):].tolist()


def test_gpt2_round_trip_is_bit_identical_and_loads_without_warnings(gpt2_dir, tmp_path) -> None:
    path = interop.import_hf(gpt2_dir, Project.open(tmp_path / "p"))
    out = interop.export_hf(path, tmp_path / "out")
    _tensors_equal(load_file(gpt2_dir / "model.safetensors"), load_file(out / "model.safetensors"))
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer(MIXED, add_special_tokens=False)["input_ids"] == Checkpoint(path).tokenizer().encode(MIXED)


def test_bert_imports_with_the_same_logits_and_round_trips(bert_dir, tmp_path) -> None:
    project = Project.open(tmp_path / "p")
    path = interop.import_hf(bert_dir, project)
    ckpt = Checkpoint(path)
    ours, theirs = ckpt.model(), transformers.AutoModelForMaskedLM.from_pretrained(bert_dir).eval()
    tokenizer, hf_tokenizer = ckpt.tokenizer(), transformers.AutoTokenizer.from_pretrained(bert_dir)
    assert tokenizer.encode(MIXED) == hf_tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    assert (tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.pad_id) == (
        hf_tokenizer.cls_token_id, hf_tokenizer.sep_token_id, hf_tokenizer.mask_token_id, hf_tokenizer.pad_token_id)

    ids = torch.randint(5, tokenizer.vocab_size, (3, 30))
    types = torch.zeros_like(ids)
    types[:, 15:] = 1
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 20:], mask[2, 8:] = False, False
    with torch.no_grad():
        for pad in (None, mask):
            logits = ours(ids, types, pad)[0].mlm
            reference = theirs(ids, token_type_ids=types, attention_mask=None if pad is None else pad.long()).logits
            real = torch.ones_like(mask) if pad is None else mask
            assert (logits - reference)[real].abs().max().item() < 1e-4

    out = interop.export_hf(path, tmp_path / "out")
    _tensors_equal(load_file(bert_dir / "model.safetensors"), load_file(out / "model.safetensors"))
    _, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_import_errors_name_the_problem(gpt2_dir, tmp_path) -> None:
    project = Project.open(tmp_path / "p")
    pickled = tmp_path / "pickled"
    shutil.copytree(gpt2_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights"):
        interop.import_hf(pickled, project)
    other = tmp_path / "other"
    shutil.copytree(gpt2_dir, other)
    config = json.loads((other / "config.json").read_text())
    gemma = {**config, "model_type": "gemma", "architectures": ["GemmaForCausalLM"]}
    (other / "config.json").write_text(json.dumps(gemma))
    with pytest.raises(CheckpointError, match="model_type 'gemma' \\(GemmaForCausalLM\\) is not supported"):
        interop.import_hf(other, project)
    (other / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx=True"):
        interop.import_hf(other, project)
    with pytest.raises(CheckpointError, match="no config.json"):
        interop.import_hf(tmp_path, project)


def test_eval_perplexity_of_an_imported_gpt2_equals_transformers(gpt2_dir, sample_text, tmp_path) -> None:
    from lmkit.evaluate import evaluate_lm

    path = interop.import_hf(gpt2_dir, Project.open(tmp_path / "p"))
    ckpt = Checkpoint(path)
    text = "\n".join(sample_text.splitlines()[5000:5060])
    ours = evaluate_lm(ckpt.model(), ckpt.tokenizer(), text, torch.device("cpu"), stride=48)

    # The same windows by hand with transformers: every token scored once, with >= 48 tokens of context.
    model, tokenizer = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval(), \
        transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    ids = torch.tensor([tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]])
    window, nats, scored = model.config.n_positions, 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids) - 1, 48):
            end = min(begin + window, len(ids) - 1)
            logits = model(ids[None, begin:end]).logits[0]
            losses = torch.nn.functional.cross_entropy(logits, ids[begin + 1:end + 1], reduction="none")
            nats += losses[scored - begin:].double().sum().item()
            scored = end
            if end == len(ids) - 1:
                break
    assert ours.tokens == len(ids) - 1
    assert ours.loss == pytest.approx(nats / (len(ids) - 1), rel=1e-5)


def test_imported_models_work_in_every_command(gpt2_dir, bert_dir, task_files, small_corpus, tmp_path) -> None:
    from tests.cli.conftest import assert_user_error, lmkit

    gpt = tmp_path / "gpt"
    imported = lmkit("import", gpt2_dir, "-p", gpt, "--json")
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout)["arch"] == "gpt"
    assert lmkit("generate", "-p", gpt, "--max-new-tokens", "8", "--seed", "1", "Ham.").exit_code == 0
    encoded = lmkit("tokenize", "encode", "-p", gpt, input="To be, or not to be\n")  # the checkpoint's tokenizer
    hf_ids = transformers.AutoTokenizer.from_pretrained(gpt2_dir)("To be, or not to be")["input_ids"]
    assert encoded.exit_code == 0 and encoded.stdout.split() == [str(i) for i in hf_ids]
    scored = lmkit("eval", small_corpus, "-p", gpt, "--json")
    assert scored.exit_code == 0 and json.loads(scored.stdout)["perplexity"] > 1
    student = lmkit("distill", small_corpus, "--teacher", gpt, "--student-layers", "0", "-p", tmp_path / "s",
                    "--max-steps", "4", "--set", "train.eval_interval=2", "--set", "train.batch_size=4",
                    "--set", "model.max_seq_len=32", "--quiet", "--json")
    assert student.exit_code == 0, student.output
    exported = lmkit("export", tmp_path / "gpt-out", "-p", gpt)
    assert exported.exit_code == 0 and (tmp_path / "gpt-out" / "model.safetensors").is_file()

    bert = tmp_path / "bert"
    assert lmkit("import", bert_dir, "-p", bert).exit_code == 0
    tuned = lmkit("finetune", task_files["train"], "--val", task_files["val"], "-p", bert, "--max-steps", "4",
                  "--set", "train.eval_interval=2", "--set", "train.batch_size=8", "--quiet", "--json")
    assert tuned.exit_code == 0, tuned.output
    classifier = tmp_path / "clf-out"
    assert lmkit("export", classifier, "-p", bert).exit_code == 0
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(classifier, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert sorted(model.config.id2label.values()) == sorted(Checkpoint(Path(json.loads(tuned.stdout)[
        "best_checkpoint"])).labels)
    assert_user_error(lmkit("import", tmp_path / "nothing-here", "-p", tmp_path / "x"), "no config.json")


def test_prepare_encodes_with_an_imported_tokenizer_in_worker_processes(gpt2_dir, small_corpus, tmp_path) -> None:
    from lmkit import prepare
    from lmkit.config import DataConfig

    tokenizer = Checkpoint(interop.import_hf(gpt2_dir, Project.open(tmp_path / "p"))).tokenizer()
    arrays = []
    for workers in (1, 2):
        prepared = prepare.prepare(Project.open(tmp_path / f"w{workers}"), [small_corpus], tokenizer, DataConfig(),
                                   workers=workers)
        arrays.append(prepared.train.array().tolist() + prepared.val.array().tolist())
    assert arrays[0] == arrays[1] and len(arrays[0]) > 1000
    assert tokenizer.decode(arrays[0][:200]) in small_corpus.read_text(encoding="utf-8")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_an_lmkit_tokenizer_exports_to_one_autotokenizer_reads_identically(model_type, sample_text, tmp_path) -> None:
    from lmkit import checkpoint
    from lmkit.config import ModelConfig, RunConfig, TokenizerConfig
    from lmkit.models import build_model
    from lmkit.tokenizer import train_tokenizer

    lines = sample_text.splitlines(keepends=True)
    tokenizer = train_tokenizer([lines[:6000]], tmp_path / "tok" / "tokenizer.model",
                                TokenizerConfig(vocab_size=600, model_type=model_type))
    cfg = RunConfig(model=ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layer=1, n_head=2,
                                      max_seq_len=32), tokenizer=TokenizerConfig(model_type=model_type))
    path = tmp_path / "ckpt"
    checkpoint.save(path, model=build_model(cfg.model), config=cfg, tokenizer=tokenizer, run="run1", step=0)
    out = interop.export_hf(path, tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    texts = [*lines[6000:9000], MIXED, "digits 1234567 and  runs   of    spaces\n\n"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids, text
        assert theirs.decode(ids) == text


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.pop("n_embd"), "lacks 'n_embd', which a gpt2 model needs"),
    (lambda c: c.update(n_embd=None), "has 'n_embd': null"),
    (lambda c: c.update(n_embd="48"), "model.d_model='48' .* must be an integer"),
    (lambda c: c.update(n_layer=2.5), "model.n_layer=2.5 .* must be an integer"),
    (lambda c: c.update(model_type="gemma", architectures="GemmaForCausalLM"), r"'gemma' \(GemmaForCausalLM\)"),
])
def test_mistyped_configs_are_user_errors(change, message, gpt2_dir, tmp_path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(gpt2_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    change(config)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        interop.import_hf(broken, Project.open(tmp_path / "p"))


def test_bad_weights_and_indexes_are_user_errors(gpt2_dir, tmp_path) -> None:
    project = Project.open(tmp_path / "p")
    with pytest.raises(CheckpointError, match="is a file; give the Hugging Face model directory"):
        interop.import_hf(gpt2_dir / "config.json", project)
    shaped = tmp_path / "shaped"
    shutil.copytree(gpt2_dir, shaped)
    weights = load_file(shaped / "model.safetensors")
    weights[sorted(weights)[-1]] = torch.zeros(7, 7)
    save_file(weights, shaped / "model.safetensors")
    with pytest.raises(CheckpointError, match="do not match config.json .*size mismatch"):
        interop.import_hf(shaped, project)
    for weight_map, message in ((["a"], "no weight_map object"), ({"x": "../x.safetensors"}, "names the shard")):
        sharded = tmp_path / f"sharded{len(message)}"
        shutil.copytree(gpt2_dir, sharded)
        (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=message):
            interop.import_hf(sharded, project)


def test_export_force_replaces_an_earlier_export_but_never_a_checkpoint_or_a_project(tiny_project, tmp_path) -> None:
    from tests.cli.conftest import assert_user_error, lmkit

    project = Project(tmp_path / "p")
    shutil.copytree(tiny_project.root, project.root)
    latest = project.latest_checkpoint()
    for target in {latest, *project.run_checkpoints(Checkpoint(latest).run)}:  # the one exported, and any other
        before = {p.name: p.read_bytes() for p in target.iterdir()}
        assert_user_error(lmkit("export", target, "-c", latest, "-p", project.root, "--force"),
                          "is an lmkit checkpoint, which export never replaces")
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert_user_error(lmkit("export", project.root, "-p", project.root, "--force"), "is the project")
    assert_user_error(lmkit("export", project.checkpoints_dir / "hf", "-p", project.root),
                      "lies in the lmkit-managed folders of the project")
    assert not (project.checkpoints_dir / "hf").exists()
    out = tmp_path / "hf"
    assert lmkit("export", out, "-p", project.root).exit_code == 0
    assert_user_error(lmkit("export", out, "-p", project.root), "already holds a model directory; --force")
    assert lmkit("export", out, "-p", project.root, "--force").exit_code == 0  # an earlier export may go


def test_an_unhashable_shard_name_in_a_weight_map_is_a_user_error(gpt2_dir, tmp_path) -> None:
    sharded = tmp_path / "sharded"
    shutil.copytree(gpt2_dir, sharded)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": ["a.safetensors"]}}))
    with pytest.raises(CheckpointError, match="names the shard \\['a.safetensors'\\]"):
        interop.import_hf(sharded, Project.open(tmp_path / "p"))
