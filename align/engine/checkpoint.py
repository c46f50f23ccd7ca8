"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG of every rank, data position.

A checkpoint lives in ``<root>/step-<N>/``. DeepSpeed writes the engine state; each rank adds its
RNG state; ``align_state.json`` is written last (to a temporary name, then renamed), after every rank
finished, and marks the checkpoint complete. It lists the size of every file the checkpoint holds.
Resuming picks the newest complete checkpoint: one without its marker, with a marker that does not
parse, or with a file missing or of another size than listed (torn by a crash mid-save, or truncated
later) is skipped, and the one before it is used.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from align.engine.dist import Rank, barrier

MARKER = "align_state.json"
log = logging.getLogger(__name__)


def _tag(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_files(folder: Path) -> dict[str, int]:
    """Relative POSIX path -> size in bytes of every file under ``folder`` except the marker."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MARKER and not path.name.startswith(f".{MARKER}")
    }


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint in ``folder`` cannot be resumed from, or None when it is complete."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return f"no {MARKER}"
    try:
        state = json.loads(marker.read_text())
        step = state["step"]
    except (ValueError, KeyError, TypeError):
        return f"{MARKER} is not a complete align state"
    if not isinstance(step, int):
        return f"{MARKER} names no step"
    listed = state.get("files")
    if listed is None:  # written before markers listed their files
        return None
    stored = checkpoint_files(folder)
    for relative, size in sorted(listed.items()):
        if relative not in stored:
            return f"{relative} is missing"
        if stored[relative] != size:
            return f"{relative} has {stored[relative]} bytes, {MARKER} says {size}"
    return None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first; torn ones are skipped."""
    found = []
    for folder in Path(root).glob("step-*"):
        problem = checkpoint_problem(folder)
        if problem is not None:
            if (folder / MARKER).exists():
                log.warning("skipping checkpoint %s: %s", folder, problem)
            continue
        found.append((json.loads((folder / MARKER).read_text())["step"], folder))
    return sorted(found)


def save_checkpoint(
    engine, root: Path, step: int, rank: Rank, state: dict, keep: int = 2, others: dict | None = None
) -> Path:
    """Save after optimizer step ``step``; every rank calls this. Keeps the newest ``keep`` checkpoints.

    ``others`` names further engines trained beside ``engine`` (the PPO critic); each is saved in a
    sub-folder of the same checkpoint, before the marker, so the checkpoint is complete for all.
    """
    root = Path(root)
    tag = _tag(step)
    engine.save_checkpoint(str(root), tag=tag, exclude_frozen_parameters=True, save_latest=False)
    for name, other in (others or {}).items():
        other.save_checkpoint(str(root / tag), tag=name, exclude_frozen_parameters=True, save_latest=False)
    torch.save(rng_state(), root / tag / f"rng_rank{rank.rank}.pt")
    barrier()
    if rank.is_main:
        files = checkpoint_files(root / tag)
        marker = {"step": step, "world_size": rank.world_size, **state, "files": files}
        staging = root / tag / f".{MARKER}.partial"
        staging.write_text(json.dumps(marker))
        staging.replace(root / tag / MARKER)  # rename(2): the marker is whole or absent
        for _, old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return root / tag


def load_checkpoint(engine, folder: Path, rank: Rank, others: dict | None = None) -> dict:
    """Restore engine and RNG state from ``folder``; returns the saved align state (its ``step`` included)."""
    folder = Path(folder)
    state = json.loads((folder / MARKER).read_text())
    if state["world_size"] != rank.world_size:
        raise RuntimeError(
            f"checkpoint {folder} was written by {state['world_size']} ranks, this run has {rank.world_size}; "
            "resume with the same resources.num_workers"
        )
    engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_module_strict=False, load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    for name, other in (others or {}).items():
        other.load_checkpoint(
            str(folder), tag=name, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    set_rng_state(torch.load(folder / f"rng_rank{rank.rank}.pt", weights_only=False))
    state.pop("files", None)
    return state
