"""Speculative decoding: greedy output is the target's own token for token, whatever the draft; with
sampling, the tokens follow the target's distribution (checked exactly on a tiny vocabulary)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from lmkit.checkpoint import Checkpoint
from lmkit.config import ConfigError, ModelConfig, SampleConfig
from lmkit.generate import generate
from lmkit.models import build_model
from lmkit.models.layers import KVCache
from lmkit.speculative import generate_with_draft, speculate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def target(tiny_project):
    ckpt = Checkpoint(tiny_project.latest_checkpoint())
    return ckpt.model(), ckpt.tokenizer()


@pytest.mark.parametrize("draft_kind", ["itself", "untrained", "smaller"])
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_output_is_the_targets_own(target, draft_kind, k) -> None:
    model, tokenizer = target
    torch.manual_seed(1)
    if draft_kind == "itself":
        draft = model
    else:
        shape = dict(n_layer=1, d_model=32, n_head=2) if draft_kind == "smaller" else {}
        draft = build_model(dataclasses.replace(model.config, **shape)).eval()
    for prompt, n in (("Ham.\nTo be", 12), ("Hor.", 60)):  # 60 runs past the 32-token window
        cfg = SampleConfig(greedy=True, max_new_tokens=n)
        want = generate(model, tokenizer, prompt, cfg, CPU).samples[0]
        got, stats = generate_with_draft(model, draft, tokenizer, prompt, cfg, CPU, draft_tokens=k)
        assert got.samples[0].tokens == want.tokens and got.samples[0].text == want.text
        assert stats.rounds >= 1 and 0 <= stats.accepted <= stats.proposed
        if draft_kind == "itself":
            assert stats.acceptance_rate == 1.0


class Bigram(nn.Module):
    """A stand-in decoder whose next-token logits depend on the last token only (a table)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table  # (V, V)
        self.config = ModelConfig(arch="gpt", vocab_size=table.size(0), max_seq_len=64)

    def new_cache(self, batch, device, dtype, length=None):
        return [KVCache(batch, 1, 1, length or 64, device, dtype)]

    def forward(self, idx, cache=None):
        if cache is not None:
            cache[0].length += idx.size(1)
        return self.table[idx], None


def test_sampling_keeps_the_targets_distribution() -> None:
    """The first two tokens over 20,000 draws: their empirical joint distribution equals the
    target's within sampling error, although the draft proposes from quite another one."""
    gen = torch.Generator().manual_seed(0)
    vocab = 4
    target_table = torch.randn(vocab, vocab, generator=gen) * 1.5
    draft_table = torch.randn(vocab, vocab, generator=gen) * 1.5
    cfg = SampleConfig(temperature=1.0, max_new_tokens=2)
    p = target_table.softmax(-1)
    prompt = [0, 1]
    want = p[prompt[-1]][:, None] * p  # P(x1, x2) = p(x1 | 1) p(x2 | x1)
    counts = torch.zeros(vocab, vocab)
    draws, accepted, proposed = 20_000, 0, 0
    rng = torch.Generator().manual_seed(1)
    for _ in range(draws):
        out: list[int] = []
        stats = speculate(Bigram(target_table), Bigram(draft_table), [prompt], cfg, CPU,
                          lambda row, t, into=out: into.append(t) or len(into) == 2, draft_tokens=2, generator=rng)
        counts[out[0], out[1]] += 1
        accepted, proposed = accepted + stats.accepted, proposed + stats.proposed
    empirical = counts / draws
    sigma = (want * (1 - want) / draws).sqrt()
    assert ((empirical - want).abs() <= 4.5 * sigma + 1e-4).all(), (empirical, want)
    assert 0.05 < accepted / proposed < 0.95  # the draft is neither always right nor always wrong


@pytest.mark.parametrize("k", [2, 4])
def test_rows_decoded_together_each_get_their_own_greedy_output(target, k) -> None:
    """Prompts of different lengths in one batch: the rows accept different numbers of proposals,
    end at different times (one at an end-of-text token, one runs past the window and goes on
    without the draft), and each gets what plain decoding gives it alone."""
    model, tokenizer = target
    torch.manual_seed(2)
    draft = build_model(dataclasses.replace(model.config, n_layer=1, d_model=32, n_head=2)).eval()
    prompts = ["Ham.\nTo be, or not to be", "Hor.", "Friends, Romans, countrymen, lend me", "O", "Ber.\nWho's there?"]
    ids = [tokenizer.encode_document(p) for p in prompts]
    limits = [10, 40, 6, 24, 16]  # 40 runs past the 32-token window
    cfg = SampleConfig(greedy=True, max_new_tokens=max(limits))
    stop_ids = set(tokenizer.stop_ids)
    got: list[list[int]] = [[] for _ in prompts]

    def emit(row: int, token: int) -> bool:
        if token in stop_ids:
            return True
        got[row].append(token)
        return len(got[row]) == limits[row]

    stats = speculate(model, draft, ids, cfg, CPU, emit, draft_tokens=k)
    for prompt, limit, tokens in zip(prompts, limits, got):
        want = generate(model, tokenizer, prompt, dataclasses.replace(cfg, max_new_tokens=limit), CPU).samples[0]
        assert tokens == want.tokens, prompt
    assert stats.plain_steps > 0 and stats.rounds < sum(limits)


