"""`lmkit chat`: talk to a chat model. On a terminal, a multi-turn conversation with streamed
replies and readline editing; off a terminal, JSONL conversations in, each with its reply out."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cli.options import (
    ChatTemplate,
    CheckpointOpt,
    DeviceOpt,
    Greedy,
    Json,
    MaxNewTokens,
    NoRepeatNgram,
    ProjectDir,
    Quantize,
    Quiet,
    RepetitionPenalty,
    Seed,
    Stop,
    System,
    Temperature,
    TopP,
    common,
    stdin_bytes,
    user_errors,
)

HELP = ("/reset forgets the conversation, /system TEXT sets the system message, /save FILE writes the "
        "conversation as JSONL; Ctrl-C stops a reply, Ctrl-D exits")


def chat(
    ctx: typer.Context,
    system: System = None,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = None,
    top_k: Annotated[int, typer.Option(help="Sample from the k likeliest tokens only (0: all).")] = 0,
    top_p: TopP = 0.95,
    greedy: Greedy = False,
    no_repeat_ngram_size: NoRepeatNgram = 0,
    repetition_penalty: RepetitionPenalty = 1.0,
    stop: Stop = None,
    chat_template: ChatTemplate = None,
    quantize: Quantize = None,
    json_out: Json = False,
    checkpoint: CheckpointOpt = None,
    project: ProjectDir = None,
    device: DeviceOpt = None,
    seed: Seed = None,
    quiet: Quiet = False,
) -> None:
    """Talk to a chat model (the project's latest checkpoint, or -c). On a terminal: type a message,
    the reply streams back; the conversation is kept within the context (oldest turns dropped).
    Off a terminal (or with --json): read {"messages": [...]} conversations, one JSON object a line,
    and write each with the assistant's reply appended."""
    from lmkit import chat as chat_lib
    from lmkit import checkpoint as ckpt_lib
    from lmkit import device as dev
    from lmkit import generate as gen
    from lmkit import project as proj

    opts = common(ctx, project, device, seed, quiet)
    with user_errors():
        stream = stdin_bytes()
        ckpt = ckpt_lib.Checkpoint(ckpt_lib.resolve(checkpoint, proj.Project.open(opts.project, create=False)))
        gen.require_decoder(ckpt, "lmkit chat talks to a decoder")
        sampler = gen.sample_config(ckpt.config.model.arch, temperature, max_new_tokens=max_new_tokens, top_k=top_k,
                                    top_p=top_p, greedy=greedy, seed=opts.seed,
                                    no_repeat_ngram_size=no_repeat_ngram_size,
                                    repetition_penalty=repetition_penalty, stop=tuple(stop or ()))  # checked first
        where = dev.pick_device(opts.device)
        model, tokenizer = gen.load_for_generation(ckpt, where, quantize.value if quantize else None)
        form = chat_lib.chat_format(tokenizer, chat_template)
        session = _Session(gen, chat_lib, model, form, sampler, where, system)
        if stream.isatty() and not json_out:
            _terminal(session, ckpt.path, opts.say)
        else:
            _pipe(session, stream)


class _Session:
    """The conversation so far and how to extend it: what both modes share."""

    def __init__(self, gen: Any, chat_lib: Any, model: Any, form: Any, sampler: Any, where: Any,
                 system: Optional[str]) -> None:
        self.gen, self.chat, self.model, self.form = gen, chat_lib, model, form
        self.sampler, self.where = sampler, where
        self.context = model.config.max_seq_len
        self.room = min(sampler.max_new_tokens, self.context // 2)  # kept free for the reply
        self.system = system
        self.messages: list[dict[str, str]] = self.start()

    def start(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def answer(self, messages: list[dict[str, str]], on_text: Any = None) -> tuple[Any, list[dict[str, str]], int]:
        """(the completion, MESSAGES as they fit the context, how many were dropped to fit)."""
        fitted, dropped = self.chat.fit_history(self.form, messages, self.context, self.room)
        return self.gen.reply(self.model, self.form, fitted, self.sampler, self.where, on_text), fitted, dropped


def _terminal(session: _Session, source: Path, say: Any) -> None:
    import readline  # noqa: F401 - input() gets line editing and history

    say(f"chatting with {source} (context {session.context} tokens). {HELP}.")
    while True:
        try:
            line = input("> ")
        except EOFError:  # Ctrl-D
            sys.stdout.write("\n")
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in a shell
            sys.stdout.write("\n")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            _command(session, line, say)
            continue
        _turn(session, line, say)


def _command(session: _Session, line: str, say: Any) -> None:
    name, _, argument = line.partition(" ")
    if name == "/reset":
        session.messages = session.start()
        say("the conversation is forgotten")
    elif name == "/system":
        session.system = argument.strip() or None
        session.messages = session.start() + [m for m in session.messages if m["role"] != "system"]
        say(f"system message: {session.system}" if session.system else "no system message")
    elif name == "/save" and argument.strip():
        from lmkit.errors import LmkitError
        from lmkit.fileio import atomic_write_bytes

        path = Path(argument.strip()).expanduser()
        try:
            atomic_write_bytes(path, session.chat.conversation_line(session.messages).encode("utf-8"))
        except (OSError, LmkitError) as err:
            say(f"could not save to {path}: {err}")
        else:
            say(f"saved {len(session.messages)} messages to {path}")
    else:
        say(HELP)


def _turn(session: _Session, text: str, say: Any) -> None:
    """Send TEXT, stream the reply; Ctrl-C stops the reply, keeping what was shown of it."""
    shown: list[str] = []

    def on_text(_: int, piece: str) -> None:
        shown.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    messages = [*session.messages, {"role": "user", "content": text}]
    try:
        completion, messages, dropped = session.answer(messages, on_text)
        reply = completion.samples[0].text
    except KeyboardInterrupt:
        reply, dropped = "".join(shown), 0
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    if dropped:
        say(f"(the {dropped} oldest messages no longer fit the context of {session.context} tokens and are "
            "dropped)")
    session.messages = [*messages, {"role": "assistant", "content": reply}]


def _pipe(session: _Session, stream: Any) -> None:
    """Each stdin line a conversation ending with a user's message; each written back with the reply."""
    from lmkit.errors import DataError

    for number, raw in enumerate(stream, 1):
        where = f"line {number} of stdin"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # no byte-order mark: it is not JSON
        except UnicodeDecodeError:
            raise DataError(f"{where} is not valid UTF-8") from None
        if not line.strip():
            continue
        messages = session.chat.parse_conversation(line, where, needs_assistant=False)
        if messages[-1]["role"] != "user":
            raise DataError(f"{where}: the last message is the {messages[-1]['role']}'s; a conversation to answer "
                            "ends with the user's")
        if session.system and messages[0]["role"] != "system":
            messages = [*session.start(), *messages]
        completion, _, dropped = session.answer(messages)
        sample = completion.samples[0]
        extra = {"finish_reason": sample.finish_reason, "tokens": len(sample.tokens), "seed": completion.seed,
                 **({"dropped_messages": dropped} if dropped else {})}
        sys.stdout.write(session.chat.conversation_line([*messages, {"role": "assistant", "content": sample.text}],
                                                        **extra))
        sys.stdout.flush()
