"""Measure images: rFID and pFID of a tokenizer, gFID of samples, FID between two folders; plus IS, P/R.

    python scripts/evaluate.py mode=rfid tokenizer_path=runs/titok_quickstart/export
    python scripts/evaluate.py mode=rfid tokenizer_path=... paths.vgg_weights=vgg16.pth  # + an lpips column
    python scripts/evaluate.py mode=pfid tokenizer_path=runs/titok_quickstart/export
    python scripts/evaluate.py mode=gfid samples=runs/gpt_quickstart/samples/cfg2.0/samples.npz
    python scripts/evaluate.py mode=floor tokenizer_path=runs/titok_quickstart/export
    python scripts/evaluate.py mode=folders input1=generated/ input2=real/

ADM's ImageNet 256 protocol, on the 50,000 samples of `scripts/sample.py protocol=adm50k`: gFID and IS
against the reference statistics of openai/guided-diffusion's VIRTUAL_imagenet256_labeled.npz (its `mu` and
`sigma`), with Inception features (configs/reference/adm_imagenet256.yaml; fewer than 50,000 samples are
refused):

    python scripts/evaluate.py reference=adm_imagenet256 samples=runs/<run>/adm50k/samples.npz \
        reference_stats=<folder>/VIRTUAL_imagenet256_labeled.npz paths.inception_weights=<inception .pth>

rfid and pfid add an LPIPS column when paths.vgg_weights names a local VGG16 state dict (`lpips[vgg]` with
paths.lpips_weights, LPIPS's calibrated layers; `lpips[vgg-baseline]` without); unset, it is left out.
Settings: configs/evaluate.yaml. Every mode, what it compares and the JSON it writes (default beside the
input, `out=` elsewhere): training/evaluation.py, which Python calls directly as
`evaluate("gfid", samples=..., reference_stats=...)`.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import ConfigError  # noqa: E402
from training.evaluation import run  # noqa: E402


@hydra.main(config_path="../configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
