"""Callbacks that turn what a module computes into files a researcher looks at, and what the modules expose to
them: `FlopsPerBatch`, the FLOPs of one training batch that Lightning's ThroughputMonitor turns into FLOP/s
and model FLOP utilisation (MFU)."""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from unittest import mock

import lightning as L
import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchvision.utils import make_grid, save_image

from .checkpoints import capture_random_state, restore_random_state


class ImageGrids(L.Callback):
    """After every validation, save each grid the module offers as a PNG and send it to the run's loggers.

    The module's `val_grids()` returns {name: (images (K, 3, H, W) in [-1, 1], images per row)}.
    `grids/<name>_step<N>.png` keeps the history; `grids/<name>.png` is always the latest. Small images are
    upscaled (nearest neighbour) so a 32x32 crop is still readable in an image viewer. Loggers that take
    images get the same grid as `grids/<name>` at the global step (TensorBoard: add_image; W&B: log_image);
    the CSV logger gets none. Rank zero only.
    """

    def __init__(self, run_dir: str, min_size: int = 128):
        self.folder = Path(run_dir) / "grids"
        self.min_size = min_size
        self.latest: dict[str, Path] = {}
        self.logged: dict[str, int] = {}  # name -> the step whose grid the loggers got

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not hasattr(pl_module, "val_grids"):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, (images, per_row) in pl_module.val_grids().items():
            scale = max(1, self.min_size // images.shape[-1])
            images = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
            grid_args = dict(nrow=per_row, padding=2, normalize=True, value_range=(-1, 1))
            grid = make_grid(images, **grid_args)  # (3, H', W') in [0, 1]
            save_image(grid, self.folder / f"{name}_step{trainer.global_step:06d}.png")
            save_image(grid, self.folder / f"{name}.png")
            self.latest[name] = self.folder / f"{name}.png"
            if self.logged.get(name) != trainer.global_step:  # train.py's final validation may repeat a step
                log_image(trainer, f"grids/{name}", grid)
                self.logged[name] = trainer.global_step


def log_image(trainer, tag: str, grid: torch.Tensor) -> None:
    """grid (3, H, W) in [0, 1] to every logger of the trainer that takes images, at the global step."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, grid, global_step=trainer.global_step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[grid], step=trainer.global_step)


def wandb_logger(save_dir: str, id: str | None = None, **settings) -> WandbLogger:
    """Lightning's WandbLogger (configs/logger/wandb.yaml) whose run id, unless given, is `wandb_run_id`."""
    return WandbLogger(save_dir=save_dir, id=id or wandb_run_id(save_dir), **settings)


def wandb_run_id(run_dir: str) -> str:
    """`<folder name>-<8 hex digits of its absolute path>`: every attempt of a run (resumes, requeued SLURM
    jobs) continues one W&B run, and runs in other folders (sweep jobs, paths.run_dir=...) get their own."""
    folder = Path(run_dir).resolve()
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '-', folder.name)[:48]}-{digest}"


class Throughput(L.Callback):
    """Training samples (images or token sequences) per second over all ranks, timed around training steps
    (data loading excluded), averaged over the whole run: `train/images_per_second`, and metrics.json's
    `train_images_per_second`. Lightning's ThroughputMonitor (configs/callbacks/default.yaml) logs the
    rolling wall-clock rate beside it, with FLOP/s and MFU."""

    def __init__(self):
        self.images, self.seconds = 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds += time.perf_counter() - self._start
        self.images += len(batch["label"]) * trainer.world_size
        pl_module.log("train/images_per_second", self.images_per_second)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


