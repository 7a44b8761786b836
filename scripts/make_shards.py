"""Convert an ImageNet-layout class folder (SRC/<class>/<image>) into webdataset tar shards.

    python scripts/make_shards.py /data/imagenet/train data/shards/train --max-per-shard 1000 --resize 288

writes data/shards/train-000000.tar ... plus data/shards/classes.json (index -> class name), and prints the
train.py overrides that use them, quoted so they work pasted into a shell (the brace pattern must reach
Hydra intact: `'data.train_shards="data/shards/train-{000000..000127}.tar"'`). Samples are shuffled before
writing (a streaming reader only shuffles within a buffer, so shards must already mix classes). Each sample
holds `__key__`, the image bytes (`jpg`, or `png`/`webp` when the source is one of those and no --resize is
asked), and `cls` (int label).
Files that do not decode are skipped and counted, never fatal.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from training.data import scan_class_folder

_KEEP_AS_IS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def _encode(path: str, resize: int | None) -> tuple[str, bytes]:
    """-> (webdataset key, image bytes); raises if the file does not decode. Re-encodes only when needed."""
    with Image.open(path) as image:
        image.load()  # full decode: catches truncated files that a header check would let through
        suffix = _KEEP_AS_IS.get(Path(path).suffix.lower())
        if resize is None and suffix is not None:
            return suffix, Path(path).read_bytes()
        image = image.convert("RGB")
        if resize is not None and min(image.size) > resize:  # shorter side -> resize; never upscale
            scale = resize / min(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return "jpg", buffer.getvalue()


def write_shards(
    src: str, out_prefix: str, max_per_shard: int = 1000, shuffle_seed: int = 0, resize: int | None = None
) -> tuple[str, int, int]:
    """Write SRC as shards OUT_PREFIX-000000.tar, ... -> (brace pattern, samples written, files skipped)."""
    class_names, files = scan_class_folder(src)
    random.Random(shuffle_seed).shuffle(files)
    out_dir = Path(out_prefix).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "classes.json").write_text(json.dumps(dict(enumerate(class_names)), indent=1))
    written = skipped = 0
    with wds.ShardWriter(f"{out_prefix}-%06d.tar", maxcount=max_per_shard, verbose=0) as sink:
        for path, label in tqdm(files, desc="shards", unit="img"):
            try:
                key, data = _encode(path, resize)
            except Exception as exn:  # any decoder error: skip this file, keep converting
                tqdm.write(f"skipping {path}: {exn!r}")
                skipped += 1
                continue
            sink.write({"__key__": f"{written:09d}", key: data, "cls": label})
            written += 1
        last = max(sink.shard - 1, 0)
    return f"{out_prefix}-{{000000..{last:06d}}}.tar", written, skipped


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="class folder: SRC/<class>/<image>")
    parser.add_argument("out_prefix", help="shards are written as OUT_PREFIX-000000.tar, ...")
    parser.add_argument("--max-per-shard", type=int, default=1000)
    parser.add_argument("--shuffle-seed", type=int, default=0)
    parser.add_argument(
        "--resize", type=int, default=None, help="resize the shorter side to this (no upscaling)"
    )
    args = parser.parse_args()
    pattern, written, skipped = write_shards(
        args.src, args.out_prefix, args.max_per_shard, args.shuffle_seed, args.resize
    )
    print(f"wrote {written} samples, skipped {skipped} unreadable files; classes.json beside the shards")
    print("train on them with (paste as is):")
    print(f"  {shard_override(pattern, num_classes(args.src))}")


def shard_override(pattern: str, classes: int) -> str:
    """The train.py arguments for the shards, quoted twice: single quotes stop the shell's brace expansion,
    double quotes stop Hydra's override parser reading the braces as a dict."""
    return f"data=imagenet_shards 'data.train_shards=\"{pattern}\"' data.num_classes={classes}"


def num_classes(src: str) -> int:
    return sum(1 for path in Path(src).iterdir() if path.is_dir())


if __name__ == "__main__":
    main()
