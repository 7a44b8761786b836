"""photos-net: a small CNN that tells the embedded photos apart, used as the FID / IS feature network offline.

Why it exists: FID needs a feature network, and the standard one (Inception) is a weights file the user must
supply, since nothing downloads at run time. Without that file, evaluation on the embedded photos uses this
network instead. It is trained here on PhotosDataModule training crops to classify the 17 source photos;
its pooled features feed FID and precision/recall, its logits feed IS, and its predictions give the
conditional accuracy of class-conditional samples. Its numbers are only comparable with numbers from the
same weights, so every report names the extractor (`fid[photos-net]`) and reference-statistics caches
carry a fingerprint of the weights (training/metrics.py).

Architecture: a stem conv 3->32 at the training resolution r, then three stride-2 convs 32->64->128->256
(r/2, r/4, r/8), each conv followed by BatchNorm and SiLU; global average pooling gives "features" (256-d,
what FID and precision/recall compare), then dropout and a linear layer give "logits" (one per photo, what
IS and conditional accuracy use). BatchNorm rather than GroupNorm: it generalised better from the training
region of each photo to its held-out strip, and in eval mode it is a fixed affine map, so a sample's
features never depend on its batch. Inputs of any size are resized (bilinear, antialiased) to r inside the
network, so one net measures images of every resolution.

Training (`train_feature_net`): crops are drawn once into a pool (making a crop costs more than a network
step on a CPU) from ids 0..pool_size-1 of the training split, which already varies scale and flip; each
step adds a random shift of up to r/8 pixels (reflect padding). AdamW, one-cycle schedule, label smoothing
0.1. Accuracy is measured on 544 validation crops from the held-out strip of each photo. At r = 32 the
defaults reach 0.884 (seed 0) in about 50 s on 2 idle CPU cores (1.5 min with one thread on busy ones; on
cores shared with other jobs, `torch.set_num_threads(1)` beats 2 threads that wait on each other). The
ceiling is about 0.94: motorcycle_left and motorcycle_right are a stereo pair whose crops near-coincide.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from tqdm import tqdm

from core import from_pretrained
from tokenizers_vis.teachers import DEFAULT_RESOLUTION, PHOTOS_NET, PhotosNet
from training.data import PhotosDataModule

NAME = PHOTOS_NET
FEATURE_NET_ROOT = Path("runs/feature_net")


class PhotosNetExtractor(FeatureExtractorBase):
    """torch-fidelity's view of photos-net: uint8 (B, 3, H, W) -> the requested ("features", "logits").

    `feature_extractor_weights_path` is the photos-net folder (config.json + model.safetensors); there is no
    download fallback.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)  # kwargs: every other calculate_metrics option, unused here
        if feature_extractor_weights_path is None:
            raise FileNotFoundError(
                f"{NAME} needs feature_extractor_weights_path=<folder from ensure_feature_net()>; "
                "it is trained locally, never downloaded"
            )
        self.net = load_feature_net(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"{NAME} expects uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        features, logits = self.net(images)
        named = {"features": features, "logits": logits}
        return tuple(named[name] for name in self.features_list)


if NAME not in FEATURE_EXTRACTORS_REGISTRY:  # torch-fidelity refuses a second registration (module reloads)
    register_feature_extractor(NAME, PhotosNetExtractor)


# ----------------------------------------------------------------------------- files
def data_digest(data: dict | None) -> str | None:
    """A short name for a non-default training dataset (None: the embedded photos)."""
    if data is None or data.get("_target_", "").endswith("PhotosDataModule"):
        return None
    settings = {k: v for k, v in data.items() if k not in ("batch_size", "num_workers", "resolution")}
    module = data["_target_"].rsplit(".", 1)[-1].removesuffix("DataModule").lower()
    return f"{module}-{hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]}"


def feature_net_path(
    resolution: int = DEFAULT_RESOLUTION, root: str | Path = FEATURE_NET_ROOT, data: dict | None = None
) -> Path:
    """Where the net for `resolution` lives: <root>/photos-net-<resolution> for the embedded photos,
    <root>/photos-net-<resolution>-<data module>-<digest of its settings> for another dataset."""
    digest = data_digest(data)
    return Path(root) / (f"{NAME}-{resolution}" + (f"-{digest}" if digest else ""))


def load_feature_net(path: str | Path, device: str | torch.device = "cpu") -> PhotosNet:
    """A saved photos-net folder -> PhotosNet in eval mode (strict key check, no unpickling)."""
    folder = Path(path)
    config_file, weights_file = folder / "config.json", folder / "model.safetensors"
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"no {NAME} at {folder}: {file.name} is missing "
                "(python scripts/train_feature_net.py trains one)"
            )
    net = from_pretrained(folder, device=device)
    if not isinstance(net, PhotosNet):
        raise ValueError(f"{config_file} holds a {net.registry_name!r}, not a {NAME}")
    return net


