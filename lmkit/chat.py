"""Chat: conversations as role/content messages (the format of the OpenAI API and of Hugging Face
datasets), rendered by a Jinja chat template exactly as transformers' apply_chat_template renders
them, tokenized, and marked so that finetuning learns the assistant's turns only.

An imported model brings its own template (tokenizer_config.json's chat_template). lmkit's own
tokenizers reserve role markers and an end-of-turn as special tokens and get
lmkit.tokenizer.BUILTIN_CHAT_TEMPLATE.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lmkit import corpus
from lmkit.errors import CheckpointError, DataError
from lmkit.tokenizer import AnyTokenizer

ROLES = ("system", "user", "assistant")
Message = dict[str, str]  # {"role": one of ROLES, "content": text}


def check_messages(messages: Any, where: str, *, needs_assistant: bool = True) -> list[Message]:
    """MESSAGES as a list of {"role", "content"} dicts (other keys are kept for the template).

    Raises:
        DataError: starting with WHERE (a file and line), for anything else.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for k, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {k} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {k} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            what = "has no \"content\"" if content is None else f"has content {content!r:.40}, not a string"
            raise DataError(f"{where}: message {k} {what}")
    if needs_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn to learn")
    return messages


def read_conversations(path: Path) -> list[list[Message]]:
    """JSONL, one conversation a line: {"messages": [{"role": ..., "content": ...}, ...]}.

    Raises:
        DataError: naming the file and line of the first malformed conversation.
    """
    if not corpus.is_jsonl(path):
        raise DataError(f"{path}: chat data must be JSONL, one {{\"messages\": [...]}} object a line")
    conversations = []
    for n, line in enumerate(corpus.read_text(path).split("\n"), start=1):
        if line.strip():
            conversations.append(parse_conversation(line, f"{path}:{n}"))
    if not conversations:
        raise DataError(f"{path} has no conversations")
    return conversations


