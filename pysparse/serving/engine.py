"""Continuous batching on a compiled decoder's step graph: one scheduler thread owns the model and
a KV cache of ``max_batch`` slots; a new request's prefill runs between decode steps, every active
sequence decodes in one batched step, and a finished or cancelled sequence frees its slot at once.

The cache. Each layer's keys and values are one ``[max_batch, kv_heads, S, head_dim]`` tensor; a
sequence owns one batch row (its *slot*), and the active sequences hold the rows ``0..B-1`` so
that a decode step passes contiguous views ``keys[:B]`` (the step graph writes them in place, and
the native code takes them as they are). The step graph writes a step's keys at one cache column
for the whole batch (``cache_position``), so the engine keeps a *clock*: the column the next
decode step writes for every row. A new sequence prefills alone into columns ``0..P-1`` of its
row (the clock moves up to P if it was below); its own decode steps then write at the clock, and
the columns between are masked. When the clock reaches S the live columns of every row are
moved to the front (order kept) and the clock restarts after the longest. A finished sequence's
row is refilled with the last active row (its live columns copied).

Why the output is batch-invariant. A request's greedy tokens are the same whatever else is served:
its prefill runs alone (batch 1, columns from 0: exactly ``generate``'s prefill); its decode
steps run under ``pysparse.kernels.batch_invariant`` (each row of every op computed as it would be
alone), and the step graph's attention (``pysparse::attention``, put there by ``Lower``) reads
only the keys a row's mask allows, in column order, so the masked gaps and the column a key
sits in change nothing. One row alone runs the same routes with the mode on or off, so a lone
request decodes exactly as ``generate`` does. A step graph without ``pysparse::attention`` (a
model compiled without ``Lower``) keeps torch's attention, whose blocking sees the gaps: the
engine logs that its outputs may then differ in the last bits under load.

Failures. A request whose sampling fails (or whose callbacks raise) fails alone; a batched step
that raises fails the requests in it and the engine goes on with the next; the cache is never
left half-written for a surviving sequence (a failed step only wrote columns no survivor reads).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pysparse.kernels import ops
from pysparse.runtime.generate import CacheSpec, GenerationError, _choose, _mask

_log = logging.getLogger(__name__)

_ids = itertools.count(1)


class QueueFull(RuntimeError):
    """The engine's queue of waiting requests is full; retry later."""


class EngineStopped(RuntimeError):
    """The engine is draining or stopped and takes no new requests."""


