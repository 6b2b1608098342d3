"""Continuous batching for a decoder: requests that are in flight together decode together.

Each request (a Job: prompt ids, sampling settings, its own seeded generator) is prefilled alone,
then its n rows take slots of one SlotCache; every step runs one forward for every active row of
every job, and each job samples its own rows from their logits with its own generator. A new job
joins at the next step and a finished (or abandoned) one leaves, its slots refilled. Because a job
samples exactly as lmkit.search.sample does alone -- the same prefill, the same rows sampled
together with the same generator, finished rows fed the padding token until the whole job ends --
batching does not change what a request with a seed (or greedy) gets.

The engine runs on a thread of its own; jobs report through callbacks called from that thread.
"""

from __future__ import annotations

import collections
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lmkit.config import SampleConfig
from lmkit.device import autocast, autocast_dtype
from lmkit.generate import Sample, _Texts
from lmkit.models.layers import SlotCache
from lmkit.search import _penalties, _stop_ids, extend, penalize, sample_next
from lmkit.tokenizer import Tokenizer


class QueueFull(Exception):
    """The engine's waiting line is full: the caller should come back later."""


@dataclass(eq=False)
class Job:
    """One request: N = cfg.num_samples rows continuing PROMPT_IDS until a stop id, a stop string
    or cfg.max_new_tokens. ON_TEXT(row, text) streams text that is final; ON_DONE(samples, seed)
    or ON_ERROR(message) ends the job (called on the engine's thread)."""

    prompt_ids: list[int]
    cfg: SampleConfig
    stop_ids: list[int]
    on_done: Callable[[list[Sample], int], None]
    on_text: Callable[[int, str], None] | None = None
    on_error: Callable[[str], None] = lambda message: None
    cancelled: bool = False  # set from any thread (a client gone): the job leaves at the next step
    seed: int = 0
    slots: list[int] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled = True


class _Running:
    """A job's decoding state, mirroring lmkit.search.sample step for step."""

    def __init__(self, job: Job, tokenizer: Tokenizer, device: torch.device) -> None:
        self.job, self.n = job, job.cfg.num_samples
        job.seed = job.cfg.seed if job.cfg.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device).manual_seed(job.seed)
        self.eos_ids, self.pad_id = _stop_ids(job.stop_ids)
        self.texts = _Texts(tokenizer, job.cfg.stop, job.on_text)
        self.samples = [Sample(finish_reason="length") for _ in range(self.n)]
        self.finished = torch.zeros(self.n, dtype=torch.bool)
        self.step = 0
        self.next_ids: torch.Tensor | None = None  # (n,) the tokens fed at the next forward

    def take(self, logits: torch.Tensor) -> bool:
        """Sample from LOGITS (n, V) of the rows' last positions; True when the job is done."""
        cfg = self.job.cfg
        if _penalties(cfg):
            logits = penalize(logits, [self.job.prompt_ids + s.tokens for s in self.samples], cfg)
        next_ids = sample_next(logits, cfg, self.generator).cpu().masked_fill(self.finished, self.pad_id)
        on_token = self.texts.stream if self.texts.on_text else None
        stopped = self.texts.stopped if cfg.stop else None
        for row, token in enumerate(next_ids.tolist()):
            if not self.finished[row] and extend(row, self.samples[row], token, self.eos_ids, on_token, stopped):
                self.finished[row] = True
        self.step += 1
        self.next_ids = next_ids
        return bool(self.finished.all()) or self.step == cfg.max_new_tokens

    def finish(self) -> None:
        for row, sample in enumerate(self.samples):
            sample.text = self.texts.final(sample.tokens)
            self.texts.finish(row, sample.text)
        self.job.on_done(self.samples, self.job.seed)


