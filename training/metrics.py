"""Image-quality metrics: PSNR and SSIM for reconstructions (FID-family metrics build on torch-fidelity)."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (a decoder may overshoot)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def psnr(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1]: (B, 3, H, W) x2 -> (B,)"""
    mse = (to_unit(reconstructions) - to_unit(images)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def ssim(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5) for images in [-1, 1]: -> (B,)"""
    size = min(images.shape[-2:])
    kernel = min(11, size - (1 - size % 2))  # the window must fit small crops and be odd
    return structural_similarity_index_measure(
        to_unit(reconstructions), to_unit(images), data_range=1.0, kernel_size=kernel, reduction="none"
    )
