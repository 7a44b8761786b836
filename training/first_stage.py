"""A small first-stage autoencoder for FlexTok on the embedded photos: diffusers' AutoencoderKL, trained here.

FlexTok (tokenizers_vis/flextok.py) runs its rectified flow on the latents of a frozen VAE, not on pixels:
the VAE's decoder keeps neighbouring pixels coherent, so the flow only has to place content. The paper's
VAE is a large f8 one the user supplies (`paths.flextok_vae`). For the CPU quickstart this module trains a
tiny one on photo crops in a few minutes and saves it as a diffusers folder, so FlexTok loads it through the
same `first_stage=vae` path (`AutoencoderKL.from_pretrained`). Without a first stage (`first_stage=pixels`)
the flow decoder of the CPU quickstart, which sees 4x4-pixel patches, left a mosaic of independently
coloured patches after 2800 steps (16.4 dB held-out).

Architecture: f4 (32x32 crops -> 8x8x4 latents), three levels of 8, 16 and 32 channels with one ResNet block
each, no attention in the mid block (at 8x8 it cost a third of the step and is not needed), GroupNorm of 8
groups. Training: L2 + `kl_weight` * KL with kl_weight 1e-6, the nearly deterministic regime of Stable
Diffusion's VAE; AdamW with a one-cycle schedule; crops are drawn once into a pool, as photos-net does.
After training the latents' statistics are written into the diffusers config the way FlexTok reads them,
`(z - shift_factor) * scaling_factor`, with shift_factor = the mean and scaling_factor = 1 / the standard
deviation of the posterior means over the pool: the flow then sees zero-mean, unit-variance latents.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.data import PhotosDataModule
from training.feature_net import stack_crops, write_folder_atomically
from training.metrics import psnr

FIRST_STAGE_ROOT = Path("runs/first_stage")


def autoencoder_path(resolution: int = 32, root: str | Path = FIRST_STAGE_ROOT) -> Path:
    """Where the photos autoencoder for `resolution` lives: <root>/ae-f4-<resolution>."""
    return Path(root) / f"ae-f4-{resolution}"


def build_autoencoder(resolution: int, latent_channels: int = 4, channels=(8, 16, 32)):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=resolution,
        mid_block_add_attention=False,
    )


def ensure_autoencoder(
    resolution: int = 32,
    root: str | Path = FIRST_STAGE_ROOT,
    force: bool = False,
    progress: bool = True,
    **train_kwargs,
) -> Path:
    """The autoencoder folder for `resolution` under `root`, trained first when missing (or when `force`).

    The folder appears atomically (`write_folder_atomically`). `train_kwargs` go to `train_autoencoder`.
    """
    path = autoencoder_path(resolution, root)
    if path.is_dir() and not force:
        return path
    vae, report = train_autoencoder(resolution, progress=progress, **train_kwargs)

    def write(folder: Path) -> None:
        vae.save_pretrained(folder)
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    write_folder_atomically(path, write)
    if progress:
        print(
            f"trained {path} in {report['train_seconds']}s: held-out PSNR {report['val_psnr']:.2f} dB, "
            f"latents (B, {report['latent_channels']}, {resolution // 4}, {resolution // 4})"
        )
    return path


def train_autoencoder(
    resolution: int = 32,
    steps: int = 1500,
    batch_size: int = 64,
    pool_size: int = 8192,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    latent_channels: int = 4,
    seed: int = 0,
    progress: bool = True,
):
    """Train the photos autoencoder -> (AutoencoderKL in eval mode with its latent statistics in its config,
    report with the held-out PSNR)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    data = PhotosDataModule(resolution, batch_size, seed=seed)
    images, _ = stack_crops(data.train_dataset, pool_size, "autoencoder training crops", progress)
    val_images, _ = stack_crops(data.val_dataset, len(data.val_dataset), "validation crops", progress)

    vae = build_autoencoder(resolution, latent_channels)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    bar = tqdm(range(steps), desc=f"training ae-f4-{resolution}", unit="step", disable=not progress)
    for _ in bar:
        batch = images[torch.randint(pool_size, (batch_size,), generator=generator)]  # (B, 3, r, r)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        pixel = F.mse_loss(reconstruction, batch)
        loss = pixel + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(pixel=f"{pixel.item():.4f}", refresh=False)

    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in images.split(512)])
        shift, std = latents.mean().item(), latents.std().item()
        vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
        val = torch.cat(
            [vae.decode(vae.encode(chunk).latent_dist.mode()).sample for chunk in val_images.split(256)]
        )
    report = dict(
        val_psnr=psnr(val.clamp(-1, 1), val_images).mean().item(),
        val_samples=len(val_images),
        latent_channels=latent_channels,
        latent_shift=shift,
        latent_std=std,
        steps=steps,
        batch_size=batch_size,
        pool_size=pool_size,
        kl_weight=kl_weight,
        seed=seed,
        train_seconds=round(time.perf_counter() - start, 1),
    )
    return vae, report
