from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from lmkit.checkpoint import Checkpoint
from lmkit.config import ModelConfig, SampleConfig
from lmkit.generate import _Texts, generate
from lmkit.models.gpt import GPT
from lmkit.search import sample_next
from lmkit.tokenizer import HFTokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(tiny_project):
    ckpt = Checkpoint(tiny_project.latest_checkpoint())
    return ckpt.model(), ckpt.tokenizer()


def test_sampling_filters() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    assert sample_next(logits, SampleConfig(greedy=True)).item() == 1
    assert sample_next(logits, SampleConfig(temperature=0.0)).item() == 1
    g = torch.Generator().manual_seed(0)
    top2 = {sample_next(logits, SampleConfig(top_k=2), g).item() for _ in range(200)}
    assert top2 == {1, 3}
    # p(1) ~ 0.64, p(3) ~ 0.24 at temperature 1: top_p=0.7 keeps exactly those two.
    nucleus = {sample_next(logits, SampleConfig(temperature=1.0, top_p=0.7), g).item() for _ in range(200)}
    assert nucleus == {1, 3}
    assert {sample_next(logits, SampleConfig(top_p=0.01), g).item() for _ in range(20)} == {1}
    everything = {sample_next(logits, SampleConfig(temperature=5.0), g).item() for _ in range(500)}
    assert everything == {0, 1, 2, 3, 4}


def test_greedy_with_cache_equals_recomputing_the_whole_text(trained) -> None:
    model, tokenizer = trained
    prompt = "Ham.\nTo be, or not"
    out = generate(model, tokenizer, prompt, SampleConfig(greedy=True, max_new_tokens=12), CPU)
    ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
    for _ in range(12):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] == tokenizer.eos_id:
            break
    assert out.samples[0].tokens == [i for i in ids[len(tokenizer.encode(prompt)) + 1:] if i != tokenizer.eos_id]


def test_same_seed_same_text_and_streaming_matches(trained) -> None:
    model, tokenizer = trained
    cfg = SampleConfig(max_new_tokens=30, seed=7, num_samples=2)
    pieces: dict[int, str] = {0: "", 1: ""}

    def collect(i: int, text: str) -> None:
        pieces[i] += text

    a = generate(model, tokenizer, "Hor.\n", cfg, CPU, on_text=collect)
    b = generate(model, tokenizer, "Hor.\n", cfg, CPU)
    assert [s.text for s in a.samples] == [s.text for s in b.samples]
    assert [pieces[0], pieces[1]] == [s.text for s in a.samples]
    assert a.seed == 7
    other = generate(model, tokenizer, "Hor.\n", dataclasses.replace(cfg, seed=8), CPU)
    assert [s.text for s in other.samples] != [s.text for s in a.samples]


def test_generation_runs_past_the_context_window(trained) -> None:
    model, tokenizer = trained
    window = model.config.max_seq_len
    long_prompt = "Ham.\n" + "Words, words, words. " * 20
    out = generate(model, tokenizer, long_prompt, SampleConfig(max_new_tokens=3 * window, seed=0), CPU)
    sample = out.samples[0]
    assert sample.finish_reason == "eos" or len(sample.tokens) == 3 * window
    assert tokenizer.decode(sample.tokens) == sample.text


class _CountThenStop(nn.Module):
    """A stand-in model that emits token 10, 11, 12, then EOS."""

    def __init__(self) -> None:
        super().__init__()
        self.config = ModelConfig(arch="gpt", vocab_size=300, max_seq_len=64)
        self.calls = 0

    def new_cache(self, batch, device, dtype, length=None):
        return GPT(dataclasses.replace(self.config, d_model=8, n_head=1, n_layer=1)).new_cache(batch, device, dtype,
                                                                                              length)

    def forward(self, idx, cache=None):
        cache[0].length += idx.size(1)
        logits = torch.zeros(idx.size(0), idx.size(1), 300)
        logits[:, -1, 10 + self.calls if self.calls < 3 else 3] = 1.0
        self.calls += 1
        return logits, None