def parse_conversation(line: str, where: str, *, needs_assistant: bool = True) -> list[Message]:
    """One JSONL line {"messages": [...]} (or a bare list of messages) -> its messages."""
    record = corpus.json_line(line, where)
    messages = record.get("messages") if isinstance(record, dict) else record
    if isinstance(record, dict) and "messages" not in record:
        raise DataError(f"{where}: missing field 'messages' (found: {', '.join(record) or 'none'})")
    return check_messages(messages, where, needs_assistant=needs_assistant)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """TEMPLATE in the sandboxed Jinja environment of transformers' apply_chat_template: the same
    options, extension, filters and globals, so any Hub template renders the same text."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # transformers marks assistant text with {% generation %}...{% endgeneration %}; lmkit finds the
        # assistant's turns by rendering prefixes instead (every template has them), so the tag renders its body.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise CheckpointError(f"the chat template does not parse: {err.message} (line {err.lineno})") from None


def load_template(path: Path) -> str:
    """A --chat-template FILE: a Jinja template, or a tokenizer_config.json holding one."""
    text = corpus.read_text(path)
    if path.suffix.lower() == ".json":
        try:
            text = json.loads(text).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            text = None
        if not isinstance(text, str):
            raise DataError(f"{path} has no \"chat_template\" string")
    _compile(text)
    return text


def chat_format(tokenizer: AnyTokenizer, template_file: Path | None = None) -> ChatFormat:
    """TOKENIZER's chat format: with its own template, or the --chat-template TEMPLATE_FILE's (see load_template).

    Raises:
        CheckpointError: no template at all, or one that does not parse.
        DataError: TEMPLATE_FILE cannot be read, or holds no template.
    """
    return ChatFormat(tokenizer, load_template(template_file) if template_file else None)


@dataclass
class EncodedChat:
    """One conversation as the model reads it."""

    ids: list[int]
    learn: list[bool]  # per token: the assistant wrote it (its text and end-of-turn): a training target
    turn_ends: list[int]  # token index after each assistant turn: where the conversation may be cut
    turn_bytes: list[int]  # UTF-8 bytes of each assistant turn's text, for bits per byte

    @property
    def assistant_bytes(self) -> int:
        return sum(self.turn_bytes)


class ChatFormat:
    """A tokenizer with its chat template: conversations to token ids, prompts for the next reply,
    and the token that ends a reply."""

    def __init__(self, tokenizer: AnyTokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.template = template or tokenizer.chat_template
        if self.template is None:
            raise CheckpointError(
                "this checkpoint's tokenizer has no chat template and no chat tokens (it was trained before "
                "lmkit reserved them): retrain the tokenizer (`lmkit tokenize train` in a new project, then "
                "pretrain), or pass --chat-template FILE (a Jinja template, or a tokenizer_config.json)")
        self._compiled = _compile(self.template)
        self.end_of_turn = self._end_of_turn()
        self.stop_ids = sorted({*tokenizer.stop_ids, *([self.end_of_turn] if self.end_of_turn is not None else [])})

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._compiled.render(messages=list(messages), tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self._special_tokens())
        except jinja2.TemplateError as err:
            raise DataError(f"the chat template refused the conversation: {err}") from None

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """The ids a reply to MESSAGES continues: the conversation and the assistant's header."""
        return self.tokenizer.encode_with_special_tokens(self.render(messages, add_generation_prompt=True))

    def encode(self, messages: Sequence[Message]) -> EncodedChat:
        """The whole conversation's ids (those of apply_chat_template(messages, tokenize=True)), with
        each assistant turn -- from its first token through the end-of-turn token -- marked to learn.

        Raises:
            DataError: the template renders an earlier part of the conversation differently once more
                turns follow, so the assistant's turns cannot be found.
        """
        text = self.render(messages)
        ids = self.tokenizer.encode_with_special_tokens(text)
        learn, turn_ends, turn_bytes = [False] * len(ids), [], []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._token_index(text, self.render(messages[:k], add_generation_prompt=True), ids)
            end = self._token_index(text, self.render(messages[:k + 1]), ids)
            turn = ids[start:end]
            if self.end_of_turn in turn:  # the template's own text after the end-of-turn ("\n") is not the reply
                end = start + turn.index(self.end_of_turn) + 1
            learn[start:end] = [True] * (end - start)
            turn_ends.append(end)
            turn_bytes.append(len(message["content"].encode("utf-8")))
        return EncodedChat(ids, learn, turn_ends, turn_bytes)

    def fit(self, encoded: EncodedChat, max_len: int) -> tuple[EncodedChat, str]:
        """ENCODED cut to MAX_LEN tokens: after the last assistant turn that fits (whole turns),
        or, when even the first does not, inside it. The second value says which: "whole",
        "turns" or "mid-turn"."""
        if len(encoded.ids) <= max_len:
            return encoded, "whole"
        ends = [e for e in encoded.turn_ends if e <= max_len]
        if ends:
            return EncodedChat(encoded.ids[:ends[-1]], encoded.learn[:ends[-1]], ends,
                               encoded.turn_bytes[:len(ends)]), "turns"
        ids, learn = encoded.ids[:max_len], encoded.learn[:max_len]
        kept = self.tokenizer.decode([i for i, keep in zip(ids, learn) if keep and i != self.end_of_turn])
        return EncodedChat(ids, learn, [], [len(kept.encode("utf-8"))]), "mid-turn"

    def _token_index(self, text: str, prefix: str, ids: list[int]) -> int:
        """How many of IDS (the tokens of TEXT) PREFIX, the text of an earlier part, covers."""
        if not text.startswith(prefix):
            raise DataError("the chat template renders the start of a conversation differently once more turns "
                            "follow, so lmkit cannot tell the assistant's turns apart")
        prefix_ids = self.tokenizer.encode_with_special_tokens(prefix)
        n = 0
        while n < min(len(prefix_ids), len(ids)) and prefix_ids[n] == ids[n]:
            n += 1
        return n

    def _special_tokens(self) -> dict[str, str]:
        """What apply_chat_template passes besides the messages: the special tokens' strings."""
        return {f"{role}_token": token for role, token in self.tokenizer.special_tokens().items()}

    def _end_of_turn(self) -> int | None:
        """The token right after an assistant's text in a rendered conversation (<|im_end|>,
        <|eot_id|>, <|end|>), when it is one of the tokenizer's special tokens; else None."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            text = self.render(probe)
        except DataError:
            return None
        after = text[text.rfind("Hello") + len("Hello"):]
        ids = self.tokenizer.encode_with_special_tokens(after) if after else []
        return ids[0] if ids and self.tokenizer.is_special(ids[0]) else None


def encode_for_training(form: ChatFormat, conversations: Sequence[Sequence[Message]], max_len: int,
                        source: str) -> tuple[list[EncodedChat], dict[str, int]]:
    """CONVERSATIONS encoded and fitted to MAX_LEN tokens, those with no reply token left out; and
    the counts: conversations kept, how many were cut ("turns", "mid-turn") or dropped, assistant tokens.

    Raises:
        DataError: not one conversation of SOURCE has a reply token within MAX_LEN.
    """
    counts: Counter[str] = Counter()
    kept = []
    for messages in conversations:
        encoded, how = form.fit(form.encode(messages), max_len)
        if not any(encoded.learn[1:]):  # the first token is never a target
            counts["dropped"] += 1
            continue
        counts[how] += 1
        counts["assistant_tokens"] += sum(encoded.learn[1:])
        kept.append(encoded)
    if not kept:
        raise DataError(f"{source}: no conversation has a reply within the context of {max_len} tokens")
    return kept, {"conversations": len(kept), "assistant_tokens": counts["assistant_tokens"],
                  **{key: counts[key] for key in ("whole", "turns", "mid-turn", "dropped")}}


def fit_history(form: ChatFormat, messages: Sequence[Message], max_len: int, room: int) -> tuple[list[Message], int]:
    """MESSAGES with the oldest turns dropped -- never the system message or the last message --
    until the prompt for the next reply and ROOM new tokens fit in MAX_LEN; and how many messages
    were dropped. A user turn goes with the reply after it."""
    messages = list(messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    dropped = 0
    while len(rest) > 1 and len(form.prompt(system + rest)) + room > max_len:
        k = 2 if len(rest) > 2 and rest[1]["role"] == "assistant" else 1
        rest, dropped = rest[k:], dropped + k
    return system + rest, dropped


def conversation_line(messages: Sequence[Message], **extra: Any) -> str:
    """MESSAGES as one JSONL line, {"messages": [...], **EXTRA}: what read_conversations reads."""
    return json.dumps({"messages": list(messages), **extra}, ensure_ascii=False) + "\n"
