"""Sample class-conditional images from an exported generator and tokenizer into a folder.

    python scripts/sample.py generator_path=runs/gpt_quickstart/export \
        tokenizer_path=runs/titok_quickstart/export out=runs/gpt_quickstart/samples/cfg2 \
        num_samples=510 sampler.cfg_scale=2.0

Fast decoding picks another sampler (configs/sampler/): `sampler=speculative sampler.drafter_path=<a smaller
exported generator>` or `sampler.drafter=eagle sampler.drafter_path=<an exported EAGLE drafter>` (and
`sampler=lantern`), `sampler=sjd`, `sampler=gsd`; LANTERN's and GSD's latent
neighbours are computed from the tokenizer once and cached beside its export. With a variable-length
tokenizer (One-D-Piece, FlexTok), `num_tokens=k` generates k tokens and decodes that prefix.

ADM's 50,000-sample protocol (configs/protocol/adm50k.yaml): 50 samples of each of the 1000 ImageNet classes
on a GPU, written as the sample batch ADM's evaluator reads; then `scripts/evaluate.py
reference=adm_imagenet256` measures them against ADM's reference statistics:

    python scripts/sample.py protocol=adm50k generator_path=runs/gpt_b_titok_l32_imagenet/export \
        tokenizer_path=runs/titok_l32_imagenet/export out=runs/gpt_b_titok_l32_imagenet/adm50k \
        sampler.cfg_scale=2

Writes `out/images/<global index>.png`, `out/samples.npz` (uint8 images (N, H, W, 3) at ADM's key `arr_0`,
+ `labels`), `out/grid.png` and `out/stats.json`; under srun each rank writes its own index range, and an
interrupted run resumes. Settings: configs/sample.yaml. What each file holds, how seeds, ranks and resuming
work: training/sample_folder.py, which Python calls directly as `sample_folder(generator_path=...,
tokenizer_path=..., out=..., num_samples=..., sampler={...})`.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import ConfigError  # noqa: E402
from training.sample_folder import run  # noqa: E402


@hydra.main(config_path="../configs", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