@dataclass
class Sampling:
    """How one request picks its tokens (greedy when temperature is 0)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None  # added to a token's logit before the choice


@dataclass
class Sequence:
    """One request as the engine sees it. ``on_token(seq, token)`` and ``on_finish(seq)`` are
    called on the engine's thread (keep them short: they hand over to the caller's thread)."""

    prompt: list[int]
    sampling: Sampling
    on_token: Callable[[Sequence, int], None] = lambda seq, token: None
    on_finish: Callable[[Sequence], None] = lambda seq: None
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end of sequence), "length", "cancelled", "error"
    error: str | None = None
    submitted_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    finished_s: float | None = None
    # engine state
    _cancel: bool = False
    _position: int = 0  # the position (RoPE) of the next token to feed
    _last_s: float = 0.0  # when the last token came
    _generator: torch.Generator | None = None
    _bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (ids, values)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Observer:
    """What the engine reports as it runs (the server's metrics implement it; no-ops here)."""

    def prefill(self, tokens: int, seconds: float) -> None: ...

    def decode(self, batch: int, seconds: float) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def token_gap(self, seconds: float) -> None: ...

    def finished(self, seq: Sequence) -> None: ...


class Engine:
    """The scheduler over one compiled decoder (``SparseModel`` or a loaded artifact with a step
    graph). ``start()`` runs it on a thread; ``submit`` queues a Sequence; ``cancel`` ends one;
    ``stop()`` drains (finishes what is queued and running) or aborts.

    Args:
        model: a compiled decoder that ``can_generate``.
        max_batch: sequences decoded together (the cache has this many slots).
        max_cache_len: cache columns a slot has: a request's prompt plus max_tokens must fit.
            Default: the model's context length, at most 2048.
        max_queue: requests waiting for a slot before ``submit`` raises QueueFull.
        native: run the step graph as native code (default: as ``generate`` does).
        invariant: decode under batch-invariant mode (default True; False measures its cost).
    """

    def __init__(
        self,
        model: Any,
        *,
        max_batch: int = 8,
        max_cache_len: int | None = None,
        max_queue: int = 64,
        native: bool | None = None,
        invariant: bool = True,
        observer: Observer | None = None,
    ):
        if not getattr(model, "can_generate", False):
            raise GenerationError(
                "this model has no generation step graph; serve a decoder compiled by pysparse "
                "(pysparse compile MODEL with a *ForCausalLM model)"
            )
        if max_batch < 1 or max_queue < 0:
            raise GenerationError(
                f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}"
            )
        spec: CacheSpec = model.cache_spec
        limit = min(spec.max_cache_len, 2048) if max_cache_len is None else int(max_cache_len)
        if limit < 2 or limit > spec.max_cache_len:
            raise GenerationError(
                f"max_cache_len must be in [2, {spec.max_cache_len}] (the model's context), "
                f"got {limit}"
            )
        from pysparse.runtime.native import enabled as native_enabled

        step = model.step
        if native or (native is None and native_enabled()):
            step = model.native_step(required=bool(native)) or model.step
        self.model, self.spec, self.step = model, spec, step
        self.native = step is not model.step
        self.max_batch, self.max_cache_len, self.max_queue = max_batch, limit, max_queue
        self.invariant = invariant
        self.observer = observer or Observer()
        self.exact_attention = any(
            n.op == "call_function" and n.target is torch.ops.pysparse.attention.default
            for n in model.step.graph.nodes
        )
        if not self.exact_attention:
            _log.warning(
                "the step graph keeps torch's attention (compiled without the lower pass): "
                "batched outputs may differ from a request's solo output in the last bits"
            )
        device = next(iter(model.step.parameters()), torch.empty(0)).device
        shape = (max_batch, spec.kv_heads, limit, spec.head_dim)
        self.keys = [
            torch.zeros(shape, dtype=spec.torch_dtype, device=device) for _ in range(spec.n_layers)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.valid = torch.zeros(max_batch, limit, dtype=torch.bool, device=device)
        self.device = device
        self.eos = set(spec.eos_token_id)
        self.active: list[Sequence] = []
        self.clock = 0
        self.steps = 0
        self.compactions = 0
        self._pending: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False  # no new requests
        self._abort = False  # end now, failing what runs
        self.fault: Callable[[Sequence], None] | None = None  # tests: raise inside a request's step
        # Called on the scheduler's thread after each round's tokens are handed out, before the
        # next step: the server waits there until its event loop has taken them (see
        # Server._mailbox), so that work does not run beside the next step's kernels.
        self.after_step: Callable[[], None] | None = None

    # ---- the caller's side ------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raises GenerationError when a request cannot fit a slot (the message names both)."""
        if prompt_tokens < 1:
            raise GenerationError("the prompt is empty; give at least one token")
        if max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {max_tokens}")
        if prompt_tokens + max_tokens > self.max_cache_len:
            raise GenerationError(
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
                f"{prompt_tokens + max_tokens} tokens, over this server's cache of "
                f"{self.max_cache_len} tokens a request (--max-cache-len); shorten the prompt "
                "or ask for fewer tokens"
            )

    def submit(self, seq: Sequence) -> Sequence:
        """Queues ``seq``; raises GenerationError (too long), QueueFull or EngineStopped."""
        self.check(len(seq.prompt), seq.sampling.max_tokens)
        bad = [
            t
            for t in (*seq.prompt, *(seq.sampling.logit_bias or {}))
            if not 0 <= t < self.spec.vocab_size
        ]
        if bad:
            raise GenerationError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.spec.vocab_size})"
            )
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._pending) >= self.max_queue + max(0, self.max_batch - len(self.active)):
                raise QueueFull(
                    f"{len(self._pending)} requests are waiting (--max-queue {self.max_queue})"
                )
            if seq.sampling.seed is not None:
                seq._generator = torch.Generator(device=self.device).manual_seed(seq.sampling.seed)
            self._pending.append(seq)
            self._cond.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Ends ``seq`` (a client went away, a stop string matched): its slot is freed before the
        next step; nothing else is disturbed. Safe from any thread, any number of times."""
        with self._cond:
            seq._cancel = True
            try:  # still waiting for a slot: it leaves the queue now (not when a slot frees)
                self._pending.remove(seq)
            except ValueError:
                pass
            else:
                self._finish(seq, "cancelled")
            self._cond.notify_all()

    def start(self) -> Engine:
        """Runs the scheduler on a thread of its own (``run`` runs it on the calling thread)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pysparse-engine", daemon=True)
            self._thread.start()
        return self

    def run(self) -> None:
        """Runs the scheduler on the calling thread until ``stop``. What ``pysparse serve`` does
        on its main thread: the kernels' OpenMP team is then the process's first one. A second
        thread's parallel regions get a team of their own, and with more OpenMP threads than
        cores the runtime stops spinning between regions: every region then pays a thread
        wake-up (measured on SmolLM2, 2 cores: a decode step 13.5 ms on the main thread, 27.8 ms
        on another)."""
        self._run()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking requests; ``drain``: finishes the queued and running ones first, else
        cancels them. Returns when a scheduler thread ``start`` made has ended (or ``timeout``
        passed); a scheduler in ``run`` returns from it on its own."""
        with self._cond:
            self._stopping = True
            self._abort = self._abort or not drain  # (a later draining stop undoes no abort)
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---- the scheduler thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self.active or self._stopping):
                    self._cond.wait()
                if self._abort:
                    for seq in [*self._pending, *self.active]:
                        self._finish(seq, "cancelled")
                    self._pending.clear()
                    self.active.clear()
                    return
                if self._stopping and not (self._pending or self.active):
                    return
                admit = []
                while self._pending and len(self.active) + len(admit) < self.max_batch:
                    admit.append(self._pending.popleft())
            self._drop_cancelled()
            for seq in admit:
                if seq._cancel:
                    self._finish(seq, "cancelled")
                else:
                    self._prefill(seq)
            self._drop_cancelled()
            if self.active:
                self._decode()
            if self.after_step is not None:
                try:
                    self.after_step()
                except Exception:  # noqa: BLE001 (a caller's hook must not stop the engine)
                    _log.exception("the engine's after_step hook raised")

    def _prefill(self, seq: Sequence) -> None:
        slot = len(self.active)
        P = len(seq.prompt)
        t0 = time.perf_counter()
        try:
            ids = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)
            self.valid[slot] = False
            self.valid[slot, :P] = True
            cache_position = torch.arange(P, device=self.device)
            mask = _mask(self.valid[slot : slot + 1, :P], cache_position)
            with torch.no_grad(), ops.batch_invariant(False):
                logits = self.step(
                    ids,
                    cache_position[None],
                    cache_position,
                    mask,
                    [k[slot : slot + 1] for k in self.keys],
                    [v[slot : slot + 1] for v in self.values],
                )
            seq._position = P
            self.observer.prefill(P, time.perf_counter() - t0)
            token = self._sample(seq, logits[:, -1])
        except Exception as exc:  # noqa: BLE001 (this request alone fails, whatever the cause)
            self.valid[slot] = False
            self._fail(seq, exc)
            return
        self.active.append(seq)
        self.clock = max(self.clock, P)
        try:
            self._emit(seq, token)
        except Exception as exc:  # noqa: BLE001 (its callbacks raised: this request fails)
            self._fail(seq, exc)
        if seq.finished:
            self._remove(len(self.active) - 1)

    def _decode(self) -> None:
        if self.clock >= self.max_cache_len:
            self._compact()
        B, col = len(self.active), self.clock
        t0 = time.perf_counter()
        self.valid[:B, col] = True
        try:
            ids = torch.tensor([[s.tokens[-1]] for s in self.active], device=self.device)
            pos = torch.tensor([[s._position] for s in self.active], device=self.device)
            mask = self.valid[:B, : col + 1][:, None, None, :].contiguous()
            with torch.no_grad(), ops.batch_invariant(self.invariant):
                logits = self.step(
                    ids,
                    pos,
                    torch.tensor([col], device=self.device),
                    mask,
                    [k[:B] for k in self.keys],
                    [v[:B] for v in self.values],
                )[:, -1]
        except Exception as exc:  # noqa: BLE001 (the step itself: its requests fail)
            self.valid[:B, col] = False
            for seq in list(self.active):
                self._fail(seq, exc)
            self.active.clear()
            return
        self.clock += 1
        self.steps += 1
        self.observer.decode(B, time.perf_counter() - t0)
        logits = self._biased(logits, self.active)  # (one copy for the batch, not one a row)
        greedy = logits.argmax(-1).tolist()
        for i, seq in enumerate(self.active):
            seq._position += 1
            try:
                if self.fault is not None:
                    self.fault(seq)
                plain = seq.sampling.temperature <= 0
                token = greedy[i] if plain else self._sample(seq, logits[i : i + 1], bias=False)
                self._emit(seq, token)
            except Exception as exc:  # noqa: BLE001 (one row: that request fails)
                self._fail(seq, exc)
        for i in reversed(range(len(self.active))):
            if self.active[i].finished:
                self._remove(i)

    @staticmethod
    def _biased(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """``logits`` [len(seqs), vocab] as fp32 with each row's logit_bias added (a copy when
        any row has one)."""
        rows = [(i, s) for i, s in enumerate(seqs) if s.sampling.logit_bias]
        logits = logits.float()
        if not rows:
            return logits
        logits = logits.clone()
        for i, seq in rows:
            if seq._bias is None:
                b = seq.sampling.logit_bias
                seq._bias = (
                    torch.tensor(list(b), device=logits.device),
                    torch.tensor(list(b.values()), dtype=logits.dtype, device=logits.device),
                )
            logits[i, seq._bias[0]] += seq._bias[1]
        return logits

    def _sample(self, seq: Sequence, logits: torch.Tensor, bias: bool = True) -> int:
        s = seq.sampling
        if bias:
            logits = self._biased(logits, [seq])
        if s.temperature <= 0:
            return int(logits.float().argmax(-1))
        return int(_choose(logits, True, s.temperature, s.top_k, s.top_p, seq._generator)[0])

    def _emit(self, seq: Sequence, token: int) -> None:
        now = time.perf_counter()
        if seq.first_token_s is None:
            seq.first_token_s = now
            self.observer.first_token(now - seq.submitted_s)
        else:
            self.observer.token_gap(now - seq._last_s)
        seq._last_s = now
        seq.tokens.append(token)
        seq.on_token(seq, token)
        if token in self.eos:
            self._finish(seq, "stop")
        elif len(seq.tokens) >= seq.sampling.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finish_reason, seq.error, seq.finished_s = reason, error, time.perf_counter()
        try:
            self.observer.finished(seq)
            seq.on_finish(seq)
        except Exception:  # noqa: BLE001 (a caller's callback must not stop the engine)
            _log.exception("a finish callback of request %d raised", seq.id)

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        _log.error("request %d failed: %s: %s", seq.id, type(exc).__name__, exc)
        self._finish(seq, "error", f"{type(exc).__name__}: {exc}")

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.active))):
            if self.active[i]._cancel:
                self._finish(self.active[i], "cancelled")
                self._remove(i)

    def _remove(self, i: int) -> None:
        """Frees slot i: the last active row moves into it (its live columns copied)."""
        last = len(self.active) - 1
        if i != last:
            n = self.clock
            for t in (*self.keys, *self.values):
                t[i, :, :n].copy_(t[last, :, :n])
            self.valid[i] = self.valid[last]
            self.active[i] = self.active[last]
        self.valid[last] = False
        self.active.pop()
        if not self.active:
            self.clock = 0

    def _compact(self) -> None:
        """Moves every row's live columns to the front, in order; the clock restarts after the
        longest row."""
        longest = 0
        for i in range(len(self.active)):
            cols = self.valid[i].nonzero().squeeze(1)
            n = cols.numel()
            for t in (*self.keys, *self.values):
                t[i, :, :n] = t[i].index_select(1, cols)
            self.valid[i] = False
            self.valid[i, :n] = True
            longest = max(longest, n)
        self.clock = longest
        self.compactions += 1
