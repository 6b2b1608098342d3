"""Streaming decode cost: the text of N generated tokens shown as it grows, decoding a window
each token (lmkit.generate's _Texts) against decoding the whole text each token (what the stream
did before), on the tokens of the sample data with a checkpoint's tokenizer. The model is left
out: this is the part that used to grow with the text.

    python bench/stream.py -c PROJECT_OR_CKPT [--tokens 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import DATA

from lmkit.checkpoint import Checkpoint
from lmkit.generate import _Texts
from lmkit.project import Project


def whole_text_each_token(tokenizer, tokens: list[int]) -> str:
    shown = ""
    for n in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:n]).rstrip("\ufffd")
        shown += text[len(shown):]
    return shown


def windowed(tokenizer, tokens: list[int]) -> str:
    pieces: list[str] = []
    texts = _Texts(tokenizer, ("\n\n\n\n",), lambda row, piece: pieces.append(piece))
    for n in range(1, len(tokens) + 1):
        texts.stream(0, tokens[:n])
        texts.stopped(0, tokens[:n])
    texts.finish(0, texts.final(tokens))
    return "".join(pieces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--checkpoint", required=True, type=Path)
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    path = args.checkpoint
    if (path / "lmkit.toml").exists() or (path / "checkpoints").is_dir():
        path = Project(path).latest_checkpoint()
    tokenizer = Checkpoint(path).tokenizer()
    text = (DATA / "shakespeare_train.txt").read_text(encoding="utf-8")
    tokens = tokenizer.encode(text[:args.tokens * 8])[:args.tokens]
    times: dict[str, list[float]] = {"whole text each token": [], "window (lmkit)": []}
    for _ in range(args.rounds):  # taking turns
        for (name, seconds), fn in zip(times.items(), (whole_text_each_token, windowed)):
            start = time.perf_counter()
            text = fn(tokenizer, tokens)
            seconds.append(time.perf_counter() - start)
            assert text == tokenizer.decode(tokens), name
    base = statistics.median(times["whole text each token"])
    print(f"| {len(tokens)} tokens | median s | tokens/s | speed-up |\n|---|---|---|---|")
    for name, seconds in times.items():
        med = statistics.median(seconds)
        print(f"| {name} | {med:.3f} | {len(tokens) / med:,.0f} | {base / med:.1f}x |")


if __name__ == "__main__":
    main()
