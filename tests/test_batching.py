"""Continuous batching: rows at positions of their own decode together (SlotCache) and every job
gets exactly what lmkit.generate gives it alone, however the jobs overlap."""

from __future__ import annotations

import threading

import pytest
import torch

from lmkit.batching import Engine, Job, QueueFull
from lmkit.checkpoint import Checkpoint
from lmkit.config import SampleConfig
from lmkit.generate import generate
from lmkit.models.layers import SlotCache

CPU = torch.device("cpu")


@pytest.fixture(params=["gpt", "llama"])
def trained(request, tiny_project, tiny_llama_project):
    project = tiny_project if request.param == "gpt" else tiny_llama_project
    ckpt = Checkpoint(project.latest_checkpoint())
    return ckpt.model(), ckpt.tokenizer()


def test_rows_at_different_positions_decode_as_each_alone(trained) -> None:
    model, tokenizer = trained
    prompts = [tokenizer.encode_document(p) for p in ("Ham.\nTo be, or not", "Hor.", "Friends, Romans, country")]
    probe = model.new_cache(1, CPU, torch.float32, 1)[0]
    slots = [SlotCache(4, probe.k.size(1), probe.k.size(3), model.config.max_seq_len, CPU, torch.float32)
             for _ in range(model.config.n_layer)]
    alone, caches = [], []
    with torch.no_grad():
        for slot, ids in enumerate(prompts):
            cache = model.new_cache(1, CPU, torch.float32, len(ids) + 4)
            model(torch.tensor([ids]), cache=cache)
            for layer, slot_layer in zip(cache, slots):
                slot_layer.load(slot, layer)
            caches.append(cache)
            alone.append(model(torch.tensor([[7]]), cache=cache)[0][0, -1])  # the next token, alone
        for layer in slots:
            layer.active = len(prompts)
        together = model(torch.tensor([[7]] * len(prompts)), cache=slots)[0][:, -1]  # one forward for all rows
    assert torch.allclose(together, torch.stack(alone), atol=1e-5)
    assert slots[0].length.tolist() == [len(ids) + 1 for ids in prompts]

    # Several tokens per row at once (speculative decoding scores a draft's proposals so): each
    # row's logits at every new position are those of the row fed alone.
    extra = [[11, 12, 13], [14, 15, 16], [17, 18, 19]]
    with torch.no_grad():
        alone = [model(torch.tensor([more]), cache=cache)[0][0] for more, cache in zip(extra, caches)]  # (3, V) each
        together = model(torch.tensor(extra), cache=slots)[0]  # (rows, 3, V)
    assert torch.allclose(together, torch.stack(alone), atol=1e-5)
    assert slots[0].length.tolist() == [len(ids) + 4 for ids in prompts]


def test_overlapping_jobs_get_what_generate_gives_alone(trained) -> None:
    model, tokenizer = trained
    engine = Engine(model, tokenizer, CPU, max_batch=6)
    settings = [SampleConfig(max_new_tokens=14, greedy=True), SampleConfig(max_new_tokens=16, seed=3),
                SampleConfig(max_new_tokens=12, seed=5, num_samples=2, stop=("e",))]
    prompts = ["Ham.\nTo be", "Hor.\n", "Friends, Romans", "What", "O", "The king", "Ber.\nWho's there?", "Mar."]
    results: dict[int, list[str]] = {}
    done = threading.Semaphore(0)

    def job(i: int) -> Job:
        def finish(samples: list, seed: int) -> None:
            results[i] = [s.text for s in samples]
            done.release()
        return Job(tokenizer.encode_document(prompts[i]), settings[i % 3], tokenizer.stop_ids, on_done=finish)

    try:
        for i in range(len(prompts)):  # more rows than slots: later jobs wait, then join mid-way
            engine.submit(job(i))
        for _ in prompts:
            assert done.acquire(timeout=60)
        assert engine.steps < sum(settings[i % 3].max_new_tokens for i in range(len(prompts)))  # they overlapped
    finally:
        engine.close()
    for i, prompt in enumerate(prompts):
        assert results[i] == [s.text for s in generate(model, tokenizer, prompt, settings[i % 3], CPU).samples]


def test_the_engine_refuses_what_cannot_run_or_wait(trained) -> None:
    model, tokenizer = trained
    engine = Engine(model, tokenizer, CPU, max_batch=2, max_queue=0)
    try:
        ids = tokenizer.encode_document("Ham.")
        with pytest.raises(ValueError, match="--max-batch"):
            engine.submit(Job(ids, SampleConfig(num_samples=3, max_new_tokens=2), tokenizer.stop_ids, lambda *_: None))
        with pytest.raises(ValueError, match="context"):
            engine.submit(Job(ids, SampleConfig(max_new_tokens=model.config.max_seq_len), tokenizer.stop_ids,
                              lambda *_: None))
        engine.submit(Job(ids, SampleConfig(num_samples=2, max_new_tokens=20, greedy=True), tokenizer.stop_ids,
                          lambda *_: None))  # room for it: it runs, though nothing may wait
        with pytest.raises(QueueFull):  # both slots taken, and no place in the line
            engine.submit(Job(ids, SampleConfig(max_new_tokens=2), tokenizer.stop_ids, lambda *_: None))
    finally:
        engine.close()


def test_a_job_that_ends_does_not_shift_its_neighbours_rows(tiny_project) -> None:
    """A short job finishing frees its slot mid-step; the long one beside it keeps reading its own
    logits (a stand-in model whose next token depends on the last one, so a mix-up shows)."""
    from tests.test_speculative import Bigram

    tokenizer = Checkpoint(tiny_project.latest_checkpoint()).tokenizer()
    table = torch.randn(tokenizer.vocab_size, tokenizer.vocab_size, generator=torch.Generator().manual_seed(0))
    table[:, tokenizer.eos_id] = -1e9  # never ends early
    model = Bigram(table)

    def run(jobs: list[tuple[str, list[int], int]]) -> dict[str, list[int]]:
        engine, results, done = Engine(model, tokenizer, CPU, max_batch=4), {}, threading.Semaphore(0)

        def job(name: str, prompt: list[int], n: int) -> Job:
            def finish(samples: list, seed: int) -> None:
                results[name] = samples[0].tokens
                done.release()
            return Job(prompt, SampleConfig(greedy=True, max_new_tokens=n), tokenizer.stop_ids, on_done=finish)

        try:
            with engine.wake:  # all wait in line, so they are admitted together, in this order
                for name, prompt, n in jobs:
                    engine.submit(job(name, prompt, n))
            for _ in jobs:
                assert done.acquire(timeout=60)
        finally:
            engine.close()
        return results

    together = run([("short", [10], 2), ("long", [20], 12)])
    assert together["long"] == run([("long", [20], 12)])["long"]
