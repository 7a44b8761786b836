"""Data modules: every source yields batches {"image": float (B, 3, H, W) in [-1, 1], "label": long (B,)}.

Three sources share one batch format and one set of crop transforms, so a recipe changes dataset by changing
config only:

- PhotosDataModule: natural photos bundled inside scikit-image and scikit-learn, served as random crops.
  No network, deterministic under a seed, any resolution. Validation crops come from a held-out strip of
  each photo, so no validation pixel is ever trained on.
- ClassFolderDataModule: an ImageNet-style folder root/<class>/<image>.
- ShardsDataModule: webdataset tar shards streamed with resampling, split by rank and worker, for
  multi-node runs (exactly `batches_per_epoch` batches on every rank, since uneven epochs hang DDP).

Broken images are skipped, counted and warned about, never fatal: one bad JPEG must not kill a week-long run.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import random
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate


def _readable_extensions() -> tuple[str, ...]:
    """Every file extension of a format Pillow can open (not the write-only ones such as .pdf)."""
    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


IMAGE_EXTENSIONS = _readable_extensions()  # .jpg .png .webp .gif .tif(f) .bmp ... read by class folders
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class DataError(ValueError):
    """Data that contradicts the settings (a label outside num_classes): stops the run in one line."""

    @staticmethod
    def one_line(error: Exception) -> str:
        """The message itself, also when a DataLoader worker re-raised it inside its traceback text."""
        last = str(error).strip().splitlines()[-1]
        return last.split("DataError: ", 1)[-1]


# ----------------------------------------------------------------------------- tensors and transforms
def to_tensor_image(image: Image.Image | np.ndarray) -> torch.Tensor:
    """PIL image or uint8 array (H, W[, 3]) -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)  # (3, H, W)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float tensor (..., 3, H, W) in [-1, 1] -> uint8 array (..., H, W, 3), ready for PIL / PNG files."""
    images = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return images.movedim(-3, -1).cpu().numpy()


def _resize_box(image: Image.Image, box: tuple[int, int, int, int], resolution: int) -> Image.Image:
    """Crop (left, top, right, bottom) and resize to a square in one antialiased bilinear resample."""
    return image.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box)