def test_samples_decoded_together_with_a_draft(target) -> None:
    """--num-samples rows of one prompt: seeded runs repeat, the rows differ, each has its text."""
    model, tokenizer = target
    cfg = SampleConfig(temperature=1.0, max_new_tokens=16, num_samples=3, seed=4)
    first, stats = generate_with_draft(model, model, tokenizer, "Ham.", cfg, CPU, draft_tokens=3)
    again, _ = generate_with_draft(model, model, tokenizer, "Ham.", cfg, CPU, draft_tokens=3)
    assert [s.tokens for s in first.samples] == [s.tokens for s in again.samples]
    assert len({tuple(s.tokens) for s in first.samples}) == 3
    assert all(s.text == tokenizer.decode(s.tokens) for s in first.samples)
    assert stats.acceptance_rate == 1.0  # the model drafting for itself: p == q, every proposal kept


def test_what_speculation_refuses(target) -> None:
    model, tokenizer = target
    for cfg in (SampleConfig(beam=2), SampleConfig(repetition_penalty=1.2)):
        with pytest.raises(ConfigError):
            generate_with_draft(model, model, tokenizer, "Ham.", cfg, CPU)


def test_generate_with_a_draft_on_the_command_line(tiny_project, tmp_path, small_corpus) -> None:
    from tests.cli.conftest import assert_user_error, lmkit

    root = tiny_project.root
    args = ["generate", "-p", root, "Ham.", "--greedy", "--max-new-tokens", "12", "--json"]
    plain = lmkit(*args)
    drafted = lmkit(*args, "--draft", root, "--draft-tokens", "3")
    assert drafted.exit_code == 0, drafted.output
    out = json.loads(drafted.stdout)
    assert out["completions"] == json.loads(plain.stdout)["completions"]
    assert out["acceptance_rate"] == 1.0 and "accepted" in drafted.stderr
    assert_user_error(lmkit(*args, "--draft", root, "--quantize", "int8"), "float weights")
    assert_user_error(lmkit(*args, "--draft", root, "--beam", "2"), "leave out --beam")
    several = lmkit(*args, "--draft", root, "--num-return-sequences", "2")
    assert several.exit_code == 0 and len(json.loads(several.stdout)["completions"]) == 2
    assert_user_error(lmkit(*args, "--draft", tmp_path / "nowhere"), "does not exist")
    other = tmp_path / "other"
    assert lmkit("pretrain", small_corpus, "-p", other, "--preset", "tiny", "--set", "tokenizer.vocab_size=700",
                 "--max-steps", "2", "-q").exit_code == 0
    assert_user_error(lmkit(*args, "--draft", other), "share the model's tokenizer")


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_text(tiny_project) -> None:
    from tests.cli.conftest import lmkit

    args = ["generate", "-p", tiny_project.root, "Ham.", "--greedy", "--max-new-tokens", "12"]
    assert lmkit(*args, "--compile").stdout == lmkit(*args).stdout


def test_a_draft_is_checked_before_either_model_loads(tiny_project, tiny_bert_project, tmp_path) -> None:
    from lmkit.errors import CheckpointError, DataError
    from lmkit.speculative import open_draft

    ckpt, greedy = Checkpoint(tiny_project.latest_checkpoint()), SampleConfig(greedy=True)
    assert open_draft(None, tiny_project, ckpt, greedy) is None
    assert open_draft(tiny_project.root, tiny_project, ckpt, greedy, 3).path == ckpt.path  # a project: its latest
    with pytest.raises(DataError, match="float weights"):
        open_draft(tiny_project.root, tiny_project, ckpt, greedy, quantize="int8")
    with pytest.raises(ConfigError, match="leave out --beam"):
        open_draft(tiny_project.root, tiny_project, ckpt, SampleConfig(beam=2))
    with pytest.raises(ConfigError, match="draft_tokens=33"):
        open_draft(tiny_project.root, tiny_project, ckpt, greedy, 33)
    with pytest.raises(CheckpointError, match="is not a decoder language model"):  # same tokenizer, a BERT
        open_draft(tiny_bert_project.root, tiny_project, ckpt, greedy)
    with pytest.raises(CheckpointError, match="does not exist"):
        open_draft(tmp_path / "nowhere", tiny_project, ckpt, greedy)