class SkippedImages(L.Callback):
    """Sums the unreadable images the data left out (batch["skipped"], training and validation) over all
    ranks; train.py reports the total and writes it to metrics.json as `skipped_images`."""

    def __init__(self):
        self.count = 0

    def state_dict(self) -> dict:  # every rank's count, so a resumed run keeps summing
        counts = [self.count]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(counts, self.count)
        return {"counts": counts}

    def load_state_dict(self, state: dict) -> None:
        counts = state.get("counts", [])
        initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if initialised else 0
        self.count = counts[rank] if rank < len(counts) else 0

    def _add(self, batch) -> None:
        if isinstance(batch, dict) and "skipped" in batch:
            self.count += int(torch.as_tensor(batch["skipped"]).sum())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._add(batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._add(batch)

    def total(self, trainer) -> int:
        return int(trainer.strategy.reduce(torch.tensor(float(self.count)), reduce_op="sum"))


# ---- FLOPs of a training batch, for lightning.pytorch.callbacks.ThroughputMonitor -------------------------
def samples_in(batch: dict) -> int:
    """Samples (images or token sequences) in a batch: ThroughputMonitor's `batch_size_fn`."""
    return len(batch["label"])


class FlopsPerBatch:
    """Mixin for LightningModules: `flops_per_batch`, the FLOPs of one training batch (forward + backward) on
    this device, which ThroughputMonitor logs as `train/device/flops_per_sec` and, on devices whose peak it
    knows (GPUs), as `train/device/mfu`.

    Measured once, when fitting starts (`setup`, before any strategy wraps or moves the model), by the
    module's `measure_flops_per_batch()`. It is None outside training batches (a validation batch costs
    something else) and where it could not be measured (one warning; the run goes on without FLOPs).
    """

    _flops_per_batch: int | None = None

    @property
    def flops_per_batch(self) -> int | None:
        trainer = getattr(self, "_trainer", None)
        return self._flops_per_batch if trainer is not None and trainer.training else None

    def measure_flops_per_batch(self) -> int | None:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        try:
            self._flops_per_batch = self.measure_flops_per_batch()
        except Exception as error:  # a metric must never stop a run
            self._flops_per_batch = None
            rank_zero_warn(
                f"{type(self).__name__}: FLOPs per batch not measured ({type(error).__name__}: {error}); "
                "throughput is logged without FLOP/s and MFU"
            )


def training_sequences(datamodule, device, count: int = 2):
    """(the first `count` training sequences (count, N[, ...]) long, labels (count,), the batch size) of a
    codes datamodule, on `device`: what a generator-side module measures its FLOPs on; None without them."""
    tokens = getattr(getattr(datamodule, "train_dataset", None), "tokens", None)  # (M, N[, ...])
    batch_size = getattr(datamodule, "batch_size", None)
    if tokens is None or batch_size is None:
        return None
    tokens = tokens[:count].long().to(device)
    return tokens, torch.zeros(len(tokens), dtype=torch.long, device=device), batch_size


def measure_training_flops(
    step: Callable[[], torch.Tensor], modules: Iterable[nn.Module], samples: int, batch_size: int
) -> int:
    """FLOPs of forward + backward of `step()` (a scalar loss of a batch of `samples` samples), scaled to
    `batch_size` samples (matmuls, convolutions and attention, all FlopCounterMode counts, scale with it).

    Nothing a run depends on changes: `modules` (those `step` trains or updates in place, e.g. a quantiser's
    codebook restarts) run on stand-in copies of their parameters and buffers (`stand_ins`); every random
    state is restored afterwards, so a resumed run stays bitwise exact; no collective runs (every rank
    measures alone: torch.distributed reads as uninitialised meanwhile). Attention runs on the math kernel,
    whose matmuls FlopCounterMode counts (it counts no FLOPs in the CPU flash kernel).
    """
    random_state = capture_random_state()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(stand_ins(modules))
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            stack.enter_context(torch.enable_grad())
            if torch.distributed.is_available():
                stack.enter_context(mock.patch.object(torch.distributed, "is_initialized", lambda: False))
            flops = measure_flops(None, step, loss_fn=lambda loss: loss)
    finally:
        restore_random_state(random_state)
    return round(flops * batch_size / samples)


@contextlib.contextmanager
def stand_ins(modules: Iterable[nn.Module]):
    """Within the block, `modules` hold copies of their parameters and buffers (tied ones stay tied); on exit
    the originals are back, untouched, and so is every plain attribute of every submodule (train/eval flags,
    lazily built caches). Gradients and in-place updates computed meanwhile land on the copies."""
    submodules = list({id(m): m for module in modules for m in module.modules()}.values())
    attributes = [(m, dict(vars(m))) for m in submodules]
    tensors = [(m, dict(m._parameters), dict(m._buffers)) for m in submodules]
    copies: dict[int, torch.Tensor] = {}

    def copy(tensor):
        if tensor is not None and id(tensor) not in copies:
            clone = tensor.detach().clone()
            if isinstance(tensor, nn.Parameter):
                clone = nn.Parameter(clone, requires_grad=tensor.requires_grad)
            copies[id(tensor)] = clone
        return None if tensor is None else copies[id(tensor)]

    try:
        for module, parameters, buffers in tensors:
            module._parameters.update({name: copy(p) for name, p in parameters.items()})
            module._buffers.update({name: copy(b) for name, b in buffers.items()})
        yield
    finally:
        for module, parameters, buffers in tensors:
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
        for module, saved in attributes:
            for key in set(vars(module)) - set(saved):
                del vars(module)[key]
            vars(module).update(saved)
