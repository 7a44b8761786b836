"""Train photos-net, the offline FID / IS / conditional-accuracy network (training/feature_net.py), on the
embedded photos or on any dataset a data config describes.

    python scripts/train_feature_net.py                   # runs/feature_net/photos-net-32, if missing
    python scripts/train_feature_net.py --resolution 64 --force
    python scripts/train_feature_net.py data=imagenet_folder data.root=/data/mine/train data.val_root=null
        # runs/feature_net/photos-net-32-classfolder-<digest>: classifies your classes

evaluate.py trains the net of the reference dataset itself on first use; this script does it ahead of time.

An existing net is reused (nothing is trained) unless --force: FID numbers are only comparable under the
same weights, so a net is replaced only on purpose. scripts/evaluate.py trains it on first use the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import ConfigError, compose_config  # noqa: E402
from training.feature_net import DEFAULT_RESOLUTION, FEATURE_NET_ROOT, ensure_feature_net  # noqa: E402
from training.validation import EVALUATE_RULES, check_rules  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION, help="training crop size")
    parser.add_argument("--root", default=str(FEATURE_NET_ROOT), help="nets live in <root>/photos-net-<res>")
    parser.add_argument("--force", action="store_true", help="retrain even if the net exists")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--pool-size", type=int, default=8192, help="training crops drawn once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="data config, as evaluate.py takes it"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is faster on cores shared with other jobs)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        data = compose_config(args.overrides, "evaluate").data
        check_rules(OmegaConf.create({"data": data}), EVALUATE_RULES)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    path = ensure_feature_net(
        args.resolution,
        args.root,
        force=args.force,
        steps=args.steps,
        pool_size=args.pool_size,
        seed=args.seed,
        data=OmegaConf.to_container(data, resolve=True),
    )
    report = json.loads((path / "config.json").read_text())
    print(
        f"{path}: validation accuracy {report['val_accuracy']:.3f} on {report['val_samples']} held-out crops"
    )
    return path


if __name__ == "__main__":
    main()
