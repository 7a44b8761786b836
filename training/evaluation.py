"""Measure images: rFID and pFID of a tokenizer, gFID of samples, FID between two folders; plus IS, P/R.

    evaluate("rfid", tokenizer_path="runs/titok_quickstart/export")            # -> the metrics dict
    evaluate("gfid", samples="runs/gpt_quickstart/samples/cfg2.0/samples.npz", extractor="photos-net")
    evaluate("gfid", samples="adm50k/samples.npz", reference_stats="VIRTUAL_imagenet256_labeled.npz",
             paths={"inception_weights": "weights-inception-2015-12-05-6726825d.pth"})
    run(cfg)                                                    # cfg: a composed configs/evaluate.yaml

`evaluate(mode, **settings)` takes the keys of configs/evaluate.yaml as keyword arguments (config groups as a
preset name or a dict: `data={"val_per_class": 2}`, `reference="adm_imagenet256"`; training/config_files.py)
and needs no Hydra runtime; scripts/evaluate.py is its command line. Both check every setting and input file
(training/validation.py) before anything is computed, write the JSON and print a table.

- rfid: reconstructs the validation crops of the data config at the tokenizer's resolution and compares
  the reconstructions with the originals: FID, IS, precision/recall, PSNR, SSIM, and LPIPS when
  `paths.vgg_weights` names a local torchvision VGG16 state dict (tokenizers_vis.losses.PerceptualLoss, the
  training loss's network): `lpips[vgg]` with LPIPS's calibrated linear layers (`paths.lpips_weights`),
  `lpips[vgg-baseline]` without them (every channel weighted 1: LPIPS's uncalibrated baseline, a few times
  larger). Unset, the column is left out and the report says so; weights are never downloaded. Both image
  sets are held in memory as uint8 (2 x N x 3 x H x W bytes).
  With `target_psnr` set (prefix tokenizers: One-D-Piece, FlexTok), each crop is encoded to the shortest
  prefix whose reconstruction reaches that PSNR (tokenizers_vis.shortest_prefix), decoded from it, and the
  JSON adds `mean_tokens` (the tokens spent per image) beside `num_tokens` (N).
- pfid (RobustTok, "Robust Latent Matters", Qiu et al. 2025): rfid's code path, but every image's codes are
  perturbed before decoding (tokenizers_vis/perturb.py with beta = 1: each token, with probability
  `pfid_alpha`, becomes a code drawn uniformly among its `pfid_delta` nearest, itself included), seeded by
  `seed`, so the number is reproducible. The paper never published its pFID settings; ours (alpha 1.0,
  delta 100) are stored with every number (`pfid_alpha`, `pfid_delta`, and the measured `pfid_replaced`),
  and the FID key is `pfid[<extractor>]`. pfid with pfid_alpha=0 is exactly rfid's FID. Alpha 1.0 is
  calibrated: it puts an unperturbed tokenizer's pFID as far above its rFID as the paper reports for its
  VQ-4096 (6.98 against 0.91; titok_quickstart: 15.0 against 8.1 over three seeds); at alpha 0.1 the two
  barely differ (8.3 against 8.1) and cannot tell a robust decoder from another.
- gfid: samples (a folder of PNGs, or an .npz with uint8 `arr_0` (N, H, W, 3) and optional `labels`, as
  scripts/sample.py and ADM's samplers write them; `images` of older files is read too) against
  `reference_samples` training crops of the data config at the samples' resolution, whose statistics are
  cached (per data settings, resolution, count and seed). With labels and the embedded photos, also the
  conditional accuracy: the share of samples photos-net assigns to their class.
  With `reference_stats=<file.npz>` the reference is instead the `mu` / `sigma` in that file (ADM's
  reference batches, e.g. VIRTUAL_imagenet256_labeled.npz; read without unpickling, their dimension checked
  against the extractor's features): FID and IS only (precision/recall need reference images), and
  `extractor=auto` means Inception. The data config is then not read.
- floor: gfid of the tokenizer's own reconstructions of `floor_samples` training crops (the crops after the
  reference's, so none is in the reference) against gfid's reference: the best gFID a generator of these
  tokens can reach, and with it the conditional accuracy of real crops. A generator at this floor is
  limited by its tokenizer, not by its own training.
- folders: input1 against input2, nothing cached (folders change).

Features: `extractor=auto` uses Inception when `paths.inception_weights` (or `reference_stats`) is set, else
photos-net (trained on first use, see scripts/train_feature_net.py). Every metric key names its extractor
(`fid[photos-net]`), and the JSON (`out`, default beside the input) records the extractor, its weights, the
sample count and the reference set: a number without them means nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from tqdm import tqdm

from core import Tokens, from_pretrained
from tokenizers_vis.adaptive import decode_lengths, shortest_prefix
from tokenizers_vis.losses import PerceptualLoss
from tokenizers_vis.perturb import LatentPerturbation
from training.config import ConfigError, compose_config
from training.config_files import load_config
from training.feature_net import NAME as PHOTOS_NET
from training.feature_net import ensure_feature_net, load_feature_net
from training.metrics import (
    FidelityImages,
    conditional_accuracy,
    count_images,
    feature_dimension,
    image_files,
    image_metrics,
    inception_weights,
    isc_splits,
    psnr,
    reference_statistics,
    ssim,
    uint8_images,
)
from training.validation import check_evaluate, samples_npz_keys

REQUIRED = {  # mode -> the settings it cannot run without
    "rfid": ("tokenizer_path",),
    "pfid": ("tokenizer_path",),
    "gfid": ("samples",),
    "floor": ("tokenizer_path",),
    "folders": ("input1", "input2"),
}


def evaluate(mode: str, **settings) -> dict:
    """Evaluate without Hydra: configs/evaluate.yaml with `mode` and `settings` (its keys, see the module
    docstring) -> what the JSON holds. Bad settings raise ConfigError, missing files FileNotFoundError."""
    return run(load_config("evaluate", {"mode": mode, **settings}))


def resolve_extractor(cfg: DictConfig) -> tuple[str, Path]:
    """(extractor, weights), checked before any image is made. auto: Inception iff its weights are set, or
    reference statistics are (ADM's are Inception's)."""
    extractor = cfg.extractor
    if extractor == "auto":
        extractor = "inception" if cfg.paths.inception_weights or cfg.reference_stats else PHOTOS_NET
    if extractor == "inception":
        return extractor, inception_weights(cfg.paths.inception_weights)
    if extractor == PHOTOS_NET:  # trained on the reference dataset, on first use
        data = OmegaConf.to_container(cfg.data, resolve=True) if cfg.mode != "folders" else None
        return extractor, ensure_feature_net(cfg.feature_net.resolution, cfg.feature_net.root, data=data)
    raise ConfigError(f"extractor={extractor!r}; choose auto, inception or {PHOTOS_NET}")


def recorded_tokenizer(cfg: DictConfig) -> Path | None:
    """The tokenizer whose dataset is the reference: tokenizer_path, or for gfid the one sample.py recorded
    in the samples' settings.json."""
    if cfg.mode in ("rfid", "pfid", "floor"):
        return Path(str(cfg.tokenizer_path))
    record = Path(str(cfg.samples)).parent / "settings.json"
    if Path(str(cfg.samples)).is_dir():
        record = Path(str(cfg.samples)) / "settings.json"
    if record.is_file():
        return Path(json.loads(record.read_text())["tokenizer_path"]["path"])
    return None


