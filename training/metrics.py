"""Image metrics: PSNR and SSIM of reconstructions; FID, IS and precision/recall through torch-fidelity.

The FID family runs with one of two feature extractors:

- "inception": torch-fidelity's `inception-v3-compat`, the standard numbers, with weights from the file that
  `paths.inception_weights` names. Never downloaded: a missing file is a FileNotFoundError naming the setting.
- "photos-net": the small classifier of the embedded photos (training/feature_net.py), for offline runs.

Every key names its extractor (`fid[photos-net]`, `is[inception]`): the two scales have nothing in common.
FID's reference is a second set of images, or precomputed statistics (`reference_statistics`: the `mu` and
`sigma` of an npz such as ADM's reference batches, read without unpickling).
Reference features are cached under `cache_root` as safetensors (`<name>-<weights fingerprint>.safetensors`),
keyed by a name the caller chooses plus a fingerprint of the extractor's weights, so a retrained photos-net
never reuses stale features. torch-fidelity's own cache is never used: it unpickles its files
(`torch.load(weights_only=False)`), so a crafted file in the cache folder would run code.

Small sample counts: IS uses the protocol's 10 splits only while every split keeps at least 100 samples, else
max(1, N // 100) splits; precision/recall use k = 3 neighbours and need more than 3 samples on each side,
else they are skipped with a warning; FID needs at least 2 samples per side. Numbers from a few hundred
samples are biased (FID upwards): compare them only with numbers at the same sample count.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from torch_fidelity import utils as fidelity_utils
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.utils import glob_samples_paths
from torchmetrics.functional.image import structural_similarity_index_measure

from tokenizers_vis.adaptive import psnr  # noqa: F401  (one PSNR for validation, evaluation and adaptive length)
from training.data import to_uint8
from training.feature_net import NAME as PHOTOS_NET
from training.feature_net import PhotosNet, accuracy, ensure_feature_net, load_feature_net

EXTRACTORS = ("inception", PHOTOS_NET)
INCEPTION_FEATURES = 2048  # inception-v3-compat's FID layer: the pool3 features of ADM's reference statistics
FIDELITY_CACHE = Path("runs/.fidelity_cache")
PRC_NEIGHBOURS = 3  # k of precision/recall (Kynkaanniemi et al. 2019), as in the evaluation protocol
_FIDELITY_NAMES = {"inception": "inception-v3-compat", PHOTOS_NET: PHOTOS_NET}
_KEYS = {  # our key -> torch-fidelity's
    "fid": torch_fidelity.KEY_METRIC_FID,
    "is": torch_fidelity.KEY_METRIC_ISC_MEAN,
    "is_std": torch_fidelity.KEY_METRIC_ISC_STD,
    "precision": torch_fidelity.KEY_METRIC_PRECISION,
    "recall": torch_fidelity.KEY_METRIC_RECALL,
}


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (a decoder may overshoot)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def ssim(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5) for images in [-1, 1]: -> (B,)"""
    size = min(images.shape[-2:])
    kernel = min(11, size - (1 - size % 2))  # the window must fit small crops and be odd
    return structural_similarity_index_measure(
        to_unit(reconstructions), to_unit(images), data_range=1.0, kernel_size=kernel, reduction="none"
    )


# ----------------------------------------------------------------------------- inputs
def uint8_images(images: torch.Tensor) -> torch.Tensor:
    """Float (..., 3, H, W) in [-1, 1] -> uint8 (..., 3, H, W), quantised as PNG files are (data.to_uint8)."""
    return torch.from_numpy(to_uint8(images)).movedim(-1, -3)


class FidelityImages(Dataset):
    """Images as torch-fidelity reads them: item i -> uint8 (3, H, W).

    `source` is a uint8 tensor (N, 3, H, W), a float tensor (N, 3, H, W) in [-1, 1], a uint8 array
    (N, H, W, 3) (the samples.npz layout), or a dataset of {"image": float (3, H, W)} items such as the data
    modules' (read at keys 0..length-1; PhotoCrops accepts any key, so `length` may exceed its epoch).
    Conversion happens on access, so a reference whose statistics are already cached is never generated.
    """

    def __init__(self, source, length: int | None = None):
        if isinstance(source, np.ndarray):
            if source.dtype != np.uint8 or source.ndim != 4 or source.shape[-1] != 3:
                raise ValueError(f"expected a uint8 array (N, H, W, 3), got {source.dtype} {source.shape}")
            source = torch.from_numpy(source).permute(0, 3, 1, 2)  # (N, 3, H, W)
        self.source = source
        self.length = len(source) if length is None else length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.length:  # datasets without an end (PhotoCrops) must not iterate forever
            raise IndexError(index)
        item, key = self.source[index], index
        while item is None:  # an unreadable file of a dataset: a reference set takes the next readable one
            key += 1
            if key - index > len(self.source):
                raise ValueError("no readable image in the reference dataset")
            item = self.source[key]
        image = item["image"] if isinstance(item, dict) else item  # (3, H, W)
        return image if image.dtype == torch.uint8 else uint8_images(image)


