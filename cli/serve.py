"""`lmkit serve`: an OpenAI-compatible HTTP server for a checkpoint, with batched decoding."""

from __future__ import annotations

from types import ModuleType
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
    opts = common(ctx, project, device, quiet=quiet)
    with user_errors():
        server = _server()
        served = server.load_served(
            opts.project, checkpoint, host=host, port=port, device=opts.device, max_batch=max_batch,
            max_queue=max_queue, max_context=max_context, max_tokens=max_tokens, shutdown_timeout=shutdown_timeout,
            api_key=api_key, model_name=model_name, chat_template=chat_template,
            quantize=quantize.value if quantize else None, log=opts.say)
        server.run(served, host=host, port=port, shutdown_timeout=shutdown_timeout, quiet=opts.quiet, log=opts.say)


def _server() -> ModuleType:
    """lmkit.server, which needs the serve extra (FastAPI and uvicorn)."""
    from lmkit.errors import DataError

    try:
        from lmkit import server
    except ImportError as err:
        raise DataError(f"lmkit serve needs {err.name}: pip install 'fastapi>=0.110' 'uvicorn>=0.29'") from None
    return server