def use_recorded_data(cfg: DictConfig) -> None:
    """reference_data=recorded: cfg.data becomes the dataset the tokenizer was trained on (its export's
    data.json, written by train.py), so a model is measured against its own data, never silently against
    the embedded photos. reference_data=config keeps `data=` as given; folders and reference_stats read no
    data."""
    if cfg.mode == "folders" or cfg.reference_data == "config" or cfg.reference_stats:
        return
    tokenizer = recorded_tokenizer(cfg)
    record = None if tokenizer is None else tokenizer / "data.json"
    if record is None or not record.is_file():
        where = (
            f"{tokenizer}/data.json"
            if tokenizer is not None
            else f"a settings.json beside samples={cfg.samples}"
        )
        raise ConfigError(
            f"reference_data=recorded, but there is no {where} to say which dataset the model was trained "
            "on: pass reference_data=config and data=<that dataset> (data=photos for the embedded photos)"
        )
    with open_dict(cfg):
        cfg.data = OmegaConf.create(json.loads(record.read_text()))


def gfid_config(tokenizer_path, overrides: list[str]) -> DictConfig:
    """configs/evaluate.yaml for mode=gfid with command-line `overrides`, its reference the dataset the
    tokenizer at `tokenizer_path` was trained on (its export's data.json) unless reference_data=config:
    what the benchmarks measure samples of that tokenizer's tokens against."""
    cfg = compose_config(["mode=gfid", *overrides], "evaluate")
    record = Path(tokenizer_path) / "data.json"
    if record.is_file() and cfg.reference_data == "recorded":
        with open_dict(cfg):
            cfg.data = OmegaConf.create(json.loads(record.read_text()))
    return cfg


