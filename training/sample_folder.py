"""Sample class-conditional images from an exported generator and tokenizer into a folder.

    sample_folder(generator_path="runs/gpt_quickstart/export", tokenizer_path="runs/titok_quickstart/export",
                  out="runs/gpt_quickstart/samples/cfg2", num_samples=510, sampler={"cfg_scale": 2.0})
    sample_folder(..., sampler={"name": "speculative", "drafter_path": "runs/gpt_draft_quickstart/export"})
    sample_folder(..., protocol="adm50k")                        # ADM's 50,000 class-balanced samples
    run(cfg)                                                     # a composed configs/sample.yaml

`sample_folder` takes the keys of configs/sample.yaml as keyword arguments (config groups as a preset name or
a dict: training/config_files.py) and needs no Hydra runtime; scripts/sample.py is its command line. Both
check the settings and the two model folders (training/validation.py) before any model is loaded.

Writes `out/images/<global index>.png`, `out/samples.npz` (uint8 images (N, H, W, 3) at `arr_0`, the key
ADM's evaluator reads, + `labels`), `out/grid.png` (one row per class) and `out/stats.json` (forward passes,
images/s, and under `sampler_stats` the sampler's own stats (tokens and accepted drafts per pass, acceptance
rate, draft passes), each the mean over the batches sampled in this run, weighted by batch size). The images
are stored once: np.savez writes every keyword as its own array, so an `images` copy beside `arr_0` would
double a 50,000-sample file (9.8 GB at 256 px); training/evaluation.py still reads `images` of older files.
Labels are class-balanced (index i gets class i % num_classes). Every batch has its own seed, derived from
the run's seed and the batch's first index, so a sample does not depend on how the work was split: with
several ranks (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS, e.g. under srun) each rank writes a disjoint,
contiguous index range (and its own `samples_rank<r>.npz`). Batches whose PNGs already exist are skipped,
so an interrupted run resumes; `out/settings.json` records what the images depend on (the two models'
weight fingerprints, the sampler settings, seed, batch size, token count, device), and a folder holding
samples made with other settings is refused before anything is sampled, so it never mixes or returns them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision.utils import save_image
from tqdm import tqdm

from core import Tokens, from_pretrained
from sampling.common import batch_seed, class_balanced_labels
from sampling.registry import get_sampler, sampler_inputs
from training.config import ConfigError, config_differences
from training.config_files import load_config
from training.data import to_uint8
from training.metrics import weights_fingerprint
from training.validation import check_sample


def sample_folder(generator_path, tokenizer_path, out, **settings) -> dict:
    """Sample without Hydra: configs/sample.yaml with these settings (its keys: num_samples, batch_size,
    seed, num_tokens, sampler, protocol, device...) -> the summary stats.json holds."""
    paths = {"generator_path": generator_path, "tokenizer_path": tokenizer_path, "out": out}
    return run(load_config("sample", {**paths, **settings}))


def rank_and_world_size() -> tuple[int, int]:
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and world_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[world_var])
    return 0, 1


def index_range(num_samples: int, rank: int, world_size: int) -> range:
    per_rank = math.ceil(num_samples / world_size)
    return range(min(rank * per_rank, num_samples), min((rank + 1) * per_rank, num_samples))


# Settings that do not change the images: more samples extend a run; grid, npz and compile are output/speed;
# num_classes only checks the generator's.
NOT_IN_IMAGES = ("num_samples", "num_classes", "out", "grid", "grid_per_class", "npz")


def image_settings(cfg: DictConfig) -> dict:
    """What out/images/*.png depend on; model folders by the fingerprint of their weights."""
    settings = {
        key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, value in cfg.items()
        if key not in NOT_IN_IMAGES and key != "paths"  # paths: machine-specific folders
    }
    settings["sampler"] = {k: v for k, v in settings["sampler"].items() if k != "compile"}
    for key in ("generator_path", "tokenizer_path"):
        settings[key] = {"path": settings[key], "weights": weights_fingerprint(settings[key])}
    if settings["sampler"].get("drafter_path"):
        path = settings["sampler"]["drafter_path"]
        settings["sampler"]["drafter_path"] = {"path": path, "weights": weights_fingerprint(path)}
    return settings


def check_output_folder(out: Path, settings: dict) -> None:
    """Refuse a folder whose samples were made with other settings (run() records them once every input
    was checked, so a start that fails leaves nothing that blocks the corrected rerun)."""
    record = out / "settings.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        changed = config_differences(saved, settings)
        if changed:
            shown = ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")
            raise ConfigError(
                f"out={out} holds samples made with other settings ({shown} differ); "
                "choose another out or delete that folder"
            )
        return
    if (out / "images").is_dir() and any((out / "images").iterdir()):
        raise ConfigError(
            f"out={out} holds images without a record of their settings (no settings.json); "
            "choose another out or delete that folder"
        )


def run(cfg: DictConfig) -> dict:
    """Sample as the composed configs/sample.yaml says, write the folder; returns what stats.json holds."""
    out, device = Path(cfg.out), torch.device(cfg.device)
    check_sample(cfg)  # settings and the two model folders, before any model is loaded
    generator = from_pretrained(cfg.generator_path, device=device)
    tokenizer = from_pretrained(cfg.tokenizer_path, device=device)
    settings = OmegaConf.to_container(cfg.sampler, resolve=True)
    name = settings.pop("name")
    sampler = get_sampler(name)
    inputs = sampler_inputs(settings, cfg.tokenizer_path, tokenizer, generator, device)
    num_tokens = cfg.num_tokens  # None: all N; k < N: a k-token prefix (variable-length tokenizers)
    most = generator.config["num_tokens"]
    if num_tokens is not None and not 1 <= num_tokens <= most:
        raise ValueError(f"num_tokens={num_tokens}; the generator makes 1 to {most} tokens")
    num_classes = generator.config["num_classes"]
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ConfigError(
            f"num_classes={cfg.num_classes}, but generator_path={cfg.generator_path} makes {num_classes}"
        )
    settings_record = image_settings(cfg)  # every input checked: now the folder, before any sampling
    check_output_folder(out, settings_record)
    labels = class_balanced_labels(cfg.num_samples, num_classes)
    rank, world_size = rank_and_world_size()
    indices = index_range(cfg.num_samples, rank, world_size)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(settings_record, indent=2) + "\n")

    images, stats = [], {"forward_passes": 0, "tokens": 0, "wall_time": 0.0, "images": 0}
    sampler_stats: dict[str, float] = {}  # sum over batches of stat * batch size
    batches = [indices[i : i + cfg.batch_size] for i in range(0, len(indices), cfg.batch_size)]
    for batch in tqdm(batches, desc=f"sampling ({name}, rank {rank}/{world_size})", unit="batch"):
        paths = [out / "images" / f"{i:06d}.png" for i in batch]
        if all(p.is_file() for p in paths):  # done in an earlier, interrupted run
            images += [np.asarray(Image.open(p)) for p in paths]
            continue
        seed = torch.Generator(device=device).manual_seed(batch_seed(cfg.seed, batch[0]))
        batch_labels = labels[batch[0] : batch[-1] + 1].to(device)
        result = sampler(generator, labels=batch_labels, num_tokens=num_tokens, generator=seed, **inputs)
        tokens = Tokens(generator.config.get("token_kind", "categorical"), result.tokens)  # (b, k)
        pixels = to_uint8(tokenizer.decode(tokens, num_tokens=num_tokens))  # (b, H, W, 3)
        for path, pixel in zip(paths, pixels, strict=True):
            Image.fromarray(pixel).save(path)
        images += list(pixels)
        stats["forward_passes"] += result.stats["forward_passes"] * len(batch)
        stats["tokens"] += result.tokens.numel()
        stats["wall_time"] += result.stats["wall_time"]
        stats["images"] += len(batch)
        for key, value in result.stats.items():
            if key != "wall_time" and isinstance(value, int | float):
                sampler_stats[key] = sampler_stats.get(key, 0.0) + value * len(batch)

    array = np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
    label_array = labels[indices.start : indices.stop].numpy()
    if cfg.npz:
        npz = out / ("samples.npz" if world_size == 1 else f"samples_rank{rank}.npz")
        np.savez(npz, arr_0=array, labels=label_array)  # arr_0: ADM's key for the images
    summary = {
        "sampler": name,
        **settings,
        "num_samples": len(indices),
        "num_tokens": num_tokens or generator.config["num_tokens"],
        "forward_passes_per_image": stats["forward_passes"] / max(1, stats["images"]),
        "images_per_second": stats["images"] / stats["wall_time"] if stats["wall_time"] else None,
        "sampler_stats": {key: total / stats["images"] for key, total in sampler_stats.items()},
    }
    if rank == 0:
        if cfg.grid and len(array):
            save_grid(array, label_array, num_classes, cfg.grid_per_class, out / "grid.png")
        (out / "stats.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{len(indices)} samples in {out} (grid: {out / 'grid.png'})")
    return summary


def save_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int, path: Path) -> None:
    """One row per class (the first `per_class` samples of each), upscaled so small images stay visible."""
    rows = [images[labels == c][:per_class] for c in range(num_classes)]
    rows = [r for r in rows if len(r)]
    per_class = min(per_class, min(len(r) for r in rows))
    picked = torch.from_numpy(np.concatenate([r[:per_class] for r in rows])).permute(0, 3, 1, 2)
    scale = max(1, 64 // picked.shape[-1])
    picked = torch.nn.functional.interpolate(picked.float() / 255, scale_factor=scale, mode="nearest")
    save_image(picked, path, nrow=per_class, padding=2)
