"""`lmkit finetune --task chat`, `lmkit eval` on conversations, `lmkit generate --chat`, and `lmkit chat`
driven for real: on a pseudo-terminal (streamed replies, /commands, Ctrl-C, Ctrl-D) and as a JSONL pipe."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.cli.conftest import assert_user_error, lmkit


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory, sample_text) -> Path:
    """Short exchanges (they fit the tiny model's 32-token context): one line asks, the next answers."""
    lines = [ln for ln in sample_text.splitlines() if 3 < len(ln) < 24][:400]
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for question, answer in zip(lines[::2], lines[1::2]):
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def test_chat_finetuning_lowers_the_replies_loss(tiny_project, chat_file, tmp_path) -> None:
    base = tiny_project.latest_checkpoint()
    result = lmkit("finetune", chat_file, "--task", "chat", "--from", base, "-p", tmp_path, "--max-steps", "40",
                   "--set", "train.batch_size=16", "--set", "train.lr=3e-3", "--set", "train.eval_interval=20",
                   "--set", "train.warmup_steps=5", "--set", "model.dropout=0")
    assert result.exit_code == 0, result.output
    assert "180 training conversations" in result.output  # 20 held back for validation
    scored = json.loads(lmkit("eval", chat_file, "-p", tmp_path, "--json").stdout)
    assert scored["base"] == str(base) and scored["conversations"] == 200 and scored["left_out"] == 0
    assert scored["loss"] < scored["base_loss"] - 0.5 and scored["bits_per_byte"] < scored["base_bits_per_byte"]
    before = json.loads(lmkit("eval", chat_file, "-c", base, "--task", "chat", "--json").stdout)
    assert before["loss"] == pytest.approx(scored["base_loss"])


def test_generate_chat_and_the_pipe_mode_agree_and_round_trip(ckpt_project) -> None:
    args = ["-p", ckpt_project, "--greedy", "--max-new-tokens", "6"]
    answered = json.loads(lmkit("generate", "--chat", "Who's there?", "--system", "Be brief.", "--json", *args).stdout)
    reply = answered["completions"][0]["text"]
    conversations = [{"messages": [{"role": "user", "content": "Who's there?"}]},
                     {"messages": [{"role": "user", "content": "Nay, answer me."},
                                   {"role": "assistant", "content": "Long live the King!"},
                                   {"role": "user", "content": "Bernardo?"}]}]
    result = lmkit("chat", *args, "--system", "Be brief.", input="".join(json.dumps(c) + "\n" for c in conversations))
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(out) == 2 and all(o["tokens"] <= 6 and o["finish_reason"] in ("length", "eos") for o in out)
    assert out[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert out[0]["messages"][1:] == [*conversations[0]["messages"], {"role": "assistant", "content": reply}]
    assert out[1]["messages"][1:4] == conversations[1]["messages"]
    again = {"messages": [*out[0]["messages"], {"role": "user", "content": "Stand, ho!"}]}  # a reply fed back
    follow = lmkit("chat", *args, input=json.dumps(again) + "\n")
    assert follow.exit_code == 0 and len(json.loads(follow.stdout)["messages"]) == 5


def test_chat_input_errors(ckpt_project, tiny_bert_project) -> None:
    assert_user_error(lmkit("chat", "-p", ckpt_project, input='{"messages": [{"role": "bot", "content": "x"}]}\n'),
                      "line 1 of stdin: message 1 has role 'bot'")
    assert_user_error(lmkit("chat", "-p", ckpt_project, input='{"messages": [{"role": "user", "content": "x"}, '
                            '{"role": "assistant", "content": "y"}]}\n'), "ends with the user's")
    assert_user_error(lmkit("chat", "-p", ckpt_project, input=b'{"messages": "\xff"}\n'), "not valid UTF-8")
    assert_user_error(lmkit("chat", "-p", tiny_bert_project.root, input="{}\n"), "talks to a decoder")
    assert_user_error(lmkit("generate", "-p", ckpt_project, "hi", "--system", "x"), "go with --chat")


class Terminal:
    """`lmkit chat` on a pseudo-terminal, its controlling terminal: keys typed go in, Ctrl-C is SIGINT."""

    def __init__(self, *args: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its stdin, stdout and stderr
            os.execv(sys.executable, [sys.executable, "-m", "lmkit", "chat", *args])
        self.seen = ""

    def expect(self, text: str, timeout: float = 60.0) -> str:
        """Read until TEXT has appeared; what came before it (since the last expect)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"{text!r} did not appear; the terminal shows {self.seen[-500:]!r}")
            try:
                self.seen += os.read(self.fd, 4096).decode("utf-8", "replace").replace("\r\n", "\n")
            except OSError:  # the child is gone
                raise AssertionError(f"the session ended before {text!r}: {self.seen[-500:]!r}") from None
        before, _, self.seen = self.seen.partition(text)
        return before

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode("utf-8"))

    def exit_code(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                if select.select([self.fd], [], [], 0.05)[0]:
                    os.read(self.fd, 4096)  # keep the pty drained
            except OSError:
                time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the session did not exit")


def test_a_terminal_session(ckpt_project, tmp_path) -> None:
    saved = tmp_path / "talk.jsonl"
    term = Terminal("-p", str(ckpt_project), "--greedy", "--max-new-tokens", "8", "--system", "You are Horatio.")
    term.expect("Ctrl-D exits")
    term.expect("> ")
    term.type("Who's there?\n")
    streamed = term.expect("> ")
    term.type(f"/save {saved}\n")
    term.expect("saved 3 messages")
    term.expect("> ")
    term.type("/reset\n")
    term.expect("forgotten")
    term.expect("> ")
    term.type("\x04")  # Ctrl-D
    assert term.exit_code() == 0
    messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "Who's there?"
    alone = json.loads(lmkit("generate", "-p", ckpt_project, "--chat", "Who's there?", "--system", "You are Horatio.",
                             "--greedy", "--max-new-tokens", "8", "--json").stdout)
    assert messages[2]["content"] == alone["completions"][0]["text"]
    assert streamed.replace("\n", "").endswith(messages[2]["content"].replace("\n", ""))


def test_ctrl_c_stops_the_reply_not_the_session(ckpt_project) -> None:
    term = Terminal("-p", str(ckpt_project), "--greedy", "--max-new-tokens", "100000")
    term.expect("> ")
    term.type("Speak!\n")
    time.sleep(1.5)  # the reply is streaming (an untuned model does not end its turn)
    term.type("\x03")  # Ctrl-C
    term.expect("[stopped]")
    term.expect("> ")  # the session goes on
    term.type("/help\n")
    term.expect("/reset")
    term.expect("> ")  # readline reads again: Ctrl-D now means EOF
    term.type("\x04")
    assert term.exit_code() == 0
