"""Text generation with a KV cache for compiled decoders: the step graph and the decoding loop.

Design. A decoder compiled by pysparse carries, beside its forward graph, one *step graph*
captured from the same model (same parameter tensors, same names):

    step(input_ids [B,T], position_ids [B,T], cache_position [T], attention_mask [B,1,T,L],
         keys [n_layers x (B,H,S,D)], values [...]) -> logits of the last position [B,1,V]

The cache is a list of plain tensors the caller owns; the graph writes the T new keys/values at
``cache_position`` in place (``index_copy_``, kept in place by torch.export's unlifting, so a step
costs O(T), not O(S)) and attends over the first L positions only (L = the mask's last dim), so a
short prompt in a large cache does not pay for the empty tail. B, T, L and S are dynamic: the same
graph is the prefill (T = prompt length) and the decode step (T = 1). One graph rather than a
prefill and a decode graph because every pass then transforms it once, the weights are shared by
construction, and measured on the CPU kernels (``bench/generate.py``) a T=1 specialisation has
nothing left to remove: the ops are the same, only the sizes differ. The mask is built here, in
Python, 4-D and boolean, which makes transformers skip its own mask construction (no shape
branches in the graph) and gives left-padded batches for free.

Passes see the step graph as a mirror of the forward graph (``Pass.mirror``): weight changes are
shared tensors, mask/pack records and activations are synchronised, and graph rewrites (``lower``)
run again on it. Capture works for Hugging Face decoders whose attention goes through a
``cache.update(k, v, layer_idx, kwargs)`` call (LLaMA, Mistral, Qwen2, SmolLM2 and most decoders
of transformers 5); other models compile without generation.

The loop (``generate``) is the usual one: prefill, then one token per step with greedy choice or
sampling (temperature, top-k, top-p), per-row end-of-sequence, a streamer with the
``put``/``end`` interface of transformers' ``TextStreamer``, and a timing record
(``GenerationStats``) for prefill and decode tokens per second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx

from pysparse.runtime.native import NativeError
from pysparse.runtime.native import build as build_native
from pysparse.runtime.native import enabled as native_enabled

_log = logging.getLogger(__name__)

# Example sizes for capture: all different and >= 2 so that every one stays a dynamic dimension
# (torch.export specialises sizes 0 and 1, and equal example sizes could be unified).
_B, _T, _L, _S = 2, 3, 5, 8


class GenerationError(RuntimeError):
    """A model cannot generate, or a generate call cannot run as asked; the message says why."""


@dataclass
class CacheSpec:
    """The KV-cache layout a step graph expects, and the cache limit generation enforces."""

    n_layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    max_cache_len: int
    vocab_size: int
    eos_token_id: list[int]
    pad_token_id: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheSpec:
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as exc:
            raise GenerationError(f"corrupt generation record {d!r}: {exc}") from exc

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype.removeprefix("torch."))


@dataclass
class GenerationStats:
    """Timing of the last ``generate`` call (seconds wall time, tokens over the whole batch)."""

    batch: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    native: bool = False  # the step ran as native code (pysparse.runtime.native)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * self.decode_steps / self.decode_s if self.decode_s else 0.0


class _TensorCache:
    """What transformers' attention layers see as their cache: ``update`` writes the new keys and
    values in place and returns the first ``length`` positions."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: Any):
        self.keys, self.values, self.length = keys, values, length

    def update(
        self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, kwargs: dict | None = None, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pos = (kwargs or {}).get("cache_position")
        if pos is None:
            raise GenerationError("the attention layer passed no cache_position to its cache")
        self.keys[layer_idx].index_copy_(2, pos, k)
        self.values[layer_idx].index_copy_(2, pos, v)
        n = self.length
        return self.keys[layer_idx][:, :, :n], self.values[layer_idx][:, :, :n]


class _StepModule(torch.nn.Module):
    """The model as one generation step. The model's children are registered here under their own
    names, so the step graph's parameters have the forward graph's names; the model itself is
    kept outside the module tree (no second copy of the names)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b)
        object.__setattr__(self, "_model", model)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache_position: torch.Tensor,
        attention_mask: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        length = attention_mask.shape[-1]
        torch._check(length <= keys[0].shape[2])
        out = self._model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=_TensorCache(keys, values, length),
            cache_position=cache_position,
            use_cache=False,
            logits_to_keep=1,
        )
        return out.logits if hasattr(out, "logits") else out[0]


def cache_spec_for(model: torch.nn.Module, max_cache_len: int | None = None) -> CacheSpec:
    """The cache layout of a Hugging Face decoder, read from its config."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "num_hidden_layers", None):
        raise GenerationError(
            f"{type(model).__name__} has no Hugging Face config with num_hidden_layers; "
            "generation needs a Hugging Face decoder (a *ForCausalLM model)"
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    limit = getattr(config, "max_position_embeddings", None) or 4096
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = config.eos_token_id if eos is None else eos
    eos_list = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    pad = getattr(config, "pad_token_id", None)
    return CacheSpec(
        n_layers=int(config.num_hidden_layers),
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        dtype=str(next(model.parameters()).dtype),
        max_cache_len=int(max_cache_len or limit),
        vocab_size=int(config.vocab_size),
        eos_token_id=eos_list,
        pad_token_id=None if pad is None else int(pad),
    )


def step_dynamic_shapes(n_layers: int) -> dict[str, Any]:
    auto = torch.export.Dim.AUTO
    return {
        "input_ids": {0: auto, 1: auto},
        "position_ids": {0: auto, 1: auto},
        "cache_position": {0: auto},
        "attention_mask": {0: auto, 2: auto, 3: auto},
        "keys": [{0: auto, 2: auto}] * n_layers,
        "values": [{0: auto, 2: auto}] * n_layers,
    }


def step_example_inputs(spec: CacheSpec, device: torch.device | str = "cpu") -> tuple:
    """Inputs of the shape a step graph is captured (and re-exported) with."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (_B, _T), generator=g).to(device)
    cache_position = torch.arange(_L - _T, _L, device=device)
    caches = [
        [
            torch.zeros(_B, spec.kv_heads, _S, spec.head_dim, dtype=spec.torch_dtype, device=device)
            for _ in range(spec.n_layers)
        ]
        for _ in range(2)
    ]
    return (
        ids,
        cache_position[None].expand(_B, _T).contiguous(),
        cache_position,
        _mask(torch.ones(_B, _L, dtype=torch.bool, device=device), cache_position),
        caches[0],
        caches[1],
    )


def capture_step(model: torch.nn.Module, max_cache_len: int | None = None) -> fx.GraphModule:
    """Captures ``model`` (a Hugging Face decoder in eval mode) as a step graph sharing its
    parameters, annotated like the forward graph; ``gm.meta["pysparse"]["cache"]`` holds its
    CacheSpec. Raises GenerationError when the model does not capture this way."""
    from pysparse.capture.trace import _drop_guard_module, annotate

    spec = cache_spec_for(model, max_cache_len)
    wrapper = _StepModule(model).eval()
    # With a mask, transformers repeats the grouped KV heads (repeat_kv) before SDPA: a copy of
    # the whole live cache per layer per token, which measured on SmolLM2 cost more than a third
    # of a decode step. SDPA takes the grouped heads itself (enable_gqa), mask or not.
    saved = os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
    try:
        ep = export_step(wrapper, spec)
    except Exception as exc:  # export raises many kinds; all mean "no step graph"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GenerationError(
            f"{type(model).__name__} could not be captured for generation with a KV cache "
            f"({type(exc).__name__}: {first[:300]})"
        ) from exc
    finally:
        if saved is None:
            del os.environ["TRANSFORMERS_SDPA_FORCE_GQA"]
        else:
            os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = saved
    gm = ep.module()
    _drop_guard_module(gm)
    drop_input_checks(gm)
    annotate(gm)
    gm.meta["pysparse"]["cache"] = spec.to_dict()
    return gm


def drop_input_checks(gm: torch.nn.Module) -> None:
    """Removes the pre-hook ``ep.module()`` installs to check every input's shape against the
    export's symbolic ranges. On a step graph it walks 2 x n_layers cache tensors with sympy on
    every call: measured ~20 us per tensor, 0.6 ms a step on a 2-layer model and tens of ms on
    SmolLM2's 30 layers — more than the step itself. ``generate`` builds the inputs itself (shapes
    consistent by construction) and checks what the caller gives it."""
    hooks = gm._forward_pre_hooks
    for key, hook in list(hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del hooks[key]
            gm._forward_pre_hooks_with_kwargs.pop(key, None)


def _mask(valid: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """[B,1,T,L] boolean attention mask: query t sees key s when s <= its cache position and key s
    is not padding; every query also sees itself, so that a padding row has a finite softmax (its
    output is never used, but a NaN there would reach other rows through the cached values).

    A decode step (one query at the last of the L slots, which the step before marked valid) sees
    exactly the valid keys: that mask is ``valid`` itself, a view at batch 1, not six ops a token."""
    length = valid.shape[1]
    if (
        cache_position.numel() == 1
        and int(cache_position[0]) == length - 1
        and bool(valid[:, -1].all())
    ):
        return valid[:, None, None, :].contiguous()
    s = torch.arange(length, device=valid.device)
    causal = s[None, :] <= cache_position[:, None]  # [T, L]
    seen = causal[None] & valid[:, None, :]  # [B, T, L]
    own = s[None, :] == cache_position[:, None]
    return (seen | own[None])[:, None]


def _choose(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token per row from last-position logits [B, V]."""
    if not do_sample:
        # fp32 first: the same index (the widening is exact), and torch's bf16 argmax over
        # SmolLM2's 49152 logits took 179 us a token against 59 us for widening + fp32 argmax
        return logits.float().argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _checked_prompt(
    spec: CacheSpec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    max_cache_len: int | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids [B, P] int64, attention mask [B, P], the cache positions needed), or a
    GenerationError naming what is wrong and the fix."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise GenerationError(
            f"input_ids must be integer token ids shaped [batch, prompt_len], got "
            f"{tuple(input_ids.shape)} {input_ids.dtype}"
        )
    prompt = input_ids.shape[1]
    if prompt == 0:
        raise GenerationError("the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = spec.max_cache_len if max_cache_len is None else int(max_cache_len)
    need = prompt + max_new_tokens
    if need > limit:
        raise GenerationError(
            f"the prompt ({prompt} tokens) plus max_new_tokens ({max_new_tokens}) needs {need} "
            f"KV-cache positions, over the limit of {limit}; raise it with max_cache_len={need} "
            f"(CLI: --max-cache-len {need}) or generate fewer tokens"
        )
    input_ids = input_ids.long()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise GenerationError(
            f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
            f"{tuple(input_ids.shape)}"
        )
    return input_ids, attention_mask, need


def _stop_ids(
    spec: CacheSpec, eos_token_id: Any, pad_token_id: int | None, device: torch.device
) -> tuple[torch.Tensor, int]:
    """(the ids that end a row, the id finished rows are filled with)."""
    eos = spec.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=device).long()
    if pad_token_id is None:
        pad_token_id = (
            spec.pad_token_id
            if spec.pad_token_id is not None
            else int(eos_ids[0] if eos_ids.numel() else 0)
        )
    return eos_ids, pad_token_id


