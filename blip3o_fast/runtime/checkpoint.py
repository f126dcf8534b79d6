"""Checkpoints that count only when complete, with exact resume.

A checkpoint is a folder `<run>/checkpoints/step-NNNNNNN/` holding DeepSpeed's model and optimizer
states (any ZeRO stage), `ema.safetensors` (full float32 EMA weights), `config.yaml`, `meta.json`
(step and counters), and one `rank-NNNNN.pt` per rank (its data-stream and RNG state). Rank 0 writes
the `COMPLETE` marker last, after every rank has finished writing; only marked checkpoints are
resumed from, and older ones are pruned only once a newer one is complete. Another process count
resumes too (docs/architecture.md §3.11): a ZeRO 1-3 checkpoint through DeepSpeed's universal form.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from ..errors import UserError
from . import distributed, launcher
from .files import atomic_write_text

MARKER = "COMPLETE"
UNIVERSAL = "universal"  # <checkpoint>/universal/<tag>/: DeepSpeed's universal form, made by an elastic resume
_NAME = re.compile(r"^step-(\d{7,})$")


def tag(step: int) -> str:
    return f"step-{step:07d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Restored:
    step: int
    meta: dict
    rank_state: dict | None  # None: the checkpoint has no rank of this number (saved with fewer ranks)
    ema: dict[str, torch.Tensor]
    saved_ranks: int


def rank_files(path: Path) -> list[Path]:
    return sorted(path.glob("rank-[0-9]*.pt"))


def partitioned(path: Path) -> bool:
    """Whether DeepSpeed split the optimizer state per process (ZeRO stages 1-3) in this checkpoint."""
    return any(path.glob("*zero_pp_rank_*_optim_states.pt"))


class Checkpointer:
    def __init__(self, run_dir: Path, keep_last: int, dist: distributed.Dist):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.dist = dist

    # -- discovery --------------------------------------------------------------------------------

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _NAME.match(p.name) and (p / MARKER).is_file()]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

    def resolve(self, resume: str | None) -> Path | None:
        """`auto`: the newest complete checkpoint or None; a path: that checkpoint (must be complete)."""
        if resume in (None, "", "none", "never"):
            return None
        if resume == "auto":
            found = self.complete()
            return found[-1] if found else None
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise UserError(f"{path} is not a complete checkpoint (no {MARKER} marker): pass --resume auto to take the "
                            f"newest complete one in {self.root}")
        return path

    # -- saving -----------------------------------------------------------------------------------

    def save(self, engine, step: int, ema, rank_state: dict, meta: dict, config_yaml: str) -> Path:
        """Collective: every rank calls it. Returns the checkpoint folder."""
        launcher.stop_if_orphaned()  # a rank without its launcher starts no checkpoint (§4.5)
        name = tag(step)
        path = self.root / name
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # a leftover of an interrupted save of this same step
                shutil.rmtree(path)
        distributed.barrier()
        engine.save_checkpoint(str(self.root), tag=name, save_latest=False)
        ema_state = ema.full_state_dict()  # collective under ZeRO-3
        torch.save({**rank_state, "rng": rng_state()}, path / f"rank-{self.dist.rank:05d}.pt")
        if self.dist.is_main:
            save_file({k: v.contiguous() for k, v in ema_state.items()}, str(path / "ema.safetensors"))
            (path / "config.yaml").write_text(config_yaml)
            atomic_write_text(path / "meta.json", json.dumps({**meta, "step": step}, indent=1))
        distributed.barrier()  # every rank's files are on disk before the marker
        if self.dist.is_main:
            atomic_write_text(path / MARKER, f"{step}\n")
            self._prune(keep=path)
        distributed.barrier()
        return path

    def _prune(self, keep: Path) -> None:
        """Drops complete checkpoints beyond the last K, and incomplete leftovers older than `keep`."""
        complete = self.complete()
        for old in complete[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        newest = int(_NAME.match(keep.name).group(1))
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m and not (p / MARKER).is_file() and int(m.group(1)) < newest:
                shutil.rmtree(p, ignore_errors=True)

    # -- loading ----------------------------------------------------------------------------------

    def universal(self, path: Path) -> Path:
        """Collective: DeepSpeed's universal checkpoint of `path` (per-parameter fp32 weights and Adam moments,
        loadable by any process count), converted once by rank 0 with `ds_to_universal` into
        `<checkpoint>/universal/<tag>/`; an interrupted conversion leaves only a `universal.tmp` to redo."""
        out = path / UNIVERSAL / path.name
        if self.dist.is_main and not (out / MARKER).is_file():
            from deepspeed.checkpoint import ds_to_universal

            tmp = path / f"{UNIVERSAL}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            args = Namespace(input_folder=str(path), output_folder=str(tmp / path.name), num_extract_workers=1,
                             num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines, not ours
                ds_to_universal.main(args)
            atomic_write_text(tmp / path.name / MARKER, f"{path.name}\n")
            shutil.rmtree(path / UNIVERSAL, ignore_errors=True)
            os.replace(tmp, path / UNIVERSAL)
        distributed.barrier()
        return out

    def load(self, engine, path: Path, universal: Path | None = None) -> Restored:
        """Collective: model and optimizer into the engine (from `universal`, DeepSpeed's universal form, when
        given); returns this rank's state and the EMA. With another process count this rank's state may be
        missing (None): the caller then maps the data streams from every rank's (`data_states`)."""
        source = universal or path
        load_path, _ = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise UserError(f"DeepSpeed could not load the checkpoint {source}")
        rank_file = path / f"rank-{self.dist.rank:05d}.pt"
        rank_state = None
        if rank_file.is_file():
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
            set_rng_state(rank_state.pop("rng"))
        meta = json.loads((path / "meta.json").read_text())
        return Restored(int(meta["step"]), meta, rank_state, load_file(str(path / "ema.safetensors")),
                        len(rank_files(path)))

    @staticmethod
    def data_states(path: Path) -> list[dict]:
        """Every saved rank's data-stream state (an elastic resume maps them onto the new ranks)."""
        return [torch.load(f, map_location="cpu", weights_only=False)["data"] for f in rank_files(path)]


