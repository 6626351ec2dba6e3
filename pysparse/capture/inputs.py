"""Calling a captured model the way the original model is called.

A torch.export graph takes exactly the inputs it was captured with (so many positional, these
keywords) and refuses anything else. ``InputSpec`` records the original ``forward``'s parameter
names next to that layout and maps a call made the way the original accepts it, positional or by
name, a tokenizer's whole output with ``**`` included, onto the captured layout:

- an input given by name that was captured by position (or the reverse) is moved to its place;
- an input the capture did not see is dropped when it changes nothing: it is None, it equals a
  setting the capture fixed (``use_cache=False``), or it is the Hugging Face default the model
  uses when the input is absent (``attention_mask`` all ones, ``token_type_ids`` all zeros);
  any other is refused with an error that names it and says how to capture it;
- a captured ``attention_mask`` / ``token_type_ids`` left out of a call gets that default.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# What a Hugging Face model uses for these inputs when they are not given.
HF_DEFAULTS = {"attention_mask": 1, "token_type_ids": 0}

_NAMED = (
    inspect.Parameter.POSITIONAL_ONLY,
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    inspect.Parameter.KEYWORD_ONLY,
)


class InputError(TypeError):
    """A call whose inputs do not fit the captured graph."""


def split_example(example_inputs: Any, example_kwargs: Mapping | None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of an example given as a tensor, a tuple, or a mapping (a tokenizer's
    ``BatchEncoding`` included: its entries are keyword inputs, the ``model(**inputs)`` habit)."""
    kwargs = dict(example_kwargs or {})
    if isinstance(example_inputs, Mapping):
        both = set(example_inputs) & set(kwargs)
        if both:
            raise InputError(
                f"example inputs {sorted(both)} are given twice (in the example_inputs mapping and "
                "in example_kwargs); give each once"
            )
        return (), {**dict(example_inputs), **kwargs}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), kwargs
    return tuple(example_inputs or ()), kwargs


@dataclass(frozen=True)
class InputSpec:
    """The captured layout of a graph's inputs and the names the original model knew them by."""

    params: tuple[str, ...]  # the original forward's named parameters, in order; () = unknown
    n_args: int  # inputs captured by position: params[:n_args]
    kwargs: tuple[str, ...]  # inputs captured by name
    fixed: dict[str, Any] = field(default_factory=dict)  # settings the capture fixed

    @classmethod
    def capture(
        cls, model: torch.nn.Module, args: tuple, kwargs: Mapping, fixed: Mapping
    ) -> InputSpec:
        try:
            sig = inspect.signature(model.forward)
        except (TypeError, ValueError):
            sig = None
        params: tuple[str, ...] = ()
        if sig is not None and not any(
            p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()
        ):
            params = tuple(n for n, p in sig.parameters.items() if p.kind in _NAMED)
        if len(args) > len(params):
            params = ()  # a forward pysparse cannot read: calls go through as given
        return cls(params, len(args), tuple(k for k in kwargs if k not in fixed), dict(fixed))

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": list(self.params),
            "n_args": self.n_args,
            "kwargs": list(self.kwargs),
            "fixed": dict(self.fixed),
        }

    @classmethod
    def from_dict(cls, d: Any) -> InputSpec:
        """The inverse of ``to_dict``; ValueError when ``d`` is not such a record."""
        ok = (
            isinstance(d, dict)
            and isinstance(d.get("params"), list)
            and all(isinstance(p, str) for p in d["params"])
            and type(d.get("n_args")) is int
            and 0 <= d["n_args"]
            and (not d["params"] or d["n_args"] <= len(d["params"]))
            and isinstance(d.get("kwargs"), list)
            and all(isinstance(k, str) for k in d["kwargs"])
            and isinstance(d.get("fixed", {}), dict)
        )
        if not ok:
            raise ValueError("not an input record")
        return cls(tuple(d["params"]), d["n_args"], tuple(d["kwargs"]), dict(d.get("fixed", {})))

    def describe(self) -> str:
        pos = list(self.params[: self.n_args]) if self.params else [f"{self.n_args} positional"]
        return ", ".join([*pos, *self.kwargs])

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` laid out as captured; InputError naming the input that cannot be."""
        if not self.params:
            return tuple(args), dict(kwargs)
        if len(args) > len(self.params):
            raise InputError(
                f"{len(args)} positional inputs given; the model takes at most "
                f"{len(self.params)} ({', '.join(self.params)})"
            )
        given = dict(zip(self.params, args))
        for k, v in kwargs.items():
            if k in given:
                raise InputError(f"input {k!r} is given twice (by position and by name)")
            given[k] = v
        ids = given.get("input_ids")

        def take(name: str) -> Any:
            if name in given:
                return given.pop(name)
            if name in HF_DEFAULTS and isinstance(ids, torch.Tensor):
                return torch.full_like(ids, HF_DEFAULTS[name])
            raise InputError(
                f"input {name!r} is missing: the model was captured with inputs "
                f"({self.describe()}); pass {name}=..."
            )

        out_args = tuple(take(n) for n in self.params[: self.n_args])
        out_kwargs = {k: take(k) for k in self.kwargs}
        extra = [k for k, v in given.items() if not self._changes_nothing(k, v)]
        if extra:
            raise InputError(
                f"input(s) {extra} were not part of the capture (it took: {self.describe()}), so "
                "the compiled graph cannot use them; compile with example inputs that include them "
                "(e.g. example_inputs=tokenizer(texts, return_tensors='pt')) or leave them out"
            )
        return out_args, out_kwargs

    def _changes_nothing(self, name: str, value: Any) -> bool:
        if value is None:
            return True
        if name in self.fixed:
            if not isinstance(value, torch.Tensor) and value == self.fixed[name]:
                return True
            raise InputError(
                f"{name}={value!r}: the model was captured with {name}={self.fixed[name]!r}, "
                "which the compiled graph cannot change"
            )
        default = HF_DEFAULTS.get(name)
        return (
            default is not None
            and isinstance(value, torch.Tensor)
            and bool((value == default).all())
        )


def call(gm: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """Calls a captured graph the way the original model is called (``InputSpec``: inputs moved
    to their captured places, ones that change nothing dropped), with the keyword arguments its
    capture fixed (e.g. use_cache)."""
    meta = getattr(gm, "meta", {}).get("pysparse", {})
    spec = meta.get("inputs")
    if spec is not None:
        args, kwargs = spec.bind(args, kwargs)
    return gm(*args, **{**meta.get("call_kwargs", {}), **kwargs})


def call_no_grad(gm: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """``call`` under ``torch.no_grad()``."""
    with torch.no_grad():
        return call(gm, args, kwargs)


def batch_tokens(batch: Any) -> int:
    """Tokens in a ``(args, kwargs)`` batch: the attention mask's ones when there is one, else
    the first tensor input's elements (ids ``[batch, seq]``) or rows (features ``[batch, d]``)."""
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], dict):
        mask = batch[1].get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        for x in (*batch[0], *batch[1].values()):
            if isinstance(x, torch.Tensor):
                if x.is_floating_point() and x.dim() > 1:
                    return x.numel() // x.shape[-1]
                return x.numel()
    return 0