def test_generation_stops_at_eos(trained) -> None:
    _, tokenizer = trained
    out = generate(_CountThenStop(), tokenizer, "x", SampleConfig(greedy=True, max_new_tokens=50), CPU)
    assert out.samples[0].tokens == [10, 11, 12]
    assert out.samples[0].finish_reason == "eos"
    assert out.to_dict()["completions"][0] == {"text": tokenizer.decode([10, 11, 12]), "tokens": 3,
                                               "finish_reason": "eos"}


def _logprob(model, ids: list[int], n_new: int) -> float:
    """Sum of log-probabilities of the last N_NEW of IDS, by one full pass."""
    logits, _ = model(torch.tensor([ids[:-1]]))
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    positions = torch.arange(len(ids) - 1 - n_new, len(ids) - 1)
    return logp[positions, torch.tensor(ids[-n_new:])].sum().item()


@torch.no_grad()
def test_gpt_beam_search_ranks_hypotheses_and_beats_greedy(trained) -> None:
    model, tokenizer = trained
    prompt = "Ham.\nTo be, or not"
    prompt_ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
    cfg = SampleConfig(max_new_tokens=8, length_penalty=0.0, greedy=True)
    greedy = generate(model, tokenizer, prompt, cfg, CPU).samples[0]
    beam = generate(model, tokenizer, prompt, dataclasses.replace(cfg, beam=4, num_samples=3), CPU).samples
    assert len(beam) == 3 and [s.score for s in beam] == sorted((s.score for s in beam), reverse=True)
    for s in beam:  # each score is the hypothesis' own log-probability (length penalty 0)
        ending = [tokenizer.eos_id] if s.finish_reason == "eos" else []
        n_new = len(s.tokens) + len(ending)
        assert s.score == pytest.approx(_logprob(model, prompt_ids + s.tokens + ending, n_new), abs=1e-3)
    ending = [tokenizer.eos_id] if greedy.finish_reason == "eos" else []
    greedy_score = _logprob(model, prompt_ids + greedy.tokens + ending, len(greedy.tokens) + len(ending))
    assert beam[0].score >= greedy_score - 1e-4


def test_stop_strings_end_the_text_and_are_left_out(trained) -> None:
    model, tokenizer = trained
    cfg = SampleConfig(greedy=True, max_new_tokens=40)
    free = generate(model, tokenizer, "Ham.\n", cfg, CPU).samples[0].text
    stop = free[5:7]
    assert len(stop) == 2 and stop in free
    streamed: list[str] = []
    out = generate(model, tokenizer, "Ham.\n", dataclasses.replace(cfg, stop=(stop,)), CPU,
                   on_text=lambda i, text: streamed.append(text)).samples[0]
    assert out.text == free[:free.index(stop)] and out.finish_reason == "stop"
    assert "".join(streamed) == out.text  # nothing of the stop string was streamed before it was seen