def data_name(cfg: DictConfig, split: str, resolution: int, count: int) -> str:
    """Cache name of a reference set: data module, split, size, count, digest of the other data settings."""
    settings = OmegaConf.to_container(cfg.data, resolve=True)
    for key in ("batch_size", "num_workers", "resolution"):  # no effect on the images
        settings.pop(key, None)
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    module = settings["_target_"].rsplit(".", 1)[-1]
    return f"{module}-{split}-{resolution}px-n{count}-{digest}"


def perturbed_reconstruction(
    tokenizer, perturbation: LatentPerturbation, seed: int, device: str, record: dict
):
    """images -> decode(perturbed encode(images)), drawing from a generator seeded with `seed`; `record`
    accumulates the replaced and total token counts."""
    name = type(tokenizer).__name__
    if tokenizer.token_spec.kind != "categorical":
        raise ConfigError(f"mode=pfid needs a tokenizer with categorical codes; {name} has another kind")
    try:
        vectors = tokenizer.code_vectors().detach()  # (V, D)
    except NotImplementedError as error:
        raise ConfigError(f"mode=pfid needs code_vectors(): {error}") from error
    generator = torch.Generator(device=device).manual_seed(seed)
    record.update(replaced=0, tokens=0)

    @torch.no_grad()
    def reconstruct(images: torch.Tensor) -> torch.Tensor:
        tokens = tokenizer.encode(images)
        result = perturbation.perturb_codes(tokens.data, vectors.to(tokens.data.device), generator=generator)
        record["replaced"] += int(result.replaced.sum())
        record["tokens"] += result.replaced.numel()
        return tokenizer.decode(Tokens(tokens.kind, result.codes, tokens.lengths, tokens.grid))

    return reconstruct


def adaptive_reconstruction(tokenizer, target_psnr: float, lengths: list) -> Callable:
    """images -> reconstructions from each image's shortest prefix reaching target_psnr; appends the
    prefix lengths (B,) to `lengths`."""

    def reconstruct(images: torch.Tensor) -> torch.Tensor:
        tokens = shortest_prefix(tokenizer, images, target_psnr=target_psnr)
        lengths.append(tokens.lengths.cpu())
        return decode_lengths(tokenizer, tokens)

    return reconstruct


def lpips_network(paths: DictConfig, device: str) -> tuple[str, PerceptualLoss] | None:
    """(column, LPIPS network) from paths.vgg_weights (+ paths.lpips_weights), or None when vgg_weights is
    unset: the lpips column needs local weights, never downloaded, never random."""
    if paths.get("vgg_weights") is None:
        return None
    linear = paths.get("lpips_weights")
    column = "lpips[vgg]" if linear is not None else "lpips[vgg-baseline]"
    return column, PerceptualLoss(paths.vgg_weights, linear).to(device)


