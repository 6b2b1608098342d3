from __future__ import annotations

import dataclasses
import json
import re

import pytest

from lmkit import config
from lmkit.config import ConfigError, RunConfig
from lmkit.presets import MODEL_SETTINGS


def test_defaults_come_from_the_default_preset() -> None:
    cfg = config.resolve()
    assert cfg.preset == "default" and cfg.model.arch == "llama"  # the measured winner (lmkit/presets.py)
    assert cfg.model.n_kv_head == 2 and not cfg.model.bias and cfg.model.activation == "silu"
    gpt = config.resolve(flags={"arch": "gpt"})
    assert gpt.model == config.ModelConfig(arch="gpt") and gpt.train == config.TrainConfig()  # gpt: the defaults
    small = config.resolve(flags={"preset": "small"})
    assert small.model.d_model == config.PRESETS["llama"]["small"]["model"]["d_model"]


def test_precedence_preset_file_config_set_flags(tmp_path) -> None:
    project_file = tmp_path / "lmkit.toml"
    project_file.write_text('preset = "tiny"\n[model]\nn_layer = 3\nd_model = 96\n[train]\nlr = 0.01\n')
    other = tmp_path / "other.toml"
    other.write_text("[model]\nn_layer = 5\n")
    cfg = config.resolve(project_file=project_file, config_file=other,
                         sets=["d_model=128", "train.max_steps=77"], flags={"train.max_steps": 99, "train.seed": None})
    assert cfg.preset == "tiny"
    assert cfg.model.n_layer == 5  # --config beats lmkit.toml
    assert cfg.model.d_model == 128  # --set beats both
    assert cfg.train.lr == 0.01  # lmkit.toml beats the preset
    assert cfg.train.max_steps == 99  # flags beat --set
    assert cfg.model.max_seq_len == config.PRESETS["gpt"]["tiny"]["model"]["max_seq_len"]


def test_saved_json_config_round_trips(tmp_path) -> None:
    cfg = config.resolve(flags={"preset": "tiny", "train.lr": 0.02})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert RunConfig.from_dict(cfg.to_dict(), "x") == cfg
    assert config.resolve(config_file=path) == cfg


@pytest.mark.parametrize(("sets", "message"), [
    (["model.n_layers=4"], "unknown config key 'model.n_layers' in --set .*did you mean 'n_layer'"),
    (["n_layerz=4"], "unknown config key 'n_layerz'"),
    (["model.d_model=100", "model.n_head=3"], "d_model=100 is not divisible by model.n_head=3"),
    (["train.lr=fast"], "train.lr='fast' .* must be a number"),
    (["train.lr=-1"], "train.lr=-1.0 must be > 0"),
    (["model.n_layer=2.5"], "must be an integer"),
    (["tokenizer.model_type=wordpiece"], "not one of: bpe, unigram, char, word"),
    (["preset=huge"], "unknown preset 'huge'"),
    (["arch=lstm"], "unknown arch 'lstm'"),
    (["novalue"], "--set expects key=value"),
    (["train.compile=1"], "must be true or false"),
    (["tokenizer.vocab_size=100"], "too small"),
    (["tokenizer.vocab_size=2147483648"], "too large: sentencepiece takes at most 2,147,483,647"),
    (["train.seed=9223372036854775808"], "train.seed=9223372036854775808 must be in"),
    (["preset={name='tiny'}"], "preset in --set must be a name"),
    # Huge values stop here, naming the key and its range, instead of overflowing torch later.
    (["train.batch_size=99999999999999999999"], r"train.batch_size=99999999999999999999 must be in \[1, 1,048,576\]"),
    (["train.grad_accum=99999999999999999999"], r"train.grad_accum=\d+ must be in \[1, 65,536\]"),
    (["train.max_steps=99999999999999999999"], r"train.max_steps=\d+ must be in \[1, 1,000,000,000,000\]"),
    (["train.eval_batches=99999999999999999999"], r"train.eval_batches=\d+ must be in \[1, "),
    (["model.d_model=99999999999999999999"], r"model.d_model=\d+ must be in \[1, 65,536\]"),
    (["model.n_layer=5000"], r"model.n_layer=5000 must be in \[1, 1024\]"),
    (["model.max_seq_len=99999999999999999999"], r"model.max_seq_len=\d+ must be in \[1, 16,777,216\]"),
    (["model.d_ff=99999999999999999999"], r"model.d_ff=\d+ must be in \[0, 1,048,576\]"),
    (["model.head_dim=99999999999999999998"], r"model.head_dim=\d+ must be in \[0, 65,536\]"),
    (["model.vocab_size=99999999999999999999"], r"model.vocab_size=\d+ must be in \[1, 2,147,483,647\]"),
    (["lora.rank=99999999999999999999"], r"lora.rank=\d+ must be in \[0, 65,536\]"),
    (["tokenizer.max_sentences=99999999999999999999"], r"tokenizer.max_sentences=\d+ must be in \[1000, "),
    ([f"train.lr=1{'0' * 400}"], "train.lr .* is a 401-digit number; it must be finite"),
    ([f"train.lr=1{'0' * 5000}"], "the number has 5,001 digits"),
])
def test_bad_values_name_the_key_and_source(sets, message) -> None:
    with pytest.raises(ConfigError, match=message):
        config.resolve(sets=sets)


