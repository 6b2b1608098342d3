"""What `lmkit serve` checks and loads before it listens (lmkit.server.load_served), called directly:
the model's name, the engine's settings, and the one-line errors for settings, checkpoints and ports."""

from __future__ import annotations

import queue
import socket
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from lmkit import server  # noqa: E402
from lmkit.batching import Job  # noqa: E402
from lmkit.config import ConfigError, SampleConfig  # noqa: E402
from lmkit.errors import DataError  # noqa: E402
from lmkit.generate import generate  # noqa: E402
from lmkit.project import Project  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_load_served_names_the_checkpoint_and_sizes_the_engine(tiny_project: Project) -> None:
    logged: list[str] = []
    served = server.load_served(tiny_project.root, port=free_port(), device="cpu", max_batch=3, max_context=16,
                                max_tokens=17, api_key="k", log=logged.append)
    try:
        latest = tiny_project.latest_checkpoint()
        run_step = latest.resolve().relative_to(tiny_project.checkpoints_dir.resolve()).as_posix()
        assert served.name == f"{tiny_project.root.resolve().name}/{run_step}" and served.source == str(latest)
        assert served.engine.max_batch == 3 and served.engine.context == 16  # capped below the context of 32
        assert served.default_max_tokens == 17 and served.api_key == "k"
        assert served.chat is not None and logged == []  # the tiny tokenizer has chat tokens: both APIs served
    finally:
        served.engine.close()
    named = server.load_served(tiny_project.root, latest, port=free_port(), device="cpu", model_name="mine")
    named.engine.close()
    assert named.name == "mine"


def test_a_checkpoint_outside_the_project_is_named_by_its_folder(tiny_project: Project, tmp_path: Path) -> None:
    assert server.served_name(tmp_path / "exported", tiny_project) == "exported"


def test_settings_are_checked_before_the_project_is_opened(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_batch"):
        server.load_served(tmp_path / "nowhere", max_batch=0)
    with pytest.raises(ConfigError, match="shutdown_timeout"):
        server.load_served(tmp_path / "nowhere", shutdown_timeout=-1)


def test_only_a_decoder_is_served(tiny_bert_project: Project) -> None:
    with pytest.raises(DataError, match="lmkit serve serves a decoder .* bert checkpoint"):
        server.load_served(tiny_bert_project.root, port=free_port())


def test_a_taken_or_impossible_port_is_refused_before_the_model_loads(tiny_project: Project) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(DataError, match="cannot listen on 127.0.0.1"):
            server.load_served(tiny_project.root, port=taken.getsockname()[1])
    with pytest.raises(ConfigError, match="port"):
        server.check_port("127.0.0.1", 65536)


def test_the_served_engine_decodes_as_lmkit_generate(tiny_project: Project) -> None:
    served = server.load_served(tiny_project.root, port=free_port(), device="cpu")
    try:
        engine, cfg = served.engine, SampleConfig(greedy=True, max_new_tokens=6)
        alone = generate(engine.model, engine.tokenizer, "Ham.", cfg, engine.device).samples[0]
        done: queue.Queue = queue.Queue()
        engine.submit(Job(engine.tokenizer.encode_document("Ham."), cfg, engine.tokenizer.stop_ids,
                          on_done=lambda samples, seed: done.put(samples)))
        assert done.get(timeout=60)[0].tokens == alone.tokens
    finally:
        served.engine.close()