def _hf_tokenizers(sample_text: str) -> dict[str, HFTokenizer]:
    """A GPT-2 style byte-level BPE and a Llama-2 style Metaspace BPE with byte fallback, trained here."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    lines = sample_text.splitlines()[:2000]
    byte_level = Backend(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    byte_level.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    metaspace = Backend(models.BPE(byte_fallback=True, unk_token="<unk>"))
    metaspace.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    metaspace.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    metaspace.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>",
                                                                                             *byte_pieces]))
    spec = json.loads(metaspace.to_str())  # byte pieces are ordinary vocabulary, as in Llama 2's tokenizer
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_pieces]
    return {"byte-level": HFTokenizer(byte_level.to_str().encode(), {"eos": 0}),
            "metaspace": HFTokenizer(json.dumps(spec).encode(), {"eos": 1})}


@pytest.mark.parametrize("name", ["lmkit", "byte-level", "metaspace"])
def test_streamed_text_is_the_decoded_text(name, trained, sample_text) -> None:
    """The stream decodes a few tokens a step (not the whole text again), yet gives exactly the
    text decoding all tokens gives: multibyte characters split over byte tokens, the first token's
    dropped leading space, and token sequences no text encodes to (a sampler's output)."""
    tokenizer = trained[1] if name == "lmkit" else _hf_tokenizers(sample_text)[name]
    text = " To be, or not — 'tis “nobler” in the mind; café, naïve, 日本語 and 🎭 too.\n  Ham. Words,\twords"
    encoded = tokenizer.encode(text)
    gen = torch.Generator().manual_seed(0)
    random_ids = torch.randint(0, tokenizer.vocab_size, (400,), generator=gen).tolist()
    if name == "metaspace":  # a run of byte tokens that is not UTF-8 decodes to one \ufffd a byte, all or
        random_ids = [i for i in random_ids if not tokenizer.pieces([i])[0].startswith("<0x")]  # nothing
    noise_then_text = [i for i in random_ids if i not in tokenizer.special_ids][:200] + encoded
    for tokens in (encoded, random_ids, noise_then_text):
        streamed: list[str] = []
        texts = _Texts(tokenizer, (), lambda row, piece, into=streamed: into.append(piece))
        for n in range(1, len(tokens) + 1):
            texts.stream(0, tokens[:n])
        at_end = "".join(streamed)
        texts.finish(0, texts.final(tokens))
        assert "".join(streamed) == tokenizer.decode(tokens)
        assert len(at_end) >= len(tokenizer.decode(tokens).rstrip("\ufffd")) - 1  # only an unfinished char waits
    assert tokenizer.decode(encoded) == text


def test_stop_strings_are_found_in_a_growing_text(trained) -> None:
    """A stop string split over several tokens, or over the point where the last search ended."""
    tokenizer = trained[1]
    tokens = tokenizer.encode("Words, words, words. To be or not to be: that is the question.")
    for stop in ("to be", "question", ": t", "Words"):
        texts = _Texts(tokenizer, (stop,), None)
        n = next(n for n in range(1, len(tokens) + 1) if texts.stopped(0, tokens[:n]))
        assert stop in tokenizer.decode(tokens[:n]) and stop not in tokenizer.decode(tokens[:n - 1])


def test_what_generate_does_with_a_checkpoint_and_its_flags(tiny_project, tiny_bert_project) -> None:
    from pathlib import Path

    from lmkit.errors import DataError
    from lmkit.generate import generation_mode, require_decoder

    gpt, bert = Checkpoint(tiny_project.latest_checkpoint()), Checkpoint(tiny_bert_project.latest_checkpoint())
    assert generation_mode(gpt) == "continue" and generation_mode(bert) == "fill-mask"
    assert generation_mode(gpt, chat=True, system="Be brief.") == "chat"
    assert generation_mode(gpt, draft=True) == "speculate"
    for flags, message in [(dict(system="x"), "go with --chat"), (dict(chat_template=Path("t.jinja")), "go with"),
                           (dict(chat=True, draft=True), "--draft speeds up")]:
        with pytest.raises(DataError, match=message):
            generation_mode(gpt, **flags)
    with pytest.raises(DataError, match="--chat answers with a decoder .* bert checkpoint for fill-mask"):
        generation_mode(bert, chat=True)
    with pytest.raises(DataError, match="--draft speeds up"):
        generation_mode(bert, draft=True)
    require_decoder(gpt, "lmkit chat talks to a decoder")
    with pytest.raises(DataError, match="^lmkit chat talks to a decoder \\(gpt or llama\\); .* bert checkpoint"):
        require_decoder(bert, "lmkit chat talks to a decoder")


def test_a_model_loaded_for_generation_decodes_as_the_checkpoints_own(tiny_project) -> None:
    from lmkit.generate import load_for_generation

    ckpt, cfg, cpu = Checkpoint(tiny_project.latest_checkpoint()), SampleConfig(greedy=True, max_new_tokens=8), \
        torch.device("cpu")
    logged: list[str] = []
    model, tokenizer = load_for_generation(ckpt, cpu, log=logged.append)
    assert tokenizer.fingerprint == ckpt.tokenizer_fingerprint and not logged
    assert generate(model, tokenizer, "Ham.", cfg, cpu).samples[0].tokens == \
        generate(ckpt.model(), ckpt.tokenizer(), "Ham.", cfg, cpu).samples[0].tokens
    compiled, _ = load_for_generation(ckpt, cpu, compile_model=True, log=logged.append)  # compiles on first call
    assert hasattr(compiled, "_orig_mod") and logged == ["compiling the model (torch.compile): the first tokens "
                                                         "wait for it"]
