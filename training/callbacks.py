"""Callbacks that turn what a module computes into files a researcher looks at."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import save_image


class ImageGrids(L.Callback):
    """After every validation, save each grid the module offers as a PNG.

    The module's `val_grids()` returns {name: (images (K, 3, H, W) in [-1, 1], images per row)}.
    `grids/<name>_step<N>.png` keeps the history; `grids/<name>.png` is always the latest. Small images are
    upscaled (nearest neighbour) so a 32x32 crop is still readable in an image viewer.
    """

    def __init__(self, run_dir: str, min_size: int = 128):
        self.folder = Path(run_dir) / "grids"
        self.min_size = min_size
        self.latest: dict[str, Path] = {}

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not hasattr(pl_module, "val_grids"):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, (images, per_row) in pl_module.val_grids().items():
            scale = max(1, self.min_size // images.shape[-1])
            images = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
            grid_args = dict(nrow=per_row, padding=2, normalize=True, value_range=(-1, 1))
            save_image(images, self.folder / f"{name}_step{trainer.global_step:06d}.png", **grid_args)
            save_image(images, self.folder / f"{name}.png", **grid_args)
            self.latest[name] = self.folder / f"{name}.png"


class Throughput(L.Callback):
    """Training samples (images or token sequences) per second over all ranks, timed around training steps."""

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