def _fidelity_input(source):
    """A folder path stays a path (torch-fidelity reads its PNG/JPEG files); arrays become FidelityImages."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (torch.Tensor, np.ndarray)):
        return FidelityImages(source)
    return source


def image_files(folder: str | Path) -> list[str]:
    """The files torch-fidelity reads from an image folder: PNG / JPEG, sorted, not recursive."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"no image folder at {folder}")
    return glob_samples_paths(str(folder), False, DEFAULTS["samples_find_ext"], verbose=False)


def count_images(source) -> int:
    """Number of images in a folder (see image_files), tensor, array or dataset."""
    return len(image_files(source)) if isinstance(source, (str, Path)) else len(source)


# ----------------------------------------------------------------------------- extractor weights
def inception_weights(path: str | Path | None) -> Path:
    """The Inception weights file of `paths.inception_weights`, checked to be a plain tensor state dict.

    torch-fidelity unpickles the file with weights_only=False; loading it once with weights_only=True first
    refuses a file that would run code, in line with the project's checkpoint convention.
    """
    if path is None or not Path(path).is_file():
        problem = "is not set" if path is None else "does not exist"
        raise FileNotFoundError(
            f"Inception weights for FID: paths.inception_weights={None if path is None else str(path)!r} "
            f"{problem} (set it to torch-fidelity's weights-inception-2015-12-05-6726825d.pth, "
            f"or use extractor={PHOTOS_NET})"
        )
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"paths.inception_weights={str(path)!r} is not a plain state dict: {error}"
        ) from None
    return Path(path)


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 prefix of a file; size and mtime are part of the key so an edited file is hashed again."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def feature_dimension(extractor: str, weights: str | Path) -> int:
    """Size of the features FID compares: 2048 for Inception, the pooled width of a photos-net."""
    if extractor == "inception":
        return INCEPTION_FEATURES
    return load_feature_net(weights).classifier.in_features


def reference_statistics(path: str | Path, dimension: int | None = None) -> dict[str, np.ndarray]:
    """{"mu": (D,), "sigma": (D, D)} float64 from an npz holding `mu` and `sigma` (ADM's reference batches,
    e.g. VIRTUAL_imagenet256_labeled.npz; their other arrays are not read), checked against the extractor's
    feature `dimension` when given. Never unpickles: object arrays are refused."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key].astype(np.float64) for key in ("mu", "sigma") if key in npz.files}
            keys = npz.files
    except (OSError, EOFError, TypeError, ValueError, zipfile.BadZipFile) as error:  # not a zip, pickled
        raise ValueError(f"reference_stats={path} is not a readable .npz of arrays ({error})") from None
    if len(arrays) < 2:
        raise ValueError(
            f"reference_stats={path} has no mu and sigma (keys: {', '.join(keys)}); expected FID statistics "
            "such as ADM's reference batches hold"
        )
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(
            f"reference_stats={path}: mu {mu.shape} and sigma {sigma.shape} must be (D,), (D, D)"
        )
    if dimension is not None and len(mu) != dimension:
        hint = " (Inception's: extractor=inception)" if len(mu) == INCEPTION_FEATURES else ""
        raise ValueError(
            f"reference_stats={path} holds statistics of {len(mu)}-d features{hint}, but the extractor's "
            f"features are {dimension}-d"
        )
    return {"mu": mu, "sigma": sigma}


def weights_fingerprint(path: str | Path) -> str:
    """Short content hash of a weights file, or of a model folder's model.safetensors."""
    file = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
    stat = file.stat()
    return _file_digest(str(file.resolve()), stat.st_size, stat.st_mtime_ns)


