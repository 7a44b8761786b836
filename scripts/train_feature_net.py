"""Train photos-net, the offline FID / IS feature network of the embedded photos (training/feature_net.py).

    python scripts/train_feature_net.py                   # runs/feature_net/photos-net-32, if missing
    python scripts/train_feature_net.py --resolution 64 --force

An existing net is reused (nothing is trained) unless --force: FID numbers are only comparable under the
same weights, so a net is replaced only on purpose. scripts/evaluate.py trains it on first use the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.feature_net import DEFAULT_RESOLUTION, FEATURE_NET_ROOT, ensure_feature_net  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION, help="training crop size")
    parser.add_argument("--root", default=str(FEATURE_NET_ROOT), help="nets live in <root>/photos-net-<res>")
    parser.add_argument("--force", action="store_true", help="retrain even if the net exists")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--pool-size", type=int, default=8192, help="training crops drawn once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is faster on cores shared with other jobs)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path = ensure_feature_net(
        args.resolution,
        args.root,
        force=args.force,
        steps=args.steps,
        pool_size=args.pool_size,
        seed=args.seed,
    )
    report = json.loads((path / "config.json").read_text())
    print(
        f"{path}: validation accuracy {report['val_accuracy']:.3f} on {report['val_samples']} held-out crops"
    )
    return path


if __name__ == "__main__":
    main()
