"""Train the small photos autoencoder that FlexTok's CPU quickstart uses as its first stage.

    python scripts/train_autoencoder.py                 # runs/first_stage/ae-f4-32, if missing
    python scripts/train_autoencoder.py --resolution 64 --force

A diffusers AutoencoderKL folder (training/first_stage.py): f4, 4 latent channels, a few minutes on a CPU.
An existing one is reused unless --force, since a FlexTok trained on its latents needs exactly those weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.first_stage import FIRST_STAGE_ROOT, ensure_autoencoder  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=32, help="training crop size")
    parser.add_argument("--root", default=str(FIRST_STAGE_ROOT), help="models live in <root>/ae-f4-<res>")
    parser.add_argument("--force", action="store_true", help="retrain even if the model exists")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--pool-size", type=int, default=8192, help="training crops drawn once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return ensure_autoencoder(
        args.resolution,
        args.root,
        force=args.force,
        steps=args.steps,
        pool_size=args.pool_size,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
