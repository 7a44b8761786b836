"""Frozen teacher networks, for the tokenizers that align to one: FQ's semantic sub-codes (fq.py) and
FlexTok's REPA (flextok.py). One module, so both load, normalise and hold a teacher the same way.

A teacher maps images (B, 3, H, W) in [-1, 1] to features of width `num_features` (D_t):

    teacher(images)                  pooled features (B, D_t)           (FQ's alignment target)
    teacher.patch_features(images)   a feature map (B, D_t, h, w)       (REPA's target, per decoder patch)

Two kinds:
- "photos-net": `PhotosNet`, the project's small classifier of the embedded photos (defined here, trained by
  training/feature_net.py, which also uses it as the offline FID network), loaded from its export folder.
  Pooled = its global-average-pooled features; the map = its activation map whose side equals `grid`
  (the decoder's patch grid), or the deepest one when none does.
- timm: a timm model by name (DINOv2, ...), created with pretrained=False, num_classes=0 and dynamic position
  embeddings, then loaded strictly from a local weights file (.safetensors, .pth, .bin) or a folder holding
  model.safetensors (a Hugging Face timm repository); classifier weights in the file are ignored. Images go
  to [0, 1], are resized (bicubic) to `image_size` and normalised with the model's own mean and std.

Nothing is downloaded: an unset or missing path is a one-line FileNotFoundError naming the config setting.
On the meta device (shape-only instantiation, tests/test_configs.py) the path is checked and no weights
are read. `Frozen` holds a teacher (or FlexTok's VAE) outside the module tree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from core import Exportable, from_pretrained, read_export, register

PHOTOS_NET = "photos-net"
DEFAULT_RESOLUTION = 32


@register(PHOTOS_NET)
class PhotosNet(Exportable, nn.Module):
    """Images (B, 3, H, W), uint8 or float in [-1, 1], any H and W -> (features (B, D), logits (B, C)).

    A stem conv 3 -> widths[0] at the resolution r, then stride-2 convs (r/2, r/4, ...), each followed by
    BatchNorm and SiLU; global average pooling gives the features, dropout and a linear layer the logits.
    Inputs of another size are resized (bilinear, antialiased) to r inside the network.
    """

    def __init__(self, classes: list[str], resolution: int = DEFAULT_RESOLUTION, widths=(32, 64, 128, 256)):
        super().__init__()
        self.report: dict = {}  # how it was trained and how well it does; saved beside the config
        layers, channels = [], 3
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(channels, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.SiLU()]
            channels = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(channels, len(classes))

    @property
    def resolution(self) -> int:
        return self.config["resolution"]

    def export_metadata(self) -> dict:
        return dict(self.report)

    def load_metadata(self, metadata: dict) -> None:
        self.report = dict(metadata)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1
        if images.shape[-2:] != (self.resolution, self.resolution):
            size = (self.resolution, self.resolution)
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        features = self.body(images)  # (B, D)
        return features, self.classifier(self.dropout(features))  # (B, D), (B, C)

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] at the net's resolution r -> every stage's activation map, stage i as
        (B, widths[i], r / 2^i, r / 2^i)."""
        maps, x = [], images
        for layer in self.body:
            if isinstance(layer, nn.AdaptiveAvgPool2d):
                break
            x = layer(x)
            if isinstance(layer, nn.SiLU):
                maps.append(x)
        return maps


class Frozen:
    """A frozen network held outside the module tree: absent from state_dict() and parameters(), shared
    (not copied) by copy.deepcopy (the EMA), moved to the caller's device on first use."""

    def __init__(self, module: nn.Module):
        self.module = module.requires_grad_(False).eval()

    def __deepcopy__(self, memo) -> Frozen:
        return self

    def on(self, device: torch.device) -> nn.Module:
        if next(self.module.parameters()).device != device:
            self.module.to(device)
        return self.module


