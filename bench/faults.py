"""Faults, crafted files and abuse, tried as a hostile but realistic user would: three sets, each
case a pass or a fail with its reason. Not a test (minutes, and timing-dependent): run by hand
after changes that touch saving, loading, input reading or the server.

    python bench/faults.py -o OUT [--kills 17] [--sets kill,crafted,server]

- kill: a tiny GPT pretrains with a checkpoint every 2 steps; it is killed with SIGKILL at random
  moments (most land in a save) and restarted with the same command each time. After every kill
  the project must still open (`lmkit info` exits 0) and the run must go on; at the end its
  weights must equal an uninterrupted run's bit for bit, and no temporary file may be left.
- crafted: damaged or hostile files (safetensors headers, pickles, JSON, symlinks, tokenizers,
  corpora) given to the commands that read them. Each must end in one `error:` line and exit 2
  (or, where a fallback is the right answer, exit 0 with the fallback taken); never a traceback,
  never a write through a planted symlink, never code run from a pickle.
- server: `lmkit serve` on 127.0.0.1 gets malformed requests, wrong types, floods and clients
  that vanish. Every 4xx must carry OpenAI's error object, no request may get a 5xx, and the
  server must still answer a completion at the end.

Prints one line per failed case and the counts per set; writes OUT/faults.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import DATA

LMKIT = str(Path(sys.executable).with_name("lmkit"))
CORPUS = DATA / "shakespeare_train.txt"
STEPS = 300  # ~13 s of training on 2 idle cores: room for 17 kills
TINY = ["--arch", "gpt", "--preset", "tiny", "--set", "tokenizer.vocab_size=400", "--set", "model.max_seq_len=32",
        "--set", "train.batch_size=8", "--set", "train.save_interval=2", "--set", "train.eval_interval=10",
        "--set", "train.keep_checkpoints=2", "--max-steps", str(STEPS), "--quiet"]
RESUME = [*TINY[:-3], "--max-steps", str(STEPS + 4), "--quiet", "--resume"]  # two more checkpoints


@dataclass
class Tally:
    name: str
    passed: int = 0
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, case: str, why: str = "") -> None:
        if ok:
            self.passed += 1
        else:
            self.failures.append(f"{case}: {why}")
            print(f"FAIL [{self.name}] {case}: {why}", flush=True)


def run(*args: str, stdin: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LMKIT_DEBUG"}
    done = subprocess.run([LMKIT, *args], input=stdin, capture_output=True, timeout=timeout, env=env)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(errors="replace"),
                                       done.stderr.decode(errors="replace"))


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """'' when DONE ended as a user error should (exit 2, one `error:` line, no traceback); else why not."""
    if "Traceback" in done.stderr or "Traceback" in done.stdout:
        return "traceback: " + done.stderr.strip().splitlines()[-1][:160]
    if done.returncode != 2:
        return f"exit {done.returncode}: {(done.stderr.strip() or done.stdout.strip())[-160:]}"
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    if len(errors) != 1 or "Usage:" in done.stderr:
        return f"not one error line: {done.stderr.strip()[:160]}"
    return ""


def leftovers(root: Path) -> list[str]:
    """Temporary names the atomic writers use (.X.tmp-PID, .X.old-PID, .tmpXXXX) anywhere under ROOT."""
    return [str(p.relative_to(root)) for p in root.rglob(".*")
            if ".tmp" in p.name or ".old-" in p.name]


def tensors(path: Path) -> dict[str, bytes]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}  # noqa: SIM118


def newest_step(project: Path) -> int:
    """The newest periodic checkpoint's step, -1 for none."""
    steps = [int(p.name.split("-")[1]) for p in (project / "checkpoints").glob("run*/step-*") if p.name[5:].isdigit()]
    return max(steps, default=-1)


def newest_weights(project: Path) -> Path:
    """The newest periodic checkpoint's weights (step folders are zero-padded: names sort as numbers)."""
    return max((project / "checkpoints").glob("run*/step-*")) / "model.safetensors"


