"""Checkpoints of the shared trainer: written every ``checkpoint_every`` steps and at the end, read
back to resume a run where it stopped (same settings, any rank count).

One process writes ``checkpoint.safetensors`` (the trained tensors, AdamW's moments, the step,
the pass's own state as JSON, the settings' fingerprint); a torchrun run writes a sharded
checkpoint (torch.distributed.checkpoint as safetensors + a JSON record, ``checkpoint.json``).
Nothing is unpickled: the pickle format of earlier versions is refused unread. ``Checkpoints`` is
the part of ``Trainer`` (pysparse.learning.train) that does this.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file as _st_save

from pysparse.learning.distributed import (
    load_sharded,
    save_sharded,
    shard_like,
)

_log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
SHARDED_CHECKPOINT = "checkpoint.json"  # a sharded checkpoint's record (torchrun runs)
LEGACY_CHECKPOINT = "checkpoint.pt"  # the pickle format of earlier pysparse; refused unread
_CHECKPOINT_FORMAT = "pysparse-checkpoint"
_CHECKPOINT_VERSION = "1"


def _not_json(value: Any) -> Any:
    raise TypeError(
        f"{type(value).__name__} is not JSON data; a checkpoint holds tensors, numbers, strings, "
        "lists and dicts only"
    )


class Checkpoints:
    """Checkpoint writing, reading and resuming for ``Trainer`` (which sets the attributes used
    here: config, params, optimizer, module, step, fingerprint, ...)."""

    def _ckpt_path(self) -> Path | None:
        d = self.config.checkpoint_dir
        return Path(d) / CHECKPOINT if d else None

    def _record(self) -> dict[str, Any]:
        """A checkpoint's JSON part (everything but tensors)."""
        return {
            "fingerprint": self.fingerprint,
            "ident": self._ident_json,
            "step": self.step,
            "history": self.history,
            "extra": self.state[0]() if self.state else None,
        }

    def _sharded_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of a sharded checkpoint by name: the trained parameters and AdamW's state
        (DTensor shards under FSDP2), created as AdamW would on its first step where it has none
        yet, so that a resume has tensors to load into."""
        out: dict[str, torch.Tensor] = {}
        for k, p in self.params.items():
            st = self.optimizer.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out[f"param/{k}"] = p
            for name, t in st.items():
                out[f"optimizer/{k}/{name}"] = t
        return out

    def _save_sharded(self, directory: Path) -> None:
        """Every rank writes its shards (torch.distributed.checkpoint, safetensors files) to a new
        ``sharded-STEP`` folder; then rank 0 points ``checkpoint.json`` at it (temporary file +
        rename) and removes the older folders, so a crash leaves the previous checkpoint whole."""
        import shutil

        import torch.distributed as dist

        name = f"sharded-{self.step}"
        save_sharded(self._sharded_tensors(), str(directory / name))
        dist.barrier()
        if self.rank == 0:
            record = self._record()
            record["sharded"] = name
            record["ranks"] = self.world
            record["param_groups"] = [
                {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
            ]
            tmp = directory / f".{SHARDED_CHECKPOINT}.{os.getpid()}.tmp"
            try:
                tmp.write_text(json.dumps(record, default=_not_json))
                os.replace(tmp, directory / SHARDED_CHECKPOINT)
            finally:
                tmp.unlink(missing_ok=True)
            for old in directory.glob("sharded-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def save_checkpoint(self) -> None:
        path = self._ckpt_path()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.world > 1:
            self._save_sharded(path.parent)
            return
        tensors = {f"param/{k}": p.detach().to("cpu").clone() for k, p in self.params.items()}
        tensors["rng/cpu"] = torch.get_rng_state()
        opt = self.optimizer.state_dict()
        opt_scalars: dict[str, dict[str, Any]] = {}
        for index, entry in opt["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{index}/{key}"] = value.detach().to("cpu").clone()
                else:
                    opt_scalars.setdefault(str(index), {})[key] = value
        record = self._record()
        record["optimizer"] = {"param_groups": opt["param_groups"], "scalars": opt_scalars}
        try:
            text = json.dumps(record, default=_not_json)
        except TypeError as exc:
            raise RuntimeError(
                f"{self.config.desc}: cannot write checkpoint {path}: {exc}"
            ) from exc
        metadata = {"format": _CHECKPOINT_FORMAT, "version": _CHECKPOINT_VERSION, "state": text}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            _st_save(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _read_checkpoint(self, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The JSON record and the tensors of a checkpoint; safetensors and JSON only, so a
        hostile file can be wrong but cannot run code."""

        def unreadable(why: str) -> RuntimeError:
            return RuntimeError(
                f"train: checkpoint {path} cannot be read ({why}); delete it to start over"
            )

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise unreadable(f"not a safetensors file: {exc}") from exc
        if (
            metadata.get("format") != _CHECKPOINT_FORMAT
            or metadata.get("version") != _CHECKPOINT_VERSION
        ):
            raise unreadable(
                f"format {metadata.get('format')!r} version {metadata.get('version')!r}, expected "
                f"{_CHECKPOINT_FORMAT!r} version {_CHECKPOINT_VERSION}"
            )
        try:
            record = json.loads(metadata.get("state", ""))
        except json.JSONDecodeError as exc:
            raise unreadable(f"its state is not JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise unreadable("its state is not a JSON object")
        missing = [f"param/{k}" for k in self.params if f"param/{k}" not in tensors]
        if missing:
            raise unreadable(f"incomplete: no {', '.join(missing)}")
        step = record.get("step")
        if type(step) is not int or not 0 <= step <= self.config.steps:
            raise unreadable(f"step {step!r} is not a step of this run (0..{self.config.steps})")
        return record, tensors

    def _optimizer_state(
        self, record: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        """The optimiser's ``state_dict`` rebuilt from a checkpoint. JSON has no tuples: a
        hyper-parameter that is a tuple in this run's optimiser (AdamW's betas) is made one again."""
        saved = record.get("optimizer", {})
        state: dict[int, dict[str, Any]] = {}
        for key, t in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                state.setdefault(int(index), {})[name] = t
        for index, scalars in saved.get("scalars", {}).items():
            state.setdefault(int(index), {}).update(scalars)
        groups = []
        for mine, theirs in zip(self.optimizer.state_dict()["param_groups"], saved["param_groups"]):
            groups.append(
                {k: tuple(v) if isinstance(mine.get(k), tuple) else v for k, v in theirs.items()}
            )
        return {"state": state, "param_groups": groups}

    def _read_sharded_record(self, path: Path) -> dict[str, Any]:
        """The JSON record of a sharded checkpoint (checkpoint.json), checked."""
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RuntimeError(
                f"train: checkpoint {path} cannot be read ({exc}); delete it to start over"
            ) from exc
        step = record.get("step") if isinstance(record, dict) else None
        folder = record.get("sharded") if isinstance(record, dict) else None
        if (
            type(step) is not int
            or not 0 <= step <= self.config.steps
            or not isinstance(folder, str)
        ):
            raise RuntimeError(
                f"train: checkpoint {path} is not a checkpoint of this run (step {step!r}); "
                "delete it to start over"
            )
        if not (path.parent / folder).is_dir():
            raise RuntimeError(
                f"train: checkpoint {path} names {folder}, which is missing; delete it to start over"
            )
        return record

    def _load_by_name(self, full: dict[str, torch.Tensor]) -> None:
        """Parameters and AdamW state from whole tensors named as :meth:`_sharded_tensors` names
        them (each rank keeps its shard)."""
        with torch.no_grad():
            for key, t in self._sharded_tensors().items():
                src = full[key]
                if t.dim() == 0:
                    t.copy_(src)
                else:
                    from pysparse.learning.distributed import local

                    local(t).copy_(shard_like(src, t))

    def _maybe_resume(self) -> None:
        path = self._ckpt_path()
        if path is None:
            return
        legacy = path.with_name(LEGACY_CHECKPOINT)
        if legacy.exists():
            raise RuntimeError(
                f"train: {legacy} is a checkpoint of an older pysparse, a pickle, which pysparse "
                "no longer reads (unpickling a file runs the code it carries); delete it to start "
                f"over (checkpoints are now {CHECKPOINT})"
            )
        # A single-process run writes checkpoint.safetensors, a torchrun one a sharded checkpoint;
        # either resumes on any number of ranks, from the later of the two.
        sharded = path.with_name(SHARDED_CHECKPOINT)
        found: list[tuple[Path, dict[str, Any], dict[str, torch.Tensor] | None]] = []
        if sharded.is_file():
            found.append((sharded, self._read_sharded_record(sharded), None))
        if path.is_file():
            found.append((path, *self._read_checkpoint(path)))
        if not found:
            return
        where, record, tensors = max(found, key=lambda f: f[1]["step"])
        if record.get("fingerprint") != self.fingerprint:
            theirs = record.get("ident") if isinstance(record.get("ident"), dict) else {}
            ours = self._ident_json
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise RuntimeError(
                f"train: checkpoint {where} was written by a run with other settings "
                f"(differs in: {', '.join(diff) or 'unknown'}); use another checkpoint_dir or "
                "delete the checkpoint to start over"
            )
        try:
            if tensors is None:  # sharded: every rank reads the slices of its own shards
                live = self._sharded_tensors()
                load_sharded(live, str(where.parent / record["sharded"]))
                for mine, theirs in zip(self.optimizer.param_groups, record["param_groups"]):
                    mine.update(
                        {
                            k: tuple(v) if isinstance(mine.get(k), tuple) else v
                            for k, v in theirs.items()
                        }
                    )
            elif self.world > 1:  # a single-process checkpoint: whole tensors, kept by shard
                state = self._optimizer_state(record, tensors)
                order = list(self.params)
                full = {f"param/{k}": tensors[f"param/{k}"] for k in order}
                for index, entry in state["state"].items():
                    for name, t in entry.items():
                        full[f"optimizer/{order[index]}/{name}"] = t
                self._load_by_name(full)
            else:
                with torch.no_grad():
                    for k, p in self.params.items():
                        p.copy_(tensors[f"param/{k}"])
                self.optimizer.load_state_dict(self._optimizer_state(record, tensors))
            if tensors is not None and "rng/cpu" in tensors:
                torch.set_rng_state(tensors["rng/cpu"])
            self.history = list(record["history"])
            if self.state and record.get("extra") is not None:
                self.state[1](record["extra"])
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise RuntimeError(
                f"train: checkpoint {where} does not fit this run ({type(exc).__name__}: {exc}); "
                "delete it to start over"
            ) from exc
        self.step = record["step"]
        self.resumed_from = self.step
        _log.info("%s: resumed from %s at step %d", self.config.desc, where, self.step)
