"""Fit TokenBridge's post-training quantiser on training images and re-export the tokenizer.

    python scripts/fit_tokenbridge.py tokenizer_path=runs/tokenbridge_quickstart/export \
        [out=runs/tokenbridge_quickstart/export_fitted] [num_images=20000]

`train.py +experiment=tokenbridge_quickstart` already ends with a fitted export; this script refits one (on
more or other images, or an export written before fitting). It measures each latent channel's mean and
standard deviation over the posterior means of `num_images` training crops (tokenizers_vis/tokenbridge.py,
`fit_quantizer`), prints the mean PSNR of the continuous and of the quantised reconstructions of the first
`check_images` crops, and writes the export (config.json + model.safetensors) to `out` (by default back
into `tokenizer_path`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenizers_vis import from_pretrained  # noqa: E402


def fit(cfg: DictConfig) -> dict:
    device = torch.device(cfg.device)
    tokenizer = from_pretrained(cfg.tokenizer_path, device=device)
    if not hasattr(tokenizer, "fit_quantizer"):
        raise ValueError(
            f"{cfg.tokenizer_path} holds a {type(tokenizer).__name__}, not a TokenBridge tokenizer"
        )
    overrides = {"resolution": tokenizer.config["image_size"], "num_workers": 0, "batch_size": cfg.batch_size}
    datamodule = instantiate(OmegaConf.merge(cfg.data, overrides))
    torch.manual_seed(cfg.seed)
    report = tokenizer.fit_quantizer(
        datamodule.train_dataloader(), max_images=cfg.num_images, progress=True, check_images=cfg.check_images
    )
    out = Path(cfg.out)
    tokenizer.save_pretrained(out)
    print(f"fitted on {report['images']} images ({report['latents']} latent vectors): {out}")
    print(f"  channel std:  {' '.join(f'{s:.3g}' for s in report['std'].tolist())}")
    checked, bits = min(cfg.check_images, report["images"]), tokenizer.config["bits"]
    print(
        f"  PSNR on {checked} crops: continuous {report['psnr_continuous']:.2f} dB, "
        f"quantised ({bits} bits) {report['psnr_quantized']:.2f} dB, loss {report['psnr_loss']:.3f} dB"
    )
    return report


@hydra.main(config_path="../configs", config_name="fit_tokenbridge", version_base="1.3")
def main(cfg: DictConfig) -> None:
    fit(cfg)


if __name__ == "__main__":
    main()