# --- kill -9 ----------------------------------------------------------------------------------
def kill_set(out: Path, kills: int, tally: Tally) -> Path:
    reference = out / "reference"
    done = run("pretrain", str(CORPUS), "-p", str(reference), *TINY)
    tally.check(done.returncode == 0, "uninterrupted run", done.stderr[-300:])
    project = out / "killed"
    rng = random.Random(0)
    landed = 0
    command = [LMKIT, "pretrain", str(CORPUS), "-p", str(project), *TINY]
    while landed < kills:
        before = newest_step(project)
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait for the run to save a checkpoint of its own, then kill it a moment later: with a save
        # every 2 steps, most kills land inside one (timing alone would depend on the machine's load)
        while proc.poll() is None and newest_step(project) <= before:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:  # it reached the end first
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        landed += 1
        info = run("info", str(project))
        tally.check(info.returncode == 0, f"info after kill {landed}", (info.stderr or info.stdout)[-200:])
    done = run("pretrain", str(CORPUS), "-p", str(project), *TINY)
    tally.check(done.returncode == 0, f"finish after {landed} kills", done.stderr[-300:])
    if done.returncode == 0 and (reference / "checkpoints").is_dir():
        same = tensors(newest_weights(project)) == tensors(newest_weights(reference))
        tally.check(same, f"weights after {landed} kills equal the uninterrupted run's", "they differ")
    left = leftovers(project)
    tally.check(not left, "no temporary files left", ", ".join(left[:5]))
    print(f"kill: {landed} kills landed", flush=True)
    return reference


