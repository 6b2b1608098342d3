"""`lmkit serve`: an OpenAI-compatible HTTP server for a checkpoint, with batched decoding."""

from __future__ import annotations

import copy
import signal
import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.options import ChatTemplate, CheckpointOpt, DeviceOpt, ProjectDir, Quantize, Quiet, common, user_errors


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback unless you say otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on, 0 to 65535 (0: any free one).")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Rows decoded together at most (1 to 4096).")] = 8,
    max_queue: Annotated[int, typer.Option(
        help="Requests waiting for room at most; beyond, 429 with Retry-After.")] = 64,
    max_context: Annotated[int, typer.Option(
        help="Prompt + new tokens of a request at most (capped by the model's context): each of the "
        "--max-batch rows holds a KV cache this long.")] = 4096,
    max_tokens: Annotated[int, typer.Option(
        help="New tokens for a request that gives no max_tokens.")] = 256,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="LMKIT_API_KEY", show_default=False,
        help="Require `Authorization: Bearer KEY` on /v1/ (also $LMKIT_API_KEY).")] = None,
    model_name: Annotated[Optional[str], typer.Option(
        show_default=False, help="The model's name in the API (default: project/run/checkpoint).")] = None,
    shutdown_timeout: Annotated[float, typer.Option(
        help="On SIGTERM or Ctrl-C: seconds to let requests in flight finish.")] = 30.0,
    chat_template: ChatTemplate = None,
    quantize: Quantize = None,
    checkpoint: CheckpointOpt = None,
    project: ProjectDir = None,
    device: DeviceOpt = None,
    quiet: Quiet = False,
) -> None:
    """Serve a decoder checkpoint over OpenAI's HTTP API: POST /v1/completions and
    /v1/chat/completions (streaming with "stream": true), GET /v1/models and /health. Requests in
    flight decode together; the same seed (or greedy) gives the same text as `lmkit generate`."""
    from lmkit import chat as chat_lib
    from lmkit import checkpoint as ckpt_lib
    from lmkit import device as dev
    from lmkit import generate as gen
    from lmkit import project as proj
    from lmkit.errors import CheckpointError, DataError

    opts = common(ctx, project, device, quiet=quiet)
    with user_errors():
        try:
            import uvicorn

            from lmkit import batching, server
        except ImportError as err:
            raise DataError(f"lmkit serve needs {err.name}: pip install 'fastapi>=0.110' 'uvicorn>=0.29'") from None
        server.check_settings(max_batch=max_batch, max_queue=max_queue, max_context=max_context,
                              max_tokens=max_tokens, shutdown_timeout=shutdown_timeout)
        p = proj.Project.open(opts.project, create=False)
        ckpt = ckpt_lib.Checkpoint(ckpt_lib.resolve(checkpoint, p))
        if gen.decoding_of(ckpt) != "continue":
            raise DataError(f"lmkit serve serves a decoder (gpt or llama); {ckpt.path} is a "
                            f"{ckpt.config.model.arch} checkpoint for task {ckpt.task!r}")
        _check_port(host, port)
        where = dev.pick_device(opts.device)
        from lmkit.quantize import model_for_decoding

        model = model_for_decoding(ckpt, where, quantize.value if quantize else None)
        tokenizer = ckpt.tokenizer()
        if quantize or ckpt.is_int8:
            opts.say("int8: rows decoded together share activation scales, so a request's text may differ "
                     "slightly from the same request alone")
        template = chat_lib.load_template(chat_template) if chat_template else None
        try:
            form = chat_lib.ChatFormat(tokenizer, template)
        except CheckpointError:
            form = None  # completions only
            opts.say("this checkpoint has no chat template: /v1/chat/completions answers 400")
        name = model_name or _name(ckpt.path, p.root)
        engine = batching.Engine(model, tokenizer, where, max_batch=max_batch, max_queue=max_queue,
                                 max_context=max_context)
        app = server.create_app(server.Served(engine, form, name, max_tokens, api_key))
        opts.say(f"serving {name} ({ckpt.path}) on http://{host}:{port}/v1 with up to {max_batch} rows a step"
                 + (", API key required" if api_key else ""))
        # uvicorn shuts down gracefully on SIGTERM, then raises it again for the handler it found: a
        # quiet one, so that a finished shutdown exits 0 (Ctrl-C still ends in KeyboardInterrupt: 130).
        signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            uvicorn.run(app, host=host, port=port, log_config=_log_config(opts.quiet),
                        timeout_graceful_shutdown=shutdown_timeout)
        finally:
            engine.close()


def _name(path: Path, root: Path) -> str:
    """project/run/checkpoint, or the folder's name for a checkpoint outside the project."""
    try:
        return f"{root.resolve().name}/{path.resolve().relative_to((root / 'checkpoints').resolve()).as_posix()}"
    except ValueError:
        return path.resolve().name


def _check_port(host: str, port: int) -> None:
    """A port out of range or already taken is a one-line error before the model loads (uvicorn would
    log and exit 1)."""
    from lmkit.config import check_range
    from lmkit.errors import DataError

    check_range("port", port, 0, 65535)
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise DataError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def _log_config(quiet: bool) -> dict:
    """uvicorn's logging, with the access log on stderr too (stdout is for data)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    for logger in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        config["loggers"].setdefault(logger, {})["level"] = "WARNING" if quiet else "INFO"
    return config