def random_resized_crop(
    image: Image.Image,
    resolution: int,
    rng: np.random.Generator,
    scale=(0.8, 1.0),
    ratio=(3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """Training view: a crop covering `scale` of the area at aspect `ratio`, a random horizontal flip unless
    flip=False (digits, text) -> (3, r, r). The flip's draw is made either way: the same crops follow."""
    width, height = image.size
    area = width * height * rng.uniform(*scale)
    aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
    crop_w = int(min(width, max(1, round((area * aspect) ** 0.5))))
    crop_h = int(min(height, max(1, round((area / aspect) ** 0.5))))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    crop = _resize_box(image, (left, top, left + crop_w, top + crop_h), resolution)
    if rng.random() < 0.5 and flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor_image(crop)


def center_crop(image: Image.Image, resolution: int) -> torch.Tensor:
    """Evaluation view: the central square, resized (= resize shorter side, then center crop) -> (3, r, r)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return to_tensor_image(_resize_box(image, (left, top, left + side, top + side), resolution))


def _rank_and_world_size(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torch.distributed if initialised, else RANK / WORLD_SIZE env, else (0, 1)."""
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither (auto-detect)")
    if rank is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def train_loader(
    dataset: Dataset, sampler: Sampler, batch_size: int, num_workers: int, seed: int, collate_fn=None
) -> DataLoader:
    """Full batches only (uneven last batches hang DDP), workers kept across epochs, and an explicit
    generator: a DataLoader without one draws its workers' base seed from torch's global RNG at every epoch,
    which would shift the training RNG of a resumed run (its iterator starts at another moment)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_fn,
    )


def val_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, collate_fn=None) -> DataLoader:
    """In order, every sample; the explicit generator keeps the iterator off torch's global RNG."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
        collate_fn=collate_fn,
    )


class ResumableData:
    """Mixin of the map-style data modules: where in its epoch a run stopped, saved in every checkpoint.

    Lightning stores a LightningDataModule's state_dict() in the checkpoint and hands it back to
    load_state_dict() before it asks for the train dataloader; the module then makes its sampler skip the
    batches the killed run had trained, so the resumed run's next batch is the one the killed run would have
    trained next. `batch_progress.current.processed` counts this epoch's trained batches at the moment a
    checkpoint is written (on_train_batch_end); Lightning's prefetched, untrained batch is not counted.
    """

    resume_at: tuple[int, int] | None = None  # (epoch, batches of it already trained)

    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        trained = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches": trained}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.resume_at = (int(state["epoch"]), int(state["batches"]))

    def resumable_sampler(self, sampler: KeySampler, batch_size: int) -> KeySampler:
        if self.resume_at is not None:
            epoch, batches = self.resume_at
            sampler.set_epoch(epoch)
            sampler.skip_once(epoch, batches * batch_size)
            self.resume_at = None
        return sampler


class KeySampler(DistributedSampler):
    """Yields this rank's keys of epoch e: key = e * samples_per_epoch + i for i in [0, samples_per_epoch),
    in order or in a permutation seeded by (seed, e). A dataset maps a key to its sample (key % length) and
    to the randomness of its augmentation (seeded by the key), so sample k is the same in every run, on every
    rank, whatever the workers and whenever the run was resumed.

    Subclassing DistributedSampler makes Lightning keep it under DDP instead of injecting its own, and call
    set_epoch on it each epoch. Every rank gets samples_per_epoch // world_size keys (the remainder is
    dropped) so ranks stay in step. skip_once(epoch, n): the next iteration over that epoch starts at its
    n-th key (a resumed run).
    """

    def __init__(
        self,
        samples_per_epoch: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ):
        if num_replicas is None or rank is None:  # DistributedSampler would raise without a process group
            initialised = dist.is_available() and dist.is_initialized()
            num_replicas, rank = (dist.get_world_size(), dist.get_rank()) if initialised else (1, 0)
        super().__init__(
            range(samples_per_epoch),
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,
        )
        self.samples_per_epoch = samples_per_epoch
        self.skip: tuple[int, int] | None = None

    def skip_once(self, epoch: int, count: int) -> None:
        self.skip = (epoch, count)

    def keys(self, epoch: int) -> torch.Tensor:
        """This rank's keys of `epoch`, in order."""
        if self.shuffle:
            order = torch.randperm(
                self.samples_per_epoch, generator=torch.Generator().manual_seed(self.seed + epoch)
            )
        else:
            order = torch.arange(self.samples_per_epoch)
        return epoch * self.samples_per_epoch + order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self):
        keys = self.keys(self.epoch)
        if self.skip is not None and self.skip[0] == self.epoch:
            keys = keys[self.skip[1] :]
        self.skip = None
        return iter(keys.tolist())


# ----------------------------------------------------------------------------- embedded photos
# Files that ship inside skimage/data (the others need a pooch download); the last six are grayscale.
_SKIMAGE_FILES = (
    "astronaut.png coffee.png chelsea.png rocket.jpg motorcycle_left.png motorcycle_right.png retina.jpg"
    " hubble_deep_field.jpg ihc.png camera.png coins.png moon.png gravel.png brick.png grass.png"
).split()


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[tuple[str, np.ndarray], ...]:
    """(name, uint8 (H, W, 3)) for each bundled photo that loads; read from package files, never fetched."""
    import skimage
    import sklearn.datasets

    skimage_dir = Path(skimage.__file__).parent / "data"
    sklearn_dir = Path(sklearn.datasets.__file__).parent / "images"
    paths = {file.split(".")[0]: skimage_dir / file for file in _SKIMAGE_FILES}
    paths["immunohistochemistry"] = paths.pop("ihc")
    paths |= {"china": sklearn_dir / "china.jpg", "flower": sklearn_dir / "flower.jpg"}
    photos = []
    for name, path in paths.items():
        try:
            with Image.open(path) as image:
                photos.append((name, np.asarray(image.convert("RGB"))))  # grayscale -> RGB
        except OSError as exn:
            warnings.warn(f"embedded photo {name!r} not available ({exn}); dropped", stacklevel=2)
    if not photos:
        raise RuntimeError("no embedded photos could be loaded from scikit-image / scikit-learn")
    return tuple(photos)