def test_unknown_key_in_a_file_names_the_file(tmp_path) -> None:
    path = tmp_path / "lmkit.toml"
    path.write_text("[modle]\nn_layer = 2\n")
    with pytest.raises(ConfigError, match=f"unknown config section 'modle' in {path}.*'model'"):
        config.resolve(project_file=path)
    path.write_text("[model\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        config.resolve(project_file=path)


def test_template_is_valid_toml_that_changes_nothing(tmp_path) -> None:
    path = tmp_path / "lmkit.toml"
    path.write_text(config.render_template())
    assert config.resolve(project_file=path) == config.resolve()
    uncommented = "\n".join(line.removeprefix("# ") if " = " in line else line
                            for line in config.render_template().splitlines())
    path.write_text(uncommented)
    every_key_set = config.resolve(project_file=path)  # every listed key is known and its default valid
    assert every_key_set.train == config.TrainConfig()


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1.5h", 5400)])
def test_durations(text, seconds) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5m", "0"])
def test_bad_durations(text) -> None:
    with pytest.raises(ConfigError):
        config.parse_duration(text)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("list.json", "[1, 2]", "must hold an object of settings, not list"),
    ("table.toml", '[preset]\nname = "tiny"\n', 'preset in .* must be a name, e.g. preset = "tiny"'),
    ("arch.toml", "arch = 3\n", "arch in .* must be a name"),
])
def test_config_files_of_the_wrong_shape_are_clear_errors(tmp_path, name, content, message) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        config.resolve(config_file=path)


def test_a_config_file_saved_with_a_byte_order_mark_reads(tmp_path) -> None:
    toml = tmp_path / "lmkit.toml"
    toml.write_text("\ufeff[train]\nlr = 0.01\n", encoding="utf-8")  # as Windows Notepad saves it
    assert config.resolve(project_file=toml).train.lr == 0.01
    saved = tmp_path / "config.json"
    saved.write_text("\ufeff" + json.dumps({"train": {"lr": 0.02}}), encoding="utf-8")
    assert config.resolve(config_file=saved).train.lr == 0.02


def test_a_directory_for_a_config_file_is_named_as_such(tmp_path) -> None:
    (tmp_path / "lmkit.toml").mkdir()
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        config.resolve(project_file=tmp_path / "lmkit.toml")


def test_a_model_config_built_in_code_is_type_checked() -> None:
    with pytest.raises(ConfigError, match="model.d_model='32' .* must be an integer"):
        config.ModelConfig(d_model="32")  # type: ignore[arg-type]


# --- each architecture's own model settings --------------------------------------------------------

@pytest.mark.parametrize(("arch", "key", "owners"), [
    ("gpt", "n_kv_head", "llama"), ("gpt", "qk_norm", "llama"), ("seq2seq", "rope_theta", "llama"),
    ("bert", "tie_embeddings", "llama, gpt, seq2seq"), ("seq2seq", "pooling", "llama, gpt, bert"),
])
def test_a_field_of_another_architecture_is_refused_naming_its_owners(arch, key, owners, tmp_path) -> None:
    value = {"n_kv_head": "2", "qk_norm": "true", "rope_theta": "500000.0", "tie_embeddings": "false",
             "pooling": "mean"}[key]
    message = f"model.{key} is not a {arch} setting (used by {owners}); leave it out of {{}} or pick --arch "
    with pytest.raises(ConfigError, match=re.escape(message.format("--set"))):
        config.resolve(flags={"arch": arch}, sets=[f"model.{key}={value}"])
    for name in ("lmkit.toml", "other.toml"):  # the project's file, or a --config FILE
        path = tmp_path / name
        path.write_text(f'arch = "{arch}"\n[model]\n{key} = {value if value != "mean" else json.dumps(value)}\n')
        where = {"project_file": path} if name == "lmkit.toml" else {"config_file": path}
        with pytest.raises(ConfigError, match=re.escape(message.format(path))):
            config.resolve(**where)


