"""What a checkpoint needs so that a killed run resumes exactly where it stopped.

- RandomStates (a callback): every random state a run draws from (torch, CUDA, numpy, python), per rank,
  saved in each checkpoint and restored on resume after Lightning's seed_everything (callbacks are restored
  later than the seed is set, so the restored state wins). Validation runs RNG-neutral: Lightning reruns the
  validation of the step a checkpoint was written at, and sampling there must not shift training's draws.
- AtomicCheckpointIO (a trainer plugin): a checkpoint is written to a temporary file and renamed into
  place, and the one it replaces is kept as `<name>.prev.ckpt`, so a kill during a write never leaves the
  only checkpoint truncated.
- resume_checkpoint: the newest readable checkpoint of a run folder; a truncated or empty one is named in
  a one-line warning and the previous one is used instead.

The data position is the data modules' part (training/data.py, ResumableData and KeySampler).
"""

from __future__ import annotations

import os
import random
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.io import TorchCheckpointIO


# ----------------------------------------------------------------------------- random states
def capture_random_state() -> dict:
    """This process's RNG states, as plain tensors and numbers (loadable with weights_only=True)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": list(python_state), "gauss": python_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["position"], numpy["has_gauss"], numpy["gauss"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RandomStates(L.Callback):
    """Saves every rank's RNG states in each checkpoint and restores them on resume; validation leaves them
    as it found them."""

    def __init__(self):
        self._before_validation: dict | None = None

    def state_dict(self) -> dict:
        # Lightning builds the checkpoint dict on every rank and writes rank 0's: gather all ranks' states.
        rank, world = _rank_and_world()
        mine = capture_random_state()
        ranks = [mine]
        if world > 1:
            ranks = [None] * world
            dist.all_gather_object(ranks, mine)
        return {"ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        rank, world = _rank_and_world()
        ranks = state.get("ranks", [])
        if len(ranks) != world:
            warnings.warn(
                f"the checkpoint holds random states of {len(ranks)} rank(s), this run has {world}: "
                "training resumes with freshly seeded random states (not bitwise like the killed run)",
                stacklevel=2,
            )
            return
        restore_random_state(ranks[rank])

    def on_validation_start(self, trainer, pl_module):
        self._before_validation = capture_random_state()

    def on_validation_end(self, trainer, pl_module):
        if self._before_validation is not None:
            restore_random_state(self._before_validation)
            self._before_validation = None


# ----------------------------------------------------------------------------- atomic files
def previous_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `<path>.tmp`, fsync, keep the replaced checkpoint as `<stem>.prev.ckpt`, rename."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        if path.is_file():
            os.replace(path, previous_path(path))
        os.replace(temporary, path)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        previous = previous_path(Path(path))
        if previous.is_file():
            previous.unlink()


def readable(path: Path) -> bool:
    """A complete torch.save archive with a safe pickle (mapped, not read: cheap for large files)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # truncated zip, empty file, foreign format, unsafe pickle: not a checkpoint to use
        return False
    return True


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest readable checkpoint of `run_dir` (checkpoints/last.ckpt, its .prev, Lightning's SLURM
    hpc_ckpt_N.ckpt), or None. Unreadable ones are moved aside (`*.corrupt`) with a one-line warning."""
    last = run_dir / "checkpoints" / "last.ckpt"
    candidates = [last, previous_path(last), *run_dir.glob("hpc_ckpt_*.ckpt")]
    candidates = sorted((c for c in candidates if c.is_file()), key=lambda c: c.stat().st_mtime, reverse=True)
    for index, candidate in enumerate(candidates):
        if readable(candidate):
            return candidate
        fallback = next((str(c) for c in candidates[index + 1 :] if readable(c)), None)
        corrupt = candidate.with_name(candidate.name + ".corrupt")
        os.replace(candidate, corrupt)
        print(
            f"warning: checkpoint {candidate} is truncated or unreadable (moved to {corrupt.name}); "
            + (f"resuming from {fallback}" if fallback else "no earlier checkpoint: the run starts afresh"),
            file=sys.stderr,
        )
    return None
