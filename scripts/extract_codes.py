"""Turn a dataset into token shards with a frozen, exported tokenizer (stage 2 trains on these).

    python scripts/extract_codes.py tokenizer_path=runs/titok_quickstart/export \
        out=runs/titok_quickstart/codes data.samples_per_epoch=20000 flips=true

Each shard `codes-00000.safetensors` holds `tokens` (n, N) int32, `labels` (n,) int64 and, with flips,
`tokens_flip`: the tokens of the horizontally mirrored images, a free augmentation for the generator.
`meta.json` records the tokenizer, its token spec, the data config and the shard list. Shards are written
atomically (a temporary file, then a rename) and finished shards are skipped, so an interrupted extraction
resumes where it stopped. Samples are drawn in a fixed order (dataset index i, random augmentations
seeded per shard), so reruns produce the same shards. For the embedded photos, set
data.samples_per_epoch to the number of distinct crops wanted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenizers_vis import from_pretrained  # noqa: E402
from training.config import ConfigError  # noqa: E402
from training.validation import check_extract  # noqa: E402


@torch.no_grad()
def encode(tokenizer, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N) int32 codes"""
    return tokenizer.encode(images).data.to(torch.int32).cpu()


def extract(cfg: DictConfig) -> Path:
    check_extract(cfg)  # settings and the tokenizer folder, before any image is encoded
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    tokenizer = from_pretrained(cfg.tokenizer_path, device=device)
    data_cfg = OmegaConf.merge(cfg.data, {"resolution": tokenizer.config["image_size"], "num_workers": 0})
    datamodule = instantiate(data_cfg)
    dataset = datamodule.train_dataset
    total = cfg.num_samples or len(dataset)  # more than len(dataset): another pass, fresh augmentations
    shards = [(start, min(start + cfg.shard_size, total)) for start in range(0, total, cfg.shard_size)]

    flips = bool(cfg.flips) and bool(data_cfg.get("flip", True))  # no mirrored tokens for unflippable data
    meta = {
        "tokenizer": str(cfg.tokenizer_path),
        "token_spec": json.loads((Path(cfg.tokenizer_path) / "config.json").read_text()).get("token_spec"),
        "num_classes": datamodule.num_classes,
        "num_samples": total,
        "flips": flips,
        "data": OmegaConf.to_container(data_cfg, resolve=True),
        "shards": [f"codes-{i:05d}.safetensors" for i in range(len(shards))],
    }
    progress = tqdm(total=total, desc="extracting codes", unit="img")
    skipped = 0
    for index, (start, stop) in enumerate(shards):
        path = out / meta["shards"][index]
        if path.is_file():  # finished earlier: resumable
            progress.update(stop - start)
            continue
        torch.manual_seed(cfg.seed + index)  # augmentations of this shard, whatever ran before it
        codes, flipped, labels = [], [], []
        for batch_start in range(start, stop, cfg.batch_size):
            keys = range(batch_start, min(batch_start + cfg.batch_size, stop))
            items = [dataset[key] for key in keys]  # key-seeded views; keys past the end: fresh augmentations
            progress.update(len(items))
            skipped += sum(item is None for item in items)  # an unreadable image: left out, counted
            items = [item for item in items if item is not None]
            if not items:
                continue
            images = torch.stack([item["image"] for item in items]).to(device)  # (b, 3, H, W)
            labels += [int(item["label"]) for item in items]
            codes.append(encode(tokenizer, images))
            if flips:
                flipped.append(encode(tokenizer, images.flip(-1)))
        shard = {"tokens": torch.cat(codes), "labels": torch.tensor(labels, dtype=torch.int64)}
        if flips:
            shard["tokens_flip"] = torch.cat(flipped)
        partial = path.with_suffix(".partial")
        save_file(shard, str(partial))
        partial.rename(path)
    progress.close()
    meta["skipped_images"] = skipped
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{total - skipped} samples in {len(shards)} shards: {out}")
    if skipped:
        print(f"skipped {skipped} unreadable images (named in the warnings above)")
    return out


@hydra.main(config_path="../configs", config_name="extract_codes", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        extract(cfg)
    except ConfigError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
