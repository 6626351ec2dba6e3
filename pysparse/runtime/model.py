"""``SparseModel``: what ``pysparse.compile`` returns — the rewritten graph, runnable.

Called like the original model (pysparse.capture.inputs); decoders also carry the generation step
graph and ``generate`` (pysparse.runtime.generate).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from pysparse.capture.inputs import call
from pysparse.runtime import native
from pysparse.runtime.generate import CacheSpec, Generates


class SparseModel(Generates, torch.nn.Module):
    """What ``pysparse.compile`` returns: the rewritten GraphModule, called like the model (keyword
    arguments the capture fixed, such as ``use_cache=False``, are supplied), plus ``report``.
    Decoders also carry ``step``, the generation step graph (see pysparse.runtime.generate), and
    ``generate(...)``."""

    def __init__(
        self,
        gm: fx.GraphModule,
        report: list[dict[str, Any]],
        example_args: tuple = (),
        example_kwargs: dict | None = None,
        step: fx.GraphModule | None = None,
    ):
        super().__init__()
        self.gm = gm
        self.report = report
        self.step = step
        self.cache_spec = (
            CacheSpec.from_dict(step.meta["pysparse"]["cache"]) if step is not None else None
        )
        # Kept for save/export, which capture the compiled model again with these inputs.
        self.example_args = example_args
        self.example_kwargs = dict(example_kwargs or {})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the graph; under ``torch.no_grad()`` / ``inference_mode()`` as native code
        (pysparse.runtime.native; ``PYSPARSE_NATIVE=0`` turns that off)."""
        if native.wanted() and self._device().type == "cpu":
            runner = native.forward_of(self, self._make_native_forward)
            bound = self._bound(args, kwargs)
            if runner is not None and runner.accepts(*bound):
                return runner(*bound)
        return call(self.gm, args, kwargs)

    def _bound(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        spec = self.gm.meta.get("pysparse", {}).get("inputs")
        return spec.bind(args, kwargs) if spec is not None else (args, kwargs)

    def _device(self) -> torch.device:
        return next(iter((*self.gm.parameters(), *self.gm.buffers())), torch.empty(0)).device

    def _make_native_forward(self) -> native.NativeForward:
        call_kwargs = self.gm.meta.get("pysparse", {}).get("call_kwargs", {})
        return native.NativeForward(
            self.gm, call_kwargs, *self._bound(self.example_args, self.example_kwargs)
        )

    def train(self, mode: bool = True) -> SparseModel:
        """Only flips ``self.training``: the captured graph was traced in eval mode (no dropout)
        and torch.export graphs refuse ``train()``; training loops (a Hugging Face Trainer
        included) call this and then train the graph's parameters as they are."""
        self.training = mode
        return self