def required_path(path, setting: str, what: str, fix: str, accept: Callable[[Path], bool]) -> Path:
    """The configured path when `accept(path)`, else a one-line FileNotFoundError naming the setting."""
    if path is not None and accept(Path(path)):
        return Path(path)
    problem = "is not set" if path is None else "does not exist"
    raise FileNotFoundError(f"{what}: {setting}={None if path is None else str(path)!r} {problem} ({fix})")


def weights_file_or_folder(path: Path) -> bool:
    return path.is_file() or (path / "model.safetensors").is_file()


def on_meta() -> bool:
    """True inside `with torch.device("meta")`: modules are built without storage."""
    return torch.empty(0).device.type == "meta"


class PhotosNetTeacher(nn.Module):
    """photos-net as a teacher (module docstring)."""

    def __init__(self, net: PhotosNet, grid: int | None = None):
        super().__init__()
        self.net = net
        widths = list(net.config["widths"])
        sides = [net.resolution >> i for i in range(len(widths))]
        self.stage = sides.index(grid) if grid in sides else len(sides) - 1
        self.num_features = widths[-1]
        self.map_features = widths[self.stage]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[0]  # (B, D_t); the net resizes to its own resolution

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.net.resolution, self.net.resolution)
        if images.shape[-2:] != size:
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        return self.net.feature_maps(images)[self.stage]  # (B, widths[stage], h, w)


class TimmTeacher(nn.Module):
    """A timm model with num_classes=0 as a teacher (module docstring)."""

    def __init__(self, model: nn.Module, image_size: int):
        super().__init__()
        self.model, self.image_size = model, image_size
        cfg = model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))
        self.num_features = getattr(model, "head_hidden_size", None) or model.num_features
        self.map_features = model.num_features

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        x = (images.float() + 1) / 2  # (B, 3, H, W) in [0, 1]
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalise(images))  # (B, D_t)

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(self.normalise(images))[:, self.model.num_prefix_tokens :]
        return rearrange(tokens, "b (h w) d -> b d h w", h=math.isqrt(tokens.shape[1]))  # (B, D_t, h, w)


def load_timm_model(name: str, path: Path, setting: str) -> nn.Module:
    """timm `name` with num_classes=0, weights loaded strictly from `path` (a file or a folder holding
    model.safetensors); on the meta device only the shapes are built."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    if next(model.parameters()).is_meta:
        return model
    file = path / "model.safetensors" if path.is_dir() else path
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    classifier = model.pretrained_cfg.get("classifier")  # removed by num_classes=0
    expected = model.state_dict()
    if classifier:
        state = {k: v for k, v in state.items() if k in expected or not k.startswith(f"{classifier}.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0] if str(error) else "mismatch"
        raise ValueError(f"{setting}={str(path)!r} does not hold timm {name} weights: {first}") from error
    return model


def load_teacher(
    name: str, weights, setting: str, what: str, image_size: int = 224, grid: int | None = None
) -> nn.Module:
    """The frozen teacher `name` ("photos-net" or a timm model name) from `weights`, or a one-line
    FileNotFoundError naming `setting` (`what` says which method needs it)."""
    if name == PHOTOS_NET:
        fix = f"run python scripts/train_feature_net.py, or set {setting} to a photos-net folder"
        folder = required_path(weights, setting, what, fix, Path.is_dir)
        if on_meta():
            meta = read_export(folder)
            return PhotosNetTeacher(
                PhotosNet(**{k: meta[k] for k in ("classes", "resolution", "widths")}), grid
            )
        net = from_pretrained(folder)
        if not isinstance(net, PhotosNet):
            raise ValueError(f"{setting}={str(weights)!r} holds a {net.registry_name!r}, not a {PHOTOS_NET}")
        return PhotosNetTeacher(net, grid)
    fix = f"set {setting} to a local timm {name} weights file or a folder holding model.safetensors"
    path = required_path(weights, setting, what, fix, weights_file_or_folder)
    return TimmTeacher(load_timm_model(name, path, setting), image_size)