@torch.no_grad()
def evaluate_rfid(
    cfg: DictConfig,
    extractor: str,
    weights: Path,
    device: str,
    perturbation: LatentPerturbation | None = None,
) -> dict:
    """Reconstructions of the validation crops vs the originals: FID family + PSNR + SSIM (+ LPIPS). With
    `perturbation` (mode=pfid) the reconstructions are decoded from perturbed codes."""
    tokenizer = from_pretrained(cfg.tokenizer_path, device)
    record: dict = {}
    reconstruct = tokenizer.reconstruct
    if perturbation is not None:
        reconstruct = perturbed_reconstruction(tokenizer, perturbation, cfg.seed, device, record)
    lengths: list[torch.Tensor] = []
    if cfg.get("target_psnr") is not None:
        if perturbation is not None:
            raise ConfigError("target_psnr is for mode=rfid; pfid always decodes all the tokens")
        reconstruct = adaptive_reconstruction(tokenizer, float(cfg.target_psnr), lengths)
    lpips = lpips_network(cfg.paths, device)
    resolution = tokenizer.config.get("image_size", cfg.data.resolution)
    data = instantiate(cfg.data, resolution=resolution)
    originals, reconstructions, psnrs, ssims, lpips_sum = [], [], [], [], 0.0
    for batch in tqdm(data.val_dataloader(), desc="reconstructing", unit="batch"):
        images = batch["image"].to(device)  # (B, 3, H, W) in [-1, 1]
        recon = reconstruct(images).float().clamp(-1, 1)
        psnrs.append(psnr(recon, images).cpu())
        ssims.append(ssim(recon, images).cpu())
        if lpips is not None:
            lpips_sum += lpips[1](recon, images).item() * len(images)  # the network averages its batch
        originals.append(uint8_images(images))
        reconstructions.append(uint8_images(recon))
    if not originals:
        raise ConfigError(f"the data config ({cfg.data._target_}) has no validation images to reconstruct")
    originals, reconstructions = torch.cat(originals), torch.cat(reconstructions)  # uint8 (N, 3, H, W)
    count = len(originals)
    metrics = image_metrics(
        reconstructions,
        originals,
        extractor,
        weights,
        cache_name=data_name(cfg, "val", resolution, count),
        **fidelity_settings(cfg, device),
    )
    if record:
        metrics["replaced"] = record["replaced"] / max(1, record["tokens"])
    if lengths:
        metrics["target_psnr"] = float(cfg.target_psnr)
        metrics["mean_tokens"] = torch.cat(lengths).float().mean().item()
        metrics["num_tokens"] = tokenizer.token_spec.num_tokens
    metrics["psnr"] = torch.cat(psnrs).mean().item()
    metrics["ssim"] = torch.cat(ssims).mean().item()
    if lpips is not None:
        metrics[lpips[0]] = lpips_sum / count
        metrics["lpips_weights"] = {"vgg": str(cfg.paths.vgg_weights), "linear": cfg.paths.lpips_weights}
    return {
        **metrics,
        "num_samples": count,
        "reference": f"{cfg.data._target_.rsplit('.', 1)[-1]} validation crops at {resolution}px (originals)",
        "num_reference": count,
        "tokenizer": str(cfg.tokenizer_path),
        "resolution": resolution,
    }


def evaluate_pfid(cfg: DictConfig, extractor: str, weights: Path, device: str) -> dict:
    """rfid of reconstructions decoded from perturbed codes (every image, fixed pfid_alpha / pfid_delta)."""
    alpha, delta = float(cfg.pfid_alpha), int(cfg.pfid_delta)
    perturbation = LatentPerturbation(alpha, beta=1.0, delta=delta, schedule="constant")
    metrics = evaluate_rfid(cfg, extractor, weights, device, perturbation)
    pfid = metrics.pop(f"fid[{extractor}]")
    replaced = metrics.pop("replaced")
    return {
        f"pfid[{extractor}]": pfid,
        "pfid_alpha": alpha,
        "pfid_delta": delta,
        "pfid_replaced": replaced,
        **metrics,
    }


def load_samples(path: Path) -> tuple[torch.Tensor | str, np.ndarray | None, int]:
    """(uint8 images (N, 3, H, W) or the folder, labels or None, resolution) of an .npz or image folder.

    An npz holds the images at `arr_0` (scripts/sample.py, ADM's sample batches) or `images` (older files),
    and labels at `labels` or ADM's `arr_1`; it is read without unpickling."""
    if not path.exists():
        raise FileNotFoundError(f"samples={path} does not exist")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            image_key, label_key = samples_npz_keys(npz.files)
            if image_key is None:
                raise ValueError(f"{path} has no 'arr_0' or 'images' array (expected uint8 (N, H, W, 3))")
            images = npz[image_key]
            labels = npz[label_key] if label_key else None
        if labels is not None and labels.shape != (len(images),):
            raise ValueError(f"{path}: labels {labels.shape} do not match images {images.shape}")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"{path}: '{image_key}' must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        return torch.from_numpy(images).permute(0, 3, 1, 2), labels, images.shape[1]
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise FileNotFoundError(f"samples={path}: no PNG or JPEG files in the folder")
        with Image.open(files[0]) as image:
            return str(path), None, image.height
    raise ValueError(f"samples={path}: expected a folder of PNGs or an .npz file")