def _val_start(width: int, val_fraction: float) -> int:
    """First column of the held-out validation strip (the right-most `val_fraction` of the columns)."""
    return min(width - 1, max(1, round(width * (1 - val_fraction))))


class PhotoCrops(Dataset):
    """Square crops of the embedded photos; crop_box(key) -> (photo, top, left, side, flip) is pure.

    Training: the key is a global sample id g; rng([seed, 0, g]) picks the photo uniformly and a crop of side
    s * min(region) with s ~ U[min_scale, 1] inside the photo's training region (the columns left of the
    validation strip), plus a flip. So sample g is the same crop in every run and on every rank.
    Validation: key i -> crop i // num_photos of photo i % num_photos (photos interleaved, so the first
    batch, which becomes the reconstruction grid, shows every photo), inside the held-out strip, with
    the training side distribution, shrunk to the largest square that fits when the strip is narrower.
    """

    def __init__(
        self,
        photos: tuple[tuple[str, np.ndarray], ...],
        resolution: int,
        train: bool,
        seed: int = 0,
        min_scale: float = 0.25,
        val_fraction: float = 0.25,
        length: int = 4096,
        val_per_class: int = 8,
        flip: bool = True,
    ):
        if not 0 < val_fraction < 1 or not 0 < min_scale <= 1:
            raise ValueError(
                f"need 0 < val_fraction < 1 and 0 < min_scale <= 1, got {val_fraction}, {min_scale}"
            )
        self.photos = [array for _, array in photos]
        self.val_starts = [_val_start(array.shape[1], val_fraction) for array in self.photos]
        self.resolution, self.train, self.seed, self.min_scale = resolution, train, seed, min_scale
        self.val_per_class, self.flip = val_per_class, flip
        self.length = length if train else len(self.photos) * val_per_class

    def __len__(self) -> int:
        return self.length  # training: samples per epoch; the sampler hands out ids beyond it in later epochs

    def region(self, photo: int) -> tuple[int, int]:
        """Column range [start, stop) that this split may read from `photo`."""
        start, width = self.val_starts[photo], self.photos[photo].shape[1]
        return (0, start) if self.train else (start, width)

    def crop_box(self, key: int) -> tuple[int, int, int, int, bool]:
        if self.train:
            rng = np.random.default_rng([self.seed, 0, key])
            photo = int(rng.integers(len(self.photos)))
        else:
            photo = key % len(self.photos)
            rng = np.random.default_rng([self.seed, 1, photo, key // len(self.photos)])
        height = self.photos[photo].shape[0]
        col_start, col_stop = self.region(photo)
        train_side = min(height, self.val_starts[photo])  # sides follow the training region's scale
        side = max(1, min(round(rng.uniform(self.min_scale, 1.0) * train_side), height, col_stop - col_start))
        top = int(rng.integers(0, height - side + 1))
        left = col_start + int(rng.integers(0, col_stop - col_start - side + 1))
        return photo, top, left, side, bool(self.train and rng.random() < 0.5) and self.flip

    def __getitem__(self, key: int) -> dict:
        photo, top, left, side, flip = self.crop_box(key)
        crop = np.ascontiguousarray(self.photos[photo][top : top + side, left : left + side])  # (s, s, 3)
        image = Image.fromarray(crop).resize((self.resolution,) * 2, Image.Resampling.BILINEAR)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {"image": to_tensor_image(image), "label": photo}


class PhotosDataModule(ResumableData, L.LightningDataModule):
    """The embedded default dataset: random crops of bundled photos, label = source photo."""

    def __init__(
        self,
        resolution: int,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        samples_per_epoch: int = 4096,
        val_per_class: int = 8,
        val_fraction: float = 0.25,
        min_scale: float = 0.25,
        flip: bool = True,
    ):
        super().__init__()
        photos = load_photos()
        self.class_names = [name for name, _ in photos]
        self.num_classes = len(photos)
        self.batch_size, self.num_workers, self.samples_per_epoch = batch_size, num_workers, samples_per_epoch
        self.seed = seed
        common = dict(resolution=resolution, seed=seed, min_scale=min_scale, val_fraction=val_fraction)
        self.train_dataset = PhotoCrops(photos, train=True, length=samples_per_epoch, flip=flip, **common)
        self.val_dataset = PhotoCrops(photos, train=False, val_per_class=val_per_class, **common)

    def train_dataloader(self) -> DataLoader:
        sampler = self.resumable_sampler(
            KeySampler(self.samples_per_epoch), self.batch_size
        )  # after DDP init
        return train_loader(self.train_dataset, sampler, self.batch_size, self.num_workers, self.seed)

    def val_dataloader(self) -> DataLoader:
        # A few hundred in-memory crops: worker processes would cost more than they save.
        return val_loader(self.val_dataset, self.batch_size)


# ----------------------------------------------------------------------------- class folders
def scan_class_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """root/<class>/<image> -> (sorted class names, sorted [(path, label)]); ValueError if none found.
    Images are the files with an extension Pillow opens (IMAGE_EXTENSIONS); other files are left out."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    files = [
        (str(path), label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not files:
        raise ValueError(f"no images found in class folder {root} (expected root/<class>/<image>)")
    return classes, files


def _held_out(path: str, val_fraction: float) -> bool:
    """Stable hold-out: hash of the file name, so the split ignores the seed and survives added files."""
    digest = hashlib.sha1(Path(path).name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


class ImageFiles(Dataset):
    """(path, label) list -> {"image", "label"}, or None for a file that does not decode (skip_unreadable
    drops it from its batch and counts it: a bad file is never replaced by a copy of a good one).

    Keys may exceed the length (KeySampler's keys of later epochs): key k reads file k % len, and its
    training crop draws from rng([seed, k]), so a sample never depends on the workers or on a resume.
    Each unreadable file is warned about once per process (each dataloader worker has its own copy).
    """

    def __init__(
        self, files: list[tuple[str, int]], resolution: int, train: bool, seed: int = 0, flip: bool = True
    ):
        self.files, self.resolution, self.train, self.seed, self.flip = files, resolution, train, seed, flip
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int) -> dict | None:
        path, label = self.files[key % len(self.files)]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as exn:  # any decoder error: skip, never stop the run
            if path not in self.skipped:
                self.skipped.add(path)
                warnings.warn(f"skipping unreadable image {path} ({exn!r})", stacklevel=2)
            return None
        if self.train:
            rng = np.random.default_rng([self.seed, key])
            view = random_resized_crop(image, self.resolution, rng, flip=self.flip)
            return {"image": view, "label": label}
        return {"image": center_crop(image, self.resolution), "label": label}


def skip_unreadable(samples: list[dict | None]) -> dict:
    """Collate the readable samples; batch["skipped"] counts the ones left out (summed over the run)."""
    readable = [sample for sample in samples if sample is not None]
    if not readable:
        raise DataError(f"all {len(samples)} images of a batch are unreadable: check the image folder")
    batch = default_collate(readable)
    batch["skipped"] = torch.tensor(len(samples) - len(readable))
    return batch


class ClassFolderDataModule(ResumableData, L.LightningDataModule):
    """ImageNet layout root/<class>/<image>; without val_root, a stable `val_fraction` is held out."""

    def __init__(
        self,
        root: str,
        resolution: int,
        batch_size: int,
        val_root: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.05,
        flip: bool = True,
    ):
        super().__init__()
        self.class_names, files = scan_class_folder(root)
        self.num_classes = len(self.class_names)
        if val_root is None:
            train_files = [f for f in files if not _held_out(f[0], val_fraction)]
            val_files = [f for f in files if _held_out(f[0], val_fraction)]
        else:
            val_classes, val_files = scan_class_folder(val_root)
            if val_classes != self.class_names:
                raise ValueError(f"class folders differ between {root} and {val_root}")
            train_files = files
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_dataset = ImageFiles(train_files, resolution, train=True, seed=seed, flip=flip)
        self.val_dataset = ImageFiles(val_files, resolution, train=False)

    def train_dataloader(self) -> DataLoader:
        sampler = KeySampler(len(self.train_dataset), shuffle=True, seed=self.seed)
        sampler = self.resumable_sampler(sampler, self.batch_size)
        return train_loader(
            self.train_dataset, sampler, self.batch_size, self.num_workers, self.seed, skip_unreadable
        )

    def val_dataloader(self) -> DataLoader:
        return val_loader(self.val_dataset, self.batch_size, self.num_workers, skip_unreadable)


# ----------------------------------------------------------------------------- webdataset shards
def _split(items: list, index: int, count: int, strict: bool) -> list:
    """items[index::count]; when not strict and there are fewer items than parts, every part gets them all."""
    return items[index::count] if strict or len(items) >= count else items


class ShardStream:
    """One split of a sharded dataset: the stages of a webdataset pipeline plus their shared state.

    The stages run inside dataloader workers; rank and world size are fixed in the main process (workers
    cannot always see torch.distributed) and the worker id is read at iteration time. Training resamples this
    rank's shards forever with an RNG seeded from (seed, rank, worker, epoch), so runs are reproducible and
    set_epoch (called by Lightning each epoch) gives new data. Validation reads each shard once: shards are
    split by rank, then by worker, without shuffling.
    """

    def __init__(
        self,
        urls: str,
        rank: int,
        world_size: int,
        resolution: int,
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        num_classes: int | None = None,
        flip: bool = True,
    ):
        self.urls = list(wds.shardlists.expand_urls(urls))
        self.num_classes, self.flip = num_classes, flip
        self.rank, self.world_size, self.resolution, self.train = rank, world_size, resolution, train
        self.seed, self.shuffle_buffer, self.epoch, self.num_skipped = seed, shuffle_buffer, 0, 0
        self.pending_skips = 0  # skipped since the last yielded sample: its "skipped" field
        self.resume: tuple[int, int] | None = None  # (epoch, batches of it already trained)
        if len(self.urls) < world_size:
            warnings.warn(
                f"{len(self.urls)} shards for {world_size} ranks: "
                + ("ranks will resample the same shards" if train else "some ranks get no data"),
                stacklevel=2,
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _resuming(self) -> bool:
        return self.resume is not None and self.resume[0] == self.epoch

    def _worker(self) -> tuple[int, int]:
        """(worker id, workers). The loader takes batch j from worker j % W; a stream resumed after k
        batches shifts the ids by k so that its first worker plays the part of the one batch k came from."""
        info = torch.utils.data.get_worker_info()
        worker, count = (info.id, info.num_workers) if info is not None else (0, 1)
        return ((worker + self.resume[1]) % count if self._resuming() else worker), count

    def _seed(self, stage: int) -> list[int]:
        return [self.seed, self.rank, self._worker()[0], self.epoch, stage]

    def shards(self):
        """Pipeline source: {"url": ...} dicts for this rank and worker."""
        worker, num_workers = self._worker()
        mine = _split(self.urls, self.rank, self.world_size, strict=not self.train)
        mine = _split(mine, worker, num_workers, strict=not self.train)
        if not self.train:
            yield from ({"url": url} for url in mine)
            return
        rng = random.Random(str(self._seed(0)))
        while True:
            yield {"url": rng.choice(mine)}

    def shuffle(self, samples):
        """Buffer shuffle with a seeded RNG (webdataset's default RNG is seeded from the clock)."""
        rng, buffer = random.Random(str(self._seed(1))), []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                index = rng.randrange(len(buffer))
                buffer[index], buffer[-1] = buffer[-1], buffer[index]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def drop_trained(self, batches):
        """After batching: in the epoch of `resume`, drop the k batches a killed run had trained: worker w
        (as _worker numbers it) made batches w, w + W, ..., so it drops its first ceil((k - w) / W)."""
        if not self._resuming():
            yield from batches
            return
        worker, num_workers = self._worker()
        drop = max(0, -(-(self.resume[1] - worker) // num_workers))
        for index, batch in enumerate(batches):
            if index >= drop:
                yield batch

    def skip(self, exn: Exception, what: str = "shard data") -> bool:
        """Handler for broken tar members / samples: count, warn, keep going."""
        self.num_skipped += 1
        self.pending_skips += 1
        warnings.warn(
            f"skipping {what} ({exn!r}); {self.num_skipped} skipped so far in this process", stacklevel=2
        )
        return True

    def decode(self, samples):
        """Raw tar samples -> {"image": (3, r, r), "label": int, "skipped": unreadable samples since the
        previous one (batched into batch["skipped"])}, with the same views as class folders."""
        rng = np.random.default_rng(self._seed(2))
        for sample in samples:
            try:
                key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
                if key is None:
                    raise KeyError(f"no image among keys {sorted(sample)}")
                with Image.open(io.BytesIO(sample[key])) as image:
                    image = image.convert("RGB")
                label = int(sample["cls"])
                if self.num_classes is not None and not 0 <= label < self.num_classes:
                    raise DataError(
                        f"sample {sample.get('__key__')} of shard {sample.get('__url__')} has cls={label}, "
                        f"outside data.num_classes={self.num_classes} (0 .. {self.num_classes - 1})"
                    )
            except DataError:
                raise  # a wrong setting or wrong shards, not one unreadable image: stop
            except Exception as exn:
                self.skip(exn, f"sample {sample.get('__key__')} of {sample.get('__url__')}")
                continue
            view = (
                random_resized_crop(image, self.resolution, rng, flip=self.flip)
                if self.train
                else center_crop(image, self.resolution)
            )
            yield {"image": view, "label": label, "skipped": self.pending_skips}
            self.pending_skips = 0


def check_shards(key: str, pattern: str | None) -> None:
    """Local shard files must exist before training starts (a resampling loader would otherwise wait on an
    empty list forever); URLs and pipes ("http://", "pipe:") are the loader's to open."""
    if pattern is None:
        return
    urls = list(wds.shardlists.expand_urls(pattern))
    local = [url for url in urls if "://" not in url and not url.startswith("pipe:")]
    missing = [url for url in local if not Path(url).is_file()]
    if missing and len(missing) == len(urls):
        raise ValueError(
            f"{key}={pattern} matches no file (e.g. {missing[0]}); give a brace pattern of existing shards, "
            "e.g. data/train-{000000..000127}.tar"
        )
    if missing:
        raise ValueError(
            f"{key}={pattern}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}"
        )


class ShardsDataModule(ResumableData, L.LightningDataModule):
    """Webdataset shards ("data/train-{000000..000127}.tar") with keys jpg|png|webp and cls.

    `rank` / `world_size` override auto-detection (torch.distributed, then RANK / WORLD_SIZE env vars).
    class_names come from classes.json beside the train shards when present (written by make_shards.py).
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None,
        batches_per_epoch: int,
        num_classes: int,
        resolution: int,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int | None = None,
        world_size: int | None = None,
        flip: bool = True,
    ):
        super().__init__()
        self.train_shards, self.val_shards, self.flip = train_shards, val_shards, flip
        self.batches_per_epoch, self.shuffle_buffer = batches_per_epoch, shuffle_buffer
        self.num_classes, self.resolution, self.batch_size = num_classes, resolution, batch_size
        self.num_workers, self.seed, self.rank, self.world_size = num_workers, seed, rank, world_size
        for key, pattern in (("data.train_shards", train_shards), ("data.val_shards", val_shards)):
            check_shards(key, pattern)
        classes_file = Path(next(iter(wds.shardlists.expand_urls(train_shards)))).parent / "classes.json"
        self.class_names = [str(i) for i in range(num_classes)]
        if classes_file.is_file():
            names = json.loads(classes_file.read_text())
            if len(names) != num_classes:
                raise ValueError(f"{classes_file} lists {len(names)} classes but num_classes={num_classes}")
            self.class_names = [names[str(i)] for i in range(num_classes)]
        self.train_stream = self.val_stream = None  # built by the *_dataloader() calls, after DDP init

    def _loader(self, urls: str, train: bool) -> tuple[ShardStream, wds.WebLoader]:
        rank, world_size = _rank_and_world_size(self.rank, self.world_size)
        stream = ShardStream(
            urls,
            rank,
            world_size,
            self.resolution,
            train,
            self.seed,
            self.shuffle_buffer,
            self.num_classes,
            self.flip,
        )
        stages = [stream.shards, wds.tarfile_to_samples(handler=stream.skip)]
        stages += [stream.shuffle] if stream.train else []
        stages += [
            stream.decode,
            wds.batched(self.batch_size, collation_fn=default_collate, partial=not train),
        ]
        stages += [stream.drop_trained] if stream.train else []
        pipeline = wds.DataPipeline(*stages)
        generator = torch.Generator().manual_seed(self.seed)  # keeps iterators off torch's global RNG
        return stream, wds.WebLoader(
            pipeline, batch_size=None, num_workers=self.num_workers, generator=generator
        )

    def train_dataloader(self) -> wds.WebLoader:
        self.train_stream, loader = self._loader(self.train_shards, train=True)
        if self.resume_at is not None:  # the stream replays its epoch and drops what was trained
            self.train_stream.set_epoch(self.resume_at[0])
            self.train_stream.resume, self.resume_at = self.resume_at, None
        # Epoch length is counted on the loader, across workers: exactly batches_per_epoch on every rank.
        loader = loader.with_epoch(self.batches_per_epoch)
        loader.sampler = self.train_stream  # Lightning calls loader.sampler.set_epoch(epoch) every epoch
        return loader.with_length(self.batches_per_epoch, silent=True)

    def val_dataloader(self) -> wds.WebLoader | list:
        if self.val_shards is None:
            return []
        self.val_stream, loader = self._loader(self.val_shards, train=False)
        return loader


# ----------------------------------------------------------------------------- extracted token codes
def load_codes(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) written by scripts/extract_codes.py: tokens (M, N) [, tokens_flip], labels (M,)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(
            f"no extracted codes in {folder} (meta.json missing): run scripts/extract_codes.py"
        )
    meta = json.loads((folder / "meta.json").read_text())
    shards = [load_file(str(folder / name)) for name in meta["shards"]]
    return meta, {key: torch.cat([shard[key] for shard in shards]) for key in shards[0]}


class CodeSamples(Dataset):
    """Token sequences with labels; in training, the mirrored image's tokens half of the time.

    Key k (KeySampler's, beyond the length in later epochs) reads sample k % len and flips by rng([seed, k]).
    """

    def __init__(self, codes: dict[str, torch.Tensor], indices: torch.Tensor, train: bool, seed: int = 0):
        self.tokens, self.labels = codes["tokens"][indices], codes["labels"][indices]
        self.flipped = codes["tokens_flip"][indices] if train and "tokens_flip" in codes else None
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int) -> dict:
        index = key % len(self.labels)
        tokens = self.tokens[index]
        if self.flipped is not None and np.random.default_rng([self.seed, key]).random() < 0.5:
            tokens = self.flipped[index]
        return {"tokens": tokens.long(), "label": self.labels[index]}


class CodesDataModule(ResumableData, L.LightningDataModule):
    """Stage-2 data: pre-extracted token shards. Batches {"tokens": (B, N) long, "label": (B,)}.

    The last `val_fraction` of the samples (in extraction order) is held out for the validation loss.
    """

    def __init__(
        self, codes_dir: str, batch_size: int, num_workers: int = 0, seed: int = 0, val_fraction: float = 0.05
    ):
        super().__init__()
        self.codes_dir = codes_dir
        self.meta, codes = load_codes(codes_dir)
        self.num_classes = int(self.meta["num_classes"])
        self.token_spec = self.meta["token_spec"]
        count = len(codes["labels"])
        num_val = max(1, int(count * val_fraction))
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_dataset = CodeSamples(codes, torch.arange(count - num_val), train=True, seed=seed)
        self.val_dataset = CodeSamples(codes, torch.arange(count - num_val, count), train=False)

    def train_dataloader(self) -> DataLoader:
        sampler = KeySampler(len(self.train_dataset), shuffle=True, seed=self.seed)
        sampler = self.resumable_sampler(sampler, self.batch_size)
        return train_loader(self.train_dataset, sampler, self.batch_size, self.num_workers, self.seed)

    def val_dataloader(self) -> DataLoader:
        return val_loader(self.val_dataset, self.batch_size)