def test_setting_another_architectures_field_to_its_default_is_still_a_setting() -> None:
    with pytest.raises(ConfigError, match=r"model.n_kv_head is not a gpt setting .* pick --arch llama$"):
        config.resolve(flags={"arch": "gpt"}, sets=["n_kv_head=0"])
    gpt = config.resolve(flags={"arch": "gpt"})  # left out, it keeps its default, which GPT never reads
    assert gpt.model.n_kv_head == 0 and "n_kv_head" not in gpt.to_dict()["model"]


def test_a_finetune_refuses_a_field_its_checkpoint_architecture_lacks() -> None:
    base = config.resolve(flags={"arch": "gpt", "preset": "tiny"})
    with pytest.raises(ConfigError, match=r"model.qk_norm is not a gpt setting \(used by llama\); leave it out of "
                                          r"--set$"):  # no other --arch: a finetune keeps its checkpoint's model
        config.resolve(base=base, sets=["model.qk_norm=true"])
    with pytest.raises(ConfigError, match="a finetune keeps its checkpoint's model"):
        config.resolve(base=base, sets=["model.arch=llama"])
    assert config.resolve(base=base, sets=["model.pooling=mean"]).model.pooling == "mean"


def test_code_that_builds_a_config_cannot_set_another_architectures_field() -> None:
    """An import's config_in, finetune's and distill's dataclasses.replace all build ModelConfig."""
    with pytest.raises(ConfigError, match=r"model.qk_norm=True is not a gpt setting \(used by llama\)"):
        config.ModelConfig(arch="gpt", qk_norm=True)
    gpt = config.ModelConfig(arch="gpt")
    with pytest.raises(ConfigError, match="model.n_kv_head=2 is not a gpt setting"):
        dataclasses.replace(gpt, n_kv_head=2)
    assert dataclasses.replace(gpt, n_kv_head=0, dropout=0.1).dropout == 0.1  # defaults are no setting


def test_an_odd_head_size_is_fine_without_rotary_positions() -> None:
    for arch in ("gpt", "bert", "seq2seq"):
        cfg = config.resolve(flags={"arch": arch}, sets=["model.d_model=30", "model.n_head=2"])
        assert cfg.model.d_model // cfg.model.n_head == 15
    with pytest.raises(ConfigError, match="the head dimension 15 must be even for rotary positions"):
        config.resolve(flags={"arch": "llama"}, sets=["model.d_model=30", "model.n_head=2"])
    with pytest.raises(ConfigError, match="the head dimension 15 must be even"):
        config.resolve(flags={"arch": "llama"}, sets=["model.head_dim=15"])
    with pytest.raises(ConfigError, match="model.n_kv_head=3 must divide model.n_head=4"):
        config.resolve(flags={"arch": "llama"}, sets=["model.n_kv_head=3"])


def test_every_preset_sets_only_its_architectures_fields() -> None:
    for arch, presets in config.PRESETS.items():
        for preset in presets:
            cfg = config.resolve(flags={"arch": arch, "preset": preset})  # refused otherwise, naming the preset
            assert set(cfg.to_dict()["model"]) == set(MODEL_SETTINGS[arch].fields)


def test_a_config_saved_with_every_field_still_resolves(tmp_path) -> None:
    """Run configs saved before each architecture declared its fields hold all of them, at defaults."""
    cfg = config.resolve(flags={"arch": "gpt", "preset": "tiny"})
    old = {**cfg.to_dict(), "model": dataclasses.asdict(cfg.model)}
    assert "n_kv_head" in old["model"] and "n_kv_head" not in cfg.to_dict()["model"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    assert config.resolve(config_file=path) == cfg
    assert RunConfig.from_dict(old, "x") == cfg
    # a value the GPT never read (lmkit used to take `--arch gpt --set model.n_kv_head=2`) is left out too
    assert RunConfig.from_dict({**old, "model": {**old["model"], "n_kv_head": 2}}, "x") == cfg
    path.write_text(json.dumps({"model": {**old["model"], "n_kv_head": 2}}))
    with pytest.raises(ConfigError, match=f"not a gpt setting .*leave it out of {re.escape(str(path))}"):
        config.resolve(config_file=path)  # but given as a setting, it is one