class Engine:
    """Decodes the jobs submitted to it, up to MAX_BATCH rows at a time, with at most MAX_QUEUE jobs
    waiting for room (beyond those that free slots take next); submit() beyond that raises QueueFull
    at once."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, device: torch.device, *, max_batch: int = 8,
                 max_queue: int = 64, max_context: int = 4096) -> None:
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, device
        self.max_batch, self.max_queue = max_batch, max_queue
        # prompt + new tokens of a request; capped, so that a long-context model's cache stays small
        self.context = min(model.config.max_seq_len, max_context)
        self.dtype = autocast_dtype(device, "auto") or torch.float32
        probe = model.new_cache(1, device, self.dtype, 1)[0]  # the geometry of one layer's cache
        _, heads, _, head_dim = probe.k.shape
        self.cache = [SlotCache(max_batch, heads, head_dim, self.context, device, self.dtype)
                      for _ in range(model.config.n_layer)]
        self.slot_job: list[_Running | None] = [None] * max_batch
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[_Running] = []
        self.wake = threading.Condition()
        self.stopping = False
        self.steps = 0  # batched forwards so far (for tests and the log)
        self.thread = threading.Thread(target=self._loop, name="lmkit-decoder", daemon=True)
        self.thread.start()

    # --- what callers use (any thread) ------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue JOB. Raises ValueError for a job that can never run, QueueFull when the line is full."""
        if job.cfg.num_samples > self.max_batch:
            raise ValueError(f"n={job.cfg.num_samples} rows exceed the server's --max-batch {self.max_batch}")
        if len(job.prompt_ids) + job.cfg.max_new_tokens > self.context:
            raise ValueError(f"the prompt ({len(job.prompt_ids)} tokens) and max_tokens ({job.cfg.max_new_tokens}) "
                             f"exceed the context of {self.context} tokens")
        with self.wake:
            room, fits = len(self._free()), 0  # the waiting jobs that free slots will take next
            for waiting in self.waiting:
                if waiting.cfg.num_samples > room:
                    break
                room, fits = room - waiting.cfg.num_samples, fits + 1
            queued = len(self.waiting) - fits
            if job.cfg.num_samples > room and queued >= self.max_queue:
                raise QueueFull(f"{queued} requests are waiting already")
            self.waiting.append(job)
            self.wake.notify()

    @property
    def busy(self) -> int:
        """Jobs decoding or waiting."""
        with self.wake:
            return len(self.running) + len(self.waiting)

    def close(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=30)

    # --- the decoding thread ------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wake:
                    while not self.stopping and not self.waiting and not self.running:
                        self.wake.wait()
                    if self.stopping:
                        return
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self.running:
                        self._step()
                except Exception as err:  # noqa: BLE001 - fail what is in flight, keep serving
                    for running in list(self.running):
                        running.job.on_error(f"{type(err).__name__}: {err}")
                        self._release(running)

    def _free(self) -> list[int]:
        return [slot for slot, job in enumerate(self.slot_job) if job is None]

    def _admit(self) -> None:
        """Prefill waiting jobs while their rows fit in free slots (first come, first served)."""
        while True:
            with self.wake:
                if not self.waiting or len(self._free()) < self.waiting[0].cfg.num_samples:
                    return
                job = self.waiting.popleft()
            if job.cancelled:
                continue
            try:
                running = _Running(job, self.tokenizer, self.device)
                with autocast(self.device):
                    prefill = self.model.new_cache(running.n, self.device, self.dtype, len(job.prompt_ids))
                    prompt = torch.tensor(job.prompt_ids, device=self.device).expand(running.n, -1)  # (n, T)
                    logits = self.model(prompt, cache=prefill)[0][:, -1]  # (n, V)
                done = running.take(logits)
            except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
                job.on_error(f"{type(err).__name__}: {err}")
                continue
            if done:
                running.finish()
                continue
            job.slots = self._free()[:running.n]
            for row, slot in enumerate(job.slots):
                for layer, cache in zip(prefill, self.cache):
                    cache.load(slot, layer, row)
                self.slot_job[slot] = running
            self.running.append(running)
            self._compact()

    def _step(self) -> None:
        """One forward for every active row; each job samples its own rows."""
        active = sum(job is not None for job in self.slot_job)
        for cache in self.cache:
            cache.active = active
        inputs = torch.zeros(active, dtype=torch.long)
        for running in self.running:
            inputs[running.job.slots] = running.next_ids
        try:
            with autocast(self.device):
                logits = self.model(inputs.to(self.device)[:, None], cache=self.cache)[0][:, -1]  # (active, V)
        except Exception as err:  # noqa: BLE001
            for running in list(self.running):
                running.job.on_error(f"{type(err).__name__}: {err}")
                self._release(running)
            return
        self.steps += 1
        rows = {id(running): logits[running.job.slots] for running in self.running}  # before any slot moves
        for running in list(self.running):
            try:
                done = running.take(rows[id(running)])
            except Exception as err:  # noqa: BLE001
                running.job.on_error(f"{type(err).__name__}: {err}")
                self._release(running)
                continue
            if done:
                self._release(running)
                running.finish()

    def _drop_cancelled(self) -> None:
        for running in [r for r in self.running if r.job.cancelled]:
            self._release(running)
        with self.wake:
            self.waiting = collections.deque(job for job in self.waiting if not job.cancelled)

    def _release(self, running: _Running) -> None:
        self.running.remove(running)
        for slot in running.job.slots:
            self.slot_job[slot] = None
        self._compact()

    def _compact(self) -> None:
        """Keep the occupied slots the first ones (a SlotCache decodes its first `active` slots):
        the last occupied slot moves into the first free one until there is no gap."""
        while True:
            free = self._free()
            used = [slot for slot, job in enumerate(self.slot_job) if job is not None]
            if not free or not used or free[0] > used[-1]:
                return
            source, target = used[-1], free[0]
            for cache in self.cache:
                cache.move(source, target)
            running = self.slot_job[source]
            running.job.slots[running.job.slots.index(source)] = target
            self.slot_job[target], self.slot_job[source] = running, None

