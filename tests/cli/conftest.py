from __future__ import annotations

import pytest
from typer.testing import CliRunner, Result

from cli.main import app

TINY = ["--preset", "tiny", "--set", "tokenizer.vocab_size=400", "--set", "model.max_seq_len=32",
        "--set", "train.batch_size=8", "--max-steps", "12", "--set", "train.eval_interval=6", "--quiet"]


def lmkit(*args: str, input: str | bytes | None = None, env: dict[str, str] | None = None) -> Result:
    """Run the CLI in-process, the way a user would type it."""
    return CliRunner().invoke(app, [str(a) for a in args], input=input, env=env)


def assert_user_error(result: Result, message: str) -> None:
    """Exit code 2, one `error: ...` line naming the problem, and no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert message in result.output, result.output


@pytest.fixture
def ckpt_project(tiny_project):
    return tiny_project.root