# what makes a folder's checkpoints another experiment: these sections, except keys that only say how to run it
EXPERIMENT_SECTIONS = ("task", "model", "data")
HOW_TO_RUN = {"model.attention", "model.fused_ops", "model.activation_checkpointing", "data.pin_memory",
              "data.eval_split", "data.num_workers"}  # num_workers: the reader re-deals its streams (§3.9.4)


def differing_keys(saved: dict, current: dict) -> list[str]:
    """`section.key (saved -> current)` for every experiment key whose value differs."""
    out = []
    for section in EXPERIMENT_SECTIONS:
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            name = f"{section}.{key}"
            if name not in HOW_TO_RUN and a.get(key) != b.get(key):
                out.append(f"{name} ({a.get(key)!r} -> {b.get(key)!r})")
    return out


def check_same_experiment(checkpoint: Path, current: dict) -> None:
    """--resume auto continues only the same experiment: a folder whose newest checkpoint was trained with
    another model, task or data is refused with the differing keys (docs/architecture.md §3.11)."""
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}
    diff = differing_keys(saved, current)
    if diff:
        raise UserError(f"--resume auto: run folder {checkpoint.parent.parent} holds another experiment; its "
                        f"checkpoint {checkpoint.name} differs in {', '.join(diff)}; pass --out NEW_FOLDER for a new "
                        f"run, or --resume {checkpoint} to continue from it with this config")


def load_ema_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full EMA weights of a complete checkpoint (for evaluation, any process count)."""
    if not (checkpoint / MARKER).is_file():
        raise UserError(f"{checkpoint} is not a complete checkpoint (no {MARKER} marker)")
    return load_file(str(checkpoint / "ema.safetensors"))