def evaluate_gfid(cfg: DictConfig, extractor: str, weights: Path, device: str) -> dict:
    """Samples vs training crops (FID family, and conditional accuracy when the samples carry labels), or
    vs `reference_stats` (FID and IS)."""
    statistics = None
    if cfg.reference_stats:  # checked before the samples are read
        statistics = reference_statistics(cfg.reference_stats, feature_dimension(extractor, weights))
    samples, labels, resolution = load_samples(Path(cfg.samples))
    if statistics is None:
        result = against_training_crops(cfg, samples, labels, resolution, extractor, weights, device)
    else:
        result = against_statistics(cfg, samples, statistics, resolution, extractor, weights, device)
    return {**result, "samples": str(cfg.samples)}


def against_statistics(
    cfg: DictConfig, samples, statistics: dict, resolution: int, extractor: str, weights: Path, device: str
) -> dict:
    """FID of `samples` against precomputed reference statistics, and IS; no reference images."""
    metrics = image_metrics(
        samples, None, extractor, weights, reference_stats=statistics, **fidelity_settings(cfg, device)
    )
    return {
        **metrics,
        "num_samples": count_images(samples),
        "reference": f"mu/sigma of {len(statistics['mu'])}-d features in {Path(cfg.reference_stats).name}",
        "num_reference": None,  # the statistics do not say how many images they summarise
        "reference_stats": str(cfg.reference_stats),
        "resolution": resolution,
    }


@torch.no_grad()
def evaluate_floor(cfg: DictConfig, extractor: str, weights: Path, device: str) -> dict:
    """gfid of reconstructed training crops (ids reference_samples.., disjoint from the reference)."""
    tokenizer = from_pretrained(cfg.tokenizer_path, device)
    resolution = tokenizer.config.get("image_size", cfg.data.resolution)
    data = instantiate(cfg.data, resolution=resolution)
    if not hasattr(data, "train_dataset"):
        raise ConfigError(f"floor reconstructs training crops, and {cfg.data._target_} has no train_dataset")
    first = cfg.reference_samples
    reconstructions, labels = [], []
    for start in tqdm(range(0, cfg.floor_samples, cfg.batch_size), desc="reconstructing", unit="batch"):
        items = [
            data.train_dataset[first + i]
            for i in range(start, min(cfg.floor_samples, start + cfg.batch_size))
        ]
        items = [item for item in items if item is not None]  # unreadable files are left out
        if not items:
            continue
        images = torch.stack([item["image"] for item in items]).to(device)  # (b, 3, H, W)
        reconstructions.append(uint8_images(tokenizer.reconstruct(images).float().clamp(-1, 1)))
        labels += [item["label"] for item in items]
    result = against_training_crops(
        cfg, torch.cat(reconstructions), np.array(labels), resolution, extractor, weights, device
    )
    return {
        **result,
        "tokenizer": str(cfg.tokenizer_path),
        "samples": f"reconstructions of training crops {first}..{first + cfg.floor_samples - 1}",
    }


def against_training_crops(
    cfg: DictConfig,
    samples,
    labels: np.ndarray | None,
    resolution: int,
    extractor: str,
    weights: Path,
    device: str,
) -> dict:
    """FID family of `samples` (uint8 (N, 3, H, W) or a folder) vs the cached training-crop reference, plus
    the conditional accuracy when labels are given and the data are the embedded photos."""
    data = instantiate(cfg.data, resolution=resolution)
    if not hasattr(data, "train_dataset"):
        raise ConfigError(f"gfid draws reference crops from a train_dataset, which {cfg.data._target_} lacks")
    reference = FidelityImages(data.train_dataset, length=cfg.reference_samples)
    metrics = image_metrics(
        samples,
        reference,
        extractor,
        weights,
        cache_name=data_name(cfg, "train", resolution, cfg.reference_samples),
        **fidelity_settings(cfg, device),
    )
    result = {
        **metrics,
        "num_samples": count_images(samples),
        "reference": f"{type(data).__name__} training crops 0..{cfg.reference_samples - 1} at {resolution}px",
        "num_reference": cfg.reference_samples,
        "resolution": resolution,
    }
    if labels is not None and hasattr(data, "class_names"):  # a classifier of the reference's own classes
        data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
        classifier = ensure_feature_net(cfg.feature_net.resolution, cfg.feature_net.root, data=data_cfg)
        net = load_feature_net(classifier, device)
        if list(net.config["classes"]) == list(data.class_names):
            result["cond_accuracy"] = conditional_accuracy(samples, labels, net)
            result["cond_accuracy_classifier"] = str(classifier)
    return result


