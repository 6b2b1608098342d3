"""A model setting of another architecture, on the command line: one error line, not a silent drop."""

from __future__ import annotations

from tests.cli.conftest import assert_user_error, lmkit


def test_pretrain_refuses_a_setting_its_architecture_does_not_read(tmp_path, small_corpus) -> None:
    project = tmp_path / "p"
    result = lmkit("pretrain", small_corpus, "-p", project, "--arch", "gpt", "--set", "model.n_kv_head=2",
                   "--set", "model.qk_norm=true")
    assert_user_error(result, "error: model.n_kv_head is not a gpt setting (used by llama); leave it out of --set "
                              "or pick --arch llama")
    assert len(result.output.strip().splitlines()) == 1 and not project.exists()  # refused before anything
    project.mkdir()
    (project / "lmkit.toml").write_text("[model]\ntie_embeddings = false\n")
    assert_user_error(lmkit("pretrain", small_corpus, "-p", project, "--arch", "bert"),
                      f"model.tie_embeddings is not a bert setting (used by llama, gpt, seq2seq); leave it out of "
                      f"{project / 'lmkit.toml'} or pick --arch llama, gpt or seq2seq")


def test_finetune_refuses_a_setting_its_checkpoints_architecture_does_not_read(ckpt_project, task_files,
                                                                                tmp_path) -> None:
    result = lmkit("finetune", task_files["train"], "--from", ckpt_project, "-p", tmp_path / "ft",
                   "--set", "model.rope_theta=500000")
    assert_user_error(result, "error: model.rope_theta is not a gpt setting (used by llama); leave it out of --set\n")