def write_folder_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """write(folder) fills a fresh folder beside `path`, which then replaces `path` in one rename, so an
    interrupted run never leaves a half-written model for the next call to trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    write(staging)
    if path.exists():
        shutil.rmtree(path)
    staging.rename(path)


def ensure_feature_net(
    resolution: int = DEFAULT_RESOLUTION,
    root: str | Path = FEATURE_NET_ROOT,
    force: bool = False,
    progress: bool = True,
    data: dict | None = None,
    **train_kwargs,
) -> Path:
    """The photos-net folder for `resolution` under `root`, trained first when missing (or when `force`),
    on `data` (a data module config: its training split and classes; None: the embedded photos).

    The folder appears atomically (`write_folder_atomically`). `train_kwargs` go to `train_feature_net`.
    """
    path = feature_net_path(resolution, root, data)
    if path.is_dir() and not force:
        return path
    net = train_feature_net(resolution, progress=progress, data=data, **train_kwargs)
    write_folder_atomically(path, net.save_pretrained)
    if progress:
        report = net.report
        print(
            f"trained {path.name} in {report['train_seconds']}s: validation accuracy "
            f"{report['val_accuracy']:.3f} on {report['val_samples']} held-out crops"
        )
    return path


# ----------------------------------------------------------------------------- training
def stack_crops(dataset, count: int, desc: str, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Items 0..count-1 of a dataset (keys past its end: fresh training views) -> images (N, 3, r, r) in
    [-1, 1], labels (N,); unreadable files (None items) are left out."""
    items = [
        dataset[i] for i in tqdm(range(count), desc=desc, unit="crop", disable=not progress, leave=False)
    ]
    items = [item for item in items if item is not None]
    return torch.stack([item["image"] for item in items]), torch.tensor([item["label"] for item in items])


def _random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """The same random translation of up to `shift` pixels for the whole batch (reflect padding)."""
    size = images.shape[-1]
    top, left = torch.randint(2 * shift + 1, (2,), generator=generator).tolist()
    padded = F.pad(images, (shift,) * 4, mode="reflect")  # (B, 3, r + 2s, r + 2s)
    return padded[..., top : top + size, left : left + size]


@torch.no_grad()
def accuracy(net: PhotosNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Share of `images` (N, 3, H, W) that `net` (switched to eval mode) assigns to their `labels` (N,)."""
    net.eval()
    device = next(net.parameters()).device
    hits = 0
    for start in range(0, len(images), batch_size):
        logits = net(images[start : start + batch_size].to(device))[1]  # (b, C)
        hits += (logits.argmax(1).cpu() == labels[start : start + batch_size]).sum().item()
    return hits / len(images)


def train_feature_net(
    resolution: int = DEFAULT_RESOLUTION,
    steps: int = 800,
    batch_size: int = 64,
    pool_size: int = 8192,
    val_per_class: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    data: dict | None = None,
) -> PhotosNet:
    """Train a photos-net on the training crops of `data` (a data module config, e.g. a class folder; None:
    the embedded photos) to classify its classes; `net.report` holds its validation accuracy."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    source = (data_digest(data) if data is not None else None) or "photos"
    if source == "photos":  # the embedded photos: always the same recipe, whatever the data config says
        data = None
    if data is None:
        data = PhotosDataModule(resolution, batch_size, seed=seed, val_per_class=val_per_class)
    else:
        settings = {**data, "resolution": resolution, "batch_size": batch_size, "num_workers": 0}
        data = instantiate(settings)
    images, labels = stack_crops(data.train_dataset, pool_size, "photos-net training crops", progress)
    val_images, val_labels = stack_crops(
        data.val_dataset, len(data.val_dataset), "validation crops", progress
    )

    net = PhotosNet(data.class_names, resolution)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    bar = tqdm(range(steps), desc=f"training {NAME}-{resolution}", unit="step", disable=not progress)
    for _ in bar:
        index = torch.randint(len(images), (batch_size,), generator=generator)  # unreadable files left out
        batch = _random_shift(images[index], resolution // 8, generator)  # (B, 3, r, r)
        loss = F.cross_entropy(net(batch)[1], labels[index], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)

    net.report = dict(
        data=source,
        val_accuracy=accuracy(net, val_images, val_labels),
        val_samples=len(val_images),
        steps=steps,
        batch_size=batch_size,
        pool_size=pool_size,
        seed=seed,
        train_seconds=round(time.perf_counter() - start, 1),
    )
    return net.eval()