def evaluate_folders(cfg: DictConfig, extractor: str, weights: Path, device: str) -> dict:
    """input1 against input2; nothing cached, since folders change."""
    metrics = image_metrics(cfg.input1, cfg.input2, extractor, weights, **fidelity_settings(cfg, device))
    return {
        **metrics,
        "num_samples": count_images(cfg.input1),
        "reference": str(cfg.input2),
        "num_reference": count_images(cfg.input2),
        "input1": str(cfg.input1),
    }


MODES = {
    "rfid": evaluate_rfid,
    "pfid": evaluate_pfid,
    "gfid": evaluate_gfid,
    "floor": evaluate_floor,
    "folders": evaluate_folders,
}


def fidelity_settings(cfg: DictConfig, device: str) -> dict:
    return dict(cache_root=cfg.cache_root, batch_size=cfg.batch_size, device=device, verbose=cfg.verbose)


def default_out(cfg: DictConfig) -> Path:
    """<input>-<mode>.json beside the evaluated input (the export folder, the samples, input1)."""
    inputs = {
        "rfid": cfg.tokenizer_path,
        "pfid": cfg.tokenizer_path,
        "gfid": cfg.samples,
        "floor": cfg.tokenizer_path,
        "folders": cfg.input1,
    }
    source = Path(inputs[cfg.mode])
    return source.with_name(f"{source.stem}-{cfg.mode}.json")


def run(cfg: DictConfig) -> dict:
    """Evaluate as `cfg.mode` says, print a table, write the JSON; returns what the JSON holds."""
    if OmegaConf.is_missing(cfg, "mode") or cfg.mode not in REQUIRED:
        mode = "???" if OmegaConf.is_missing(cfg, "mode") else cfg.mode
        raise ConfigError(f"mode={mode}; choose one of {', '.join(REQUIRED)}")
    missing = [key for key in REQUIRED[cfg.mode] if not cfg[key]]
    if missing:  # before photos-net may be trained: fail in a second, not after a minute
        raise ConfigError(f"mode={cfg.mode} needs {' and '.join(f'{key}=...' for key in missing)}")
    check_evaluate(cfg)  # settings, model folder, samples and statistics, before photos-net may be trained
    use_recorded_data(cfg)
    torch.manual_seed(cfg.seed)  # reference crops of data modules that draw them from torch's RNG
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    extractor, weights = resolve_extractor(cfg)
    metrics = MODES[cfg.mode](cfg, extractor, weights, device)
    result = {
        "mode": cfg.mode,
        "feature_extractor": extractor,
        "feature_extractor_weights": str(weights),
        **metrics,
        "is_splits": isc_splits(metrics["num_samples"]),
    }
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_report(cfg, result, out)
    return result


def print_report(cfg: DictConfig, result: dict, out: Path) -> None:
    """What was measured against what, with which features, then a markdown table of the numbers."""
    counted = "" if result["num_reference"] is None else f" ({result['num_reference']})"
    print(f"\n{cfg.mode}: {result['num_samples']} images vs {result['reference']}{counted}")
    print(f"features: {result['feature_extractor']} ({result['feature_extractor_weights']})")
    if cfg.mode == "pfid":
        print(
            f"perturbed codes: pfid_alpha={result['pfid_alpha']} pfid_delta={result['pfid_delta']} "
            f"(replaced {result['pfid_replaced']:.1%} of the tokens, seed {cfg.seed})"
        )
    if cfg.mode in ("rfid", "pfid") and "lpips_weights" not in result:
        print("lpips: not measured, paths.vgg_weights is not set (LPIPS weights are never downloaded)")
    print("\n| metric | value |\n| --- | --- |")
    for key, value in result.items():
        if isinstance(value, float):
            print(f"| {key} | {value:.4f} |")
    print(f"\nmetrics: {out}")