# ----------------------------------------------------------------------------- metrics
def isc_splits(num_samples: int) -> int:
    """IS splits: the protocol's 10 while each split keeps >= 100 samples, else fewer (at least 1)."""
    return max(1, min(10, num_samples // 100))


def image_metrics(
    input1,
    input2=None,
    extractor: str = PHOTOS_NET,
    weights: str | Path | None = None,
    fid: bool = True,
    isc: bool = True,
    prc: bool = True,
    cache_name: str | None = None,
    reference_stats: dict[str, np.ndarray] | None = None,
    cache_root: str | Path = FIDELITY_CACHE,
    batch_size: int = 64,
    device: str | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """FID, IS and precision/recall (k = 3) of `input1` (generated or reconstructed) against `input2` (real).

    Inputs: an image folder, a dataset yielding uint8 (3, H, W), or a tensor / array (see FidelityImages).
    FID and precision/recall need `input2` and are skipped without it; IS is measured on `input1`.
    reference_stats (instead of input2): {"mu", "sigma"} from reference_statistics(), checked against the
    extractor's feature dimension there: FID against them; precision/recall, which need images, are skipped.
    extractor: "photos-net" (weights = its folder, default: ensure_feature_net()) or "inception" (weights =
    the file of paths.inception_weights). cache_name: names input2 in torch-fidelity's cache (the weights'
    fingerprint is appended), so a fixed reference set is featurised once; leave None for anything that
    changes. Returns {"fid[<extractor>]", "is[...]", "is_std[...]", "precision[...]", "recall[...]"}.
    """
    if extractor not in EXTRACTORS:
        raise ValueError(f"extractor={extractor!r}; expected one of {EXTRACTORS}")
    if input2 is not None and reference_stats is not None:
        raise ValueError("FID against input2 or against reference_stats: pass one of them")
    if extractor == "inception":
        weights = inception_weights(weights)
    elif weights is None:
        weights = ensure_feature_net()
    num1 = count_images(input1)
    num2 = None if input2 is None else count_images(input2)
    for name, count in (("input1", num1), ("input2", num2)):
        if count is not None and count < 2:
            raise ValueError(f"{name} has {count} images; FID-family metrics need at least 2")
    fid, prc = fid and (input2 is not None or reference_stats is not None), prc and input2 is not None
    if prc and min(num1, num2) <= PRC_NEIGHBOURS:
        warnings.warn(
            f"precision/recall skipped: k={PRC_NEIGHBOURS} needs more than {PRC_NEIGHBOURS} images per side "
            f"(got {num1} and {num2})",
            stacklevel=2,
        )
        prc = False
    if not (fid or isc or prc):
        raise ValueError("nothing to measure: ask for isc, or pass input2 for fid / precision-recall")
    cuda = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
    options = dict(
        input1=_fidelity_input(input1),
        input2=None if input2 is None else _fidelity_input(input2),
        feature_extractor=_FIDELITY_NAMES[extractor],
        feature_extractor_weights_path=str(weights),
        isc_splits=isc_splits(num1),
        prc_neighborhood=PRC_NEIGHBOURS,
        cache=False,
        cuda=cuda,
        batch_size=batch_size,
        save_cpu_ram=not cuda,  # on a CPU, dataloader worker processes only compete for the same cores
        verbose=verbose,
    )
    layers = {
        metric: fidelity_utils.resolve_feature_layer_for_metric(metric, **options)
        for metric, wanted in (("isc", isc), ("fid", fid), ("prc", prc))
        if wanted
    }
    feature_net = fidelity_utils.create_feature_extractor(
        _FIDELITY_NAMES[extractor], sorted(set(layers.values())), **options
    )
    features1 = fidelity_utils.extract_featuresdict_from_input_id(1, feature_net, **options)
    features2 = None
    if input2 is not None and (fid or prc):
        cache_file = None
        if cache_name is not None:
            cache_file = Path(cache_root) / f"{cache_name}-{weights_fingerprint(weights)}.safetensors"
        features2 = reference_features(cache_file, sorted(set(layers.values())), feature_net, options)
    results = {}
    if isc:
        results.update(isc_featuresdict_to_metric(features1, layers["isc"], **options))
    if fid:
        reference = reference_stats or fid_featuresdict_to_statistics(features2, layers["fid"])
        statistics = [fid_featuresdict_to_statistics(features1, layers["fid"]), reference]
        statistics = [{key: stat[key].astype(np.float64) for key in ("mu", "sigma")} for stat in statistics]
        results.update(fid_statistics_to_metric(*statistics, verbose))
    if prc:
        results.update(prc_featuresdict_to_metric(features1, features2, layers["prc"], **options))
    return {f"{key}[{extractor}]": float(results[name]) for key, name in _KEYS.items() if name in results}


def reference_features(cache_file: Path | None, layers: list[str], feature_net, options: dict) -> dict:
    """input2's features per layer: read from `cache_file` (safetensors: tensors only, nothing executes)
    when it holds every layer, else extracted and written there."""
    if cache_file is not None and cache_file.is_file():
        try:
            cached = load_file(str(cache_file))
        except Exception as error:  # a truncated or foreign file: recompute rather than fail
            warnings.warn(f"ignoring unreadable feature cache {cache_file}: {error}", stacklevel=2)
        else:
            if set(layers) <= cached.keys():
                return {layer: cached[layer] for layer in layers}
    features = fidelity_utils.extract_featuresdict_from_input_id(2, feature_net, **options)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_name(cache_file.name + ".tmp")
        save_file({layer: features[layer].contiguous() for layer in layers}, str(temporary))
        temporary.replace(cache_file)
    return features


def conditional_accuracy(
    images: torch.Tensor, labels, feature_net: PhotosNet, batch_size: int = 256
) -> float:
    """Share of class-conditional samples that `feature_net` classifies as their conditioning class.

    images: (N, 3, H, W), uint8 or float in [-1, 1], any size (the net resizes); labels: (N,) class ids in the
    net's class order (the photos data's). 1/17 is chance on the embedded photos; real validation crops
    score the net's own held-out accuracy, the ceiling for samples.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if images.dim() != 4 or images.shape[1] != 3 or labels.shape != (len(images),):
        raise ValueError(
            f"expected images (N, 3, H, W) and labels (N,), got {tuple(images.shape)}, {tuple(labels.shape)}"
        )
    return accuracy(feature_net, images, labels, batch_size)