# --- crafted files ----------------------------------------------------------------------------
def safetensors_bytes(header: dict | bytes, body: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def crafted_set(reference: Path, out: Path, tally: Tally) -> None:
    step = newest_weights(reference).parent
    marker = out / "pickle-ran"

    def fresh(name: str) -> tuple[Path, Path]:
        """A copy of the reference project and its newest checkpoint."""
        root = out / "crafted" / name
        shutil.copytree(reference, root, symlinks=True)
        return root, root / step.relative_to(reference)

    def poke(path: Path, offset: int, data: bytes) -> None:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    def evil_pickle(path: Path) -> None:
        import pickle
        path.write_bytes(pickle.dumps(Evil()))

    weights: dict[str, Callable[[Path], None]] = {
        "empty model.safetensors": lambda p: p.write_bytes(b""),
        "truncated model.safetensors": lambda p: p.write_bytes(p.read_bytes()[:1000]),
        "header length 2^63": lambda p: poke(p, 0, struct.pack("<Q", 1 << 63)),
        "header not JSON": lambda p: p.write_bytes(safetensors_bytes(b"{not json" + b" " * 40)),
        "offsets past the end": lambda p: p.write_bytes(safetensors_bytes(
            {"transformer.wte.weight": {"dtype": "F32", "shape": [400, 64], "data_offsets": [0, 10 ** 9]}})),
        "unknown dtype": lambda p: p.write_bytes(safetensors_bytes(
            {"x": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)),
        "valid file, no tensors": lambda p: p.write_bytes(safetensors_bytes({})),
        "4000 bytes of 0xff": lambda p: poke(p, p.stat().st_size // 2, b"\xff" * 4000),
        "40 KB of zeros": lambda p: poke(p, p.stat().st_size // 3, b"\0" * 40_000),
        "a directory": lambda p: (p.unlink(), p.mkdir()),
    }
    for name, damage in weights.items():
        for command in (["generate", "--max-new-tokens", "4", "hi"], ["eval", str(DATA / "shakespeare_heldout.txt")]):
            root, ckpt = fresh(f"w-{len(tally.failures)}-{tally.passed}")
            damage(ckpt / "model.safetensors")
            done = run(*command, "-c", str(ckpt), "-p", str(root))
            tally.check(not one_line_error(done), f"{command[0]} -c, {name}", one_line_error(done))
        root, ckpt = fresh(f"r-{len(tally.failures)}-{tally.passed}")
        damage(ckpt / "model.safetensors")
        done = run("pretrain", str(CORPUS), "-p", str(root), *RESUME)
        fell_back = done.returncode == 0 and "Traceback" not in done.stderr
        tally.check(fell_back or not one_line_error(done), f"resume, {name}", done.stderr.strip()[-200:])

    state_files = sorted(p.name for p in step.iterdir() if p.suffix == ".pt")
    for state in state_files:
        root, ckpt = fresh(f"p-{state}")
        evil_pickle(ckpt / state)
        done = run("pretrain", str(CORPUS), "-p", str(root), *RESUME)
        tally.check(not marker.exists(), f"resume, hostile pickle in {state}", "the pickle ran")
        tally.check("Traceback" not in done.stderr, f"resume, hostile pickle in {state} (no traceback)",
                    done.stderr.strip()[-200:])

    jsons = {"{": b"{", "[]": b"[]", "null": b"null", "binary": bytes(range(256)),
             "unknown key": None, "arch foo": None, "vocab -1": None, "d_model 1e20": None}
    for name, raw in jsons.items():
        root, ckpt = fresh(f"j-{name}")
        cfg_file = ckpt / "config.json"
        if raw is None:
            cfg = json.loads(cfg_file.read_text())
            model = cfg.get("config", cfg).get("model", {}) if isinstance(cfg.get("config", cfg), dict) else {}
            if name == "unknown key":
                model["no_such_field"] = 1
            elif name == "arch foo":
                model["arch"] = "foo"
            elif name == "vocab -1":
                model["vocab_size"] = -1
            else:
                model["d_model"] = 10 ** 20
            raw = json.dumps(cfg).encode()
        cfg_file.write_bytes(raw)
        for command in (["generate", "--max-new-tokens", "4", "-c", str(ckpt), "hi"], ["info", str(ckpt)]):
            done = run(*command, "-p", str(root))
            tally.check(not one_line_error(done), f"{command[0]} -c, checkpoint config.json {name}",
                        one_line_error(done))

    for name, raw in {"{": b"{", "outside the project": json.dumps({"path": "../../../etc"}).encode(),
                      "missing step": json.dumps({"path": "run1/step-999999"}).encode()}.items():
        root, _ = fresh(f"l-{name}")
        (root / "checkpoints" / "latest.json").write_bytes(raw)
        done = run("generate", "--max-new-tokens", "4", "-p", str(root), "hi")
        ok = done.returncode == 0 or not one_line_error(done)
        tally.check(ok and "Traceback" not in done.stderr, f"generate, latest.json {name}", one_line_error(done))

    for name, raw in {"run config.json {": b"{", "metrics.jsonl garbage": b"\xff\xfe{{{\n"}.items():
        root, _ = fresh(f"m-{name}")
        target = "config.json" if "config" in name else "metrics.jsonl"
        (root / "runs" / "run1" / target).write_bytes(raw)
        for command in (["runs"], ["plot", "run1", "-o", str(root / "curves.png")]):
            done = run(*command, "-p", str(root))
            tally.check("Traceback" not in done.stderr and done.returncode in (0, 2), f"{command[0]}, {name}",
                        done.stderr.strip()[-200:])

    for name in ("tokenizer.model", "tokenizer.json"):
        root, _ = fresh(f"t-{name}")
        (root / "tokenizer" / name).write_bytes(b"\x00garbage" * 10)
        done = run("tokenize", "encode", "-p", str(root), stdin=b"hello\n")
        # tokenizer.json holds the fingerprint and settings; encoding needs only the model
        tally.check(not one_line_error(done) or (name == "tokenizer.json" and done.returncode == 0), f"tokenize encode, damaged {name}", one_line_error(done))

    # symlinks planted where lmkit writes: the file they point to must stay as it was
    for name in (".lock", "runs/run1/metrics.jsonl"):
        root, _ = fresh(f"s-{name.replace('/', '-')}")
        victim = out / "crafted" / f"victim-{name.replace('/', '-')}.txt"
        victim.write_text("precious\n")
        link = root / name
        link.unlink(missing_ok=True)
        link.symlink_to(victim)
        done = run("pretrain", str(CORPUS), "-p", str(root), *RESUME)
        tally.check(victim.read_text() == "precious\n", f"resume, {name} a symlink", "wrote through the symlink")
        tally.check("Traceback" not in done.stderr, f"resume, {name} a symlink (no traceback)",
                    done.stderr.strip()[-200:])

    # export and merge never replace a checkpoint
    root, ckpt = fresh("export")
    before = (ckpt / "model.safetensors").read_bytes()
    for target in (ckpt, root / "checkpoints" / "run1"):
        done = run("export", str(target), "-c", str(ckpt), "-p", str(root), "--force")
        tally.check((ckpt / "model.safetensors").is_file() and (ckpt / "model.safetensors").read_bytes() == before
                    and not one_line_error(done), f"export --force onto {target.name}",
                    one_line_error(done) or "the checkpoint was replaced")

    corpora: dict[str, bytes | None] = {
        "missing": None, "empty": b"", "binary": bytes(range(256)) * 64, "not UTF-8": b"caf\xe9 au lait\n" * 100,
        "only newlines": b"\n" * 1000, "NUL bytes": b"text\0more\0" * 200,
    }
    for name, raw in corpora.items():
        path = out / "crafted" / f"corpus-{name.replace(' ', '_')}.txt"
        if raw is not None:
            path.write_bytes(raw)
        project = out / "crafted" / f"new-{name.replace(' ', '_')}"
        done = run("pretrain", str(path), "-p", str(project), *TINY)
        tally.check(not one_line_error(done), f"pretrain, corpus {name}", one_line_error(done))
        tally.check(not project.exists(), f"pretrain, corpus {name} leaves no project", "a folder was created")
    huge = out / "crafted" / "corpus-huge-line.txt"
    huge.write_bytes(b"word " * 4_000_000 + b"\n" + CORPUS.read_bytes()[:200_000])
    done = run("tokenize", "train", str(huge), "-p", str(out / "crafted" / "huge"), "--vocab-size", "300")
    tally.check(done.returncode == 0 or not one_line_error(done), "tokenize train, a 20 MB line",
                one_line_error(done))
    tally.check(not marker.exists(), "no pickle ran anywhere", "the pickle ran")


# --- server -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def openai_error(status: int, body: bytes) -> str:
    """'' when a 4xx reply carries OpenAI's error object; else why not."""
    if not 400 <= status < 500:
        return f"status {status}"
    try:
        error = json.loads(body)["error"]
        return "" if isinstance(error["message"], str) and "type" in error else "no message/type"
    except (ValueError, KeyError, TypeError):
        return f"not OpenAI's error shape: {body[:120]!r}"


def server_set(reference: Path, tally: Tally) -> None:
    port = free_port()
    server = subprocess.Popen([LMKIT, "serve", "-p", str(reference), "--port", str(port), "--max-queue", "16",
                               "--max-batch", "4", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(120):
            try:
                if request(port, "GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            tally.check(False, "server starts", server.stderr.read1(2000).decode(errors="replace"))
            return
        good = {"prompt": "To be", "max_tokens": 4, "temperature": 0}
        bad_completions = {
            "not JSON": b"{", "empty body": b"", "an array": b"[]", "a number": b"5", "null": b"null",
            "not UTF-8": b'{"prompt": "\xff\xfe", "max_tokens": 4}',
            "max_tokens a string": json.dumps({**good, "max_tokens": "5"}).encode(),
            "max_tokens true": json.dumps({**good, "max_tokens": True}).encode(),
            "max_tokens -1": json.dumps({**good, "max_tokens": -1}).encode(),
            "max_tokens 1e12": json.dumps({**good, "max_tokens": 10 ** 12}).encode(),
            "stream yes": json.dumps({**good, "stream": "yes"}).encode(),
            "temperature NaN": b'{"prompt": "hi", "max_tokens": 4, "temperature": NaN}',
            "temperature -1": json.dumps({**good, "temperature": -1}).encode(),
            "top_p 2": json.dumps({**good, "top_p": 2}).encode(),
            "n 0": json.dumps({**good, "n": 0}).encode(),
            "logprobs yes": json.dumps({**good, "logprobs": "yes"}).encode(),
            "stop 5": json.dumps({**good, "stop": 5}).encode(),
            "stop [1]": json.dumps({**good, "stop": [1]}).encode(),
            "prompt mixed list": json.dumps({**good, "prompt": ["a", 1]}).encode(),
            "prompt missing": json.dumps({"max_tokens": 4}).encode(),
            "prompt 1 MB": json.dumps({**good, "prompt": "x " * 500_000}).encode(),
            "deep nesting": b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        }
        for name, body in bad_completions.items():
            status, reply = request(port, "POST", "/v1/completions", body)
            tally.check(not openai_error(status, reply), f"completions, {name}", openai_error(status, reply))
        bad_chat = {
            "messages a string": {"messages": "hi"}, "messages empty": {"messages": []},
            "role missing": {"messages": [{"content": "hi"}]}, "content a number": {"messages": [{"role": "user",
                                                                                              "content": 5}]},
        }
        for name, body in bad_chat.items():
            status, reply = request(port, "POST", "/v1/chat/completions", json.dumps(body).encode())
            tally.check(not openai_error(status, reply), f"chat, {name}", openai_error(status, reply))
        for name, (method, path) in {"unknown route": ("GET", "/v1/nothing"),
                                     "wrong method": ("GET", "/v1/completions")}.items():
            status, reply = request(port, method, path)
            tally.check(not openai_error(status, reply), f"{name}", openai_error(status, reply))
        status, reply = request(port, "POST", "/v1/completions", json.dumps(good).encode(),
                                {"Content-Type": "text/plain"})
        tally.check(status == 200 or not openai_error(status, reply), "text/plain content type",
                    openai_error(status, reply))

        # a flood: more clients at once than batch + queue hold; each gets 200 or 429, never a 5xx
        def one(_: int) -> int:
            try:
                return request(port, "POST", "/v1/completions", json.dumps({**good, "max_tokens": 16}).encode())[0]
            except OSError:
                return -1
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            statuses = list(pool.map(one, range(64)))
        tally.check(all(s in (200, 429) for s in statuses), "flood of 64",
                    f"statuses {sorted(set(statuses))}")
        tally.check(200 in statuses and 429 in statuses, "flood of 64 sheds load with 429",
                    f"statuses {sorted(set(statuses))}")

        # clients that vanish: mid-stream, after sending half a body, after the headers
        for _ in range(8):
            with socket.create_connection(("127.0.0.1", port)) as s:
                body = json.dumps({**good, "max_tokens": 64, "stream": True}).encode()
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
                s.recv(200)
        for _ in range(8):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"pro")
        for _ in range(8):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost")
        time.sleep(1)
        status, reply = request(port, "POST", "/v1/completions", json.dumps(good).encode())
        tally.check(status == 200 and json.loads(reply)["choices"], "a completion after the abuse", f"status {status}")
        tally.check(server.poll() is None, "server still running", "it exited")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, err = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
        tally.check("Traceback" not in err.decode(errors="replace"), "no traceback in the server's log",
                    err.decode(errors="replace")[-300:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--kills", type=int, default=17)
    parser.add_argument("--sets", default="kill,crafted,server")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    sets = args.sets.split(",")
    tallies = {name: Tally(name) for name in sets}
    reference = args.out / "reference"
    if "kill" in sets:
        kill_set(args.out, args.kills, tallies["kill"])
    else:
        run("pretrain", str(CORPUS), "-p", str(reference), *TINY)
    if "crafted" in sets:
        crafted_set(reference, args.out, tallies["crafted"])
    if "server" in sets:
        server_set(reference, tallies["server"])
    for tally in tallies.values():
        print(f"{tally.name}: {tally.passed} passed, {len(tally.failures)} failed")
    (args.out / "faults.json").write_text(json.dumps({t.name: {"passed": t.passed, "failed": t.failures}
                                                      for t in tallies.values()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