def generate(
    step: Any,
    spec: CacheSpec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    streamer: Any = None,
    max_cache_len: int | None = None,
    generator: torch.Generator | None = None,
    stats: GenerationStats | None = None,
) -> torch.Tensor:
    """Generates up to ``max_new_tokens`` tokens after ``input_ids`` with the step graph ``step``.

    Args:
        input_ids: [B, P] token ids (a 1-D prompt is taken as batch 1); batches left-padded.
        attention_mask: [B, P], 1 for real tokens, 0 for (left) padding; default all ones.
        do_sample / temperature / top_k / top_p: sampling (default greedy).
        eos_token_id: ids that end a row (default the model's); ``[]`` never stops early.
        pad_token_id: what finished rows are filled with (default the model's, else eos).
        streamer: an object with ``put(ids)`` / ``end()`` (transformers' ``TextStreamer``).
        max_cache_len: the most tokens (prompt + new) the KV cache may hold; default the model's.
        generator: a ``torch.Generator`` for reproducible sampling.

    Returns:
        [B, P + n] ids: the prompt followed by the n <= max_new_tokens generated tokens.
    """
    input_ids, attention_mask, need = _checked_prompt(
        spec, input_ids, attention_mask, max_new_tokens, max_cache_len
    )
    batch, prompt = input_ids.shape
    device = input_ids.device
    eos_ids, pad_token_id = _stop_ids(spec, eos_token_id, pad_token_id, device)
    stats = stats if stats is not None else GenerationStats()
    stats.batch, stats.prompt_tokens, stats.new_tokens = batch, prompt, 0
    stats.prefill_s = stats.decode_s = 0.0
    stats.decode_steps = 0

    shape = (batch, spec.kv_heads, need, spec.head_dim)
    keys = [torch.zeros(shape, dtype=spec.torch_dtype, device=device) for _ in range(spec.n_layers)]
    values = [torch.zeros_like(k) for k in keys]
    valid = torch.zeros(batch, need, dtype=torch.bool, device=device)
    valid[:, :prompt] = attention_mask.bool()
    # Left padding: real tokens count positions from 0 (as transformers' generate does).
    position = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    out = [input_ids]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    cur, cur_pos = input_ids, position
    start = 0
    with torch.no_grad():
        for i in range(max_new_tokens):
            t0 = time.perf_counter()
            n = cur.shape[1]
            cache_position = torch.arange(start, start + n, device=device)
            mask = _mask(valid[:, : start + n], cache_position)
            logits = step(cur, cur_pos, cache_position, mask, keys, values)
            token = _choose(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
            if batch > 1:  # (a lone row stops at its end of sequence)
                token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            seconds = time.perf_counter() - t0
            if i == 0:
                stats.prefill_s = seconds
            else:
                stats.decode_s += seconds
                stats.decode_steps += 1
            out.append(token[:, None])
            stats.new_tokens += 1
            if streamer is not None:
                streamer.put(token.cpu())
            if eos_ids.numel():
                finished |= torch.isin(token, eos_ids)
            if bool(finished.all()):
                break
            valid[:, start + n] = True
            cur_pos = cur_pos[:, -1:] + 1
            start += n
            cur = token[:, None]
    if streamer is not None:
        streamer.end()
    return torch.cat(out, dim=1)


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class Generates:
    """``generate`` for compiled and reloaded decoders: a class with ``step`` (the step graph, or
    None) and ``cache_spec`` (a CacheSpec, or None) mixes this in."""

    # (no class-level ``step``: nn.Module keeps submodules out of the instance dict, so a class
    # attribute would hide the step graph)
    cache_spec: CacheSpec | None = None
    last_generation: GenerationStats | None = None

    @property
    def can_generate(self) -> bool:
        return getattr(self, "step", None) is not None and self.cache_spec is not None

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        native: bool | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Generates with the KV cache on the compiled kernels; see
        ``pysparse.runtime.generate.generate`` for the arguments. ``last_generation`` then holds
        the timings.

        ``native`` (default: on unless ``PYSPARSE_NATIVE=0``): the step graph runs as native code
        (pysparse.runtime.native: AOTInductor, compiled on the first call on this machine and
        cached), no Python between its ops; where that cannot run, the graph runs op by op and
        one warning says why. ``native=True`` raises instead; ``False`` never tries."""
        if not self.can_generate:
            raise GenerationError(
                "this model has no generation step graph: only Hugging Face decoders get one, "
                "and only when pysparse.compile(..., generation=None or True) captured it "
                "(see the log of the compile for why it was not)"
            )
        step = self.step
        if native or (native is None and native_enabled()):
            step = self.native_step(required=bool(native)) or self.step
        stats = GenerationStats()
        out = generate(
            step,
            self.cache_spec,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            stats=stats,
            **kwargs,
        )
        stats.native = step is not self.step
        self.last_generation = stats
        return out

    def native_step(self, required: bool = False) -> Any | None:
        """The step graph as native code (built or taken from the cache once per model object),
        or None where it cannot run here (logged once; ``required``: raise the NativeError)."""
        if "_native_step" in self.__dict__:
            runner = self.__dict__["_native_step"]
            if runner is None and required:
                raise NativeError(self.__dict__["_native_error"])
            return runner
        runner, why = None, ""
        device = next(iter((*self.step.parameters(), *self.step.buffers())), torch.empty(0)).device
        try:
            if device.type != "cpu":
                raise NativeError(f"the native route runs on the CPU; this model is on {device}")
            with _quiet_logger("torch.utils.cpp_extension"):  # "No CUDA runtime is found"
                runner, _, _ = build_native(
                    lambda: export_step(self.step, self.cache_spec), "step", "native step graph"
                )
        except NativeError as exc:
            if required:
                raise
            why = str(exc)
            _log.warning("%s; the step graph runs op by op instead", why)
        self.__dict__["_native_step"], self.__dict__["_native_error"] = runner, why
        return runner


def export_step(step: torch.nn.Module, spec: CacheSpec) -> torch.export.ExportedProgram:
    """``step`` (a ``_StepModule`` or a step graph) as a torch.export program with dynamic batch,
    prompt, context length and cache size: the capture, and the re-export of artifacts."""
    device = next(iter((*step.parameters(), *step.buffers())), torch.empty(0)).device
    return torch.export.export(
        step,
        step_example_inputs(spec, device),
        strict=False,
        dynamic_shapes=step_dynamic_shapes(spec.n_layers),
    )
