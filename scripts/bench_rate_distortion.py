"""Rate-distortion of prefix tokenizers against JPEG and WebP on the held-out photo crops.

    python scripts/bench_rate_distortion.py                     # the quickstart exports that exist
    python scripts/bench_rate_distortion.py --tokenizer odp=runs/onedpiece_quickstart/export --tokenizer ...

For every tokenizer whose every prefix decodes (One-D-Piece, FlexTok; TiTok too, untrained for it), at
k = 1, 2, 4, ..., N tokens: PSNR, SSIM and rFID of the k-token reconstructions of the held-out crops, and the
bytes per image a k-token code costs, k * bits per token / 8 (an ideal fixed-length code, no entropy coding;
bits per token = token_dim * log2(V)).
Beside them JPEG and WebP (Pillow) over a sweep of quality settings, where bytes are the real file sizes,
headers included; at 32x32 the headers and tables are most of a file, so each codec is also measured by its
payload alone ("JPEG payload": the entropy-coded scan; "WebP payload": the VP8 frame data), the fairer
comparison with a tokenizer whose decoder already holds its "tables". Each tokenizer point is compared with
each codec curve at the same byte budget, interpolating the codec's curve; where the codec cannot make a
file that small the comparison says so instead of guessing.

Writes rate_distortion.json, rate_distortion.md, rate_distortion.png (PSNR and rFID against bytes) and
prefixes_<name>.png (a few crops decoded at every k, originals in the last column) to --out.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import save_image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenizers_vis.base import from_pretrained  # noqa: E402
from training.data import PhotosDataModule, to_uint8  # noqa: E402
from training.feature_net import NAME as PHOTOS_NET  # noqa: E402
from training.feature_net import ensure_feature_net  # noqa: E402
from training.metrics import image_metrics, psnr, ssim, uint8_images  # noqa: E402

DEFAULT_TOKENIZERS = {
    "onedpiece": "runs/onedpiece_quickstart/export",
    "flextok": "runs/flextok_quickstart/export",
    "titok": "runs/titok_quickstart/export",
}
CODEC_QUALITIES = (1, 2, 5, 10, 20, 30, 50, 70, 90, 95)
CODECS = {"JPEG": dict(format="JPEG", optimize=True), "WebP": dict(format="WEBP", method=6)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokenizer",
        action="append",
        metavar="NAME=PATH",
        help="an exported tokenizer; repeat for several (default: the quickstart exports that exist)",
    )
    parser.add_argument("--val-per-class", type=int, default=32, help="held-out crops per photo (17 photos)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--feature-net-root", default="runs/feature_net")
    parser.add_argument("--feature-net-resolution", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/rate_distortion")
    return parser.parse_args(argv)


def prefix_lengths(num_tokens: int) -> list[int]:
    """1, 2, 4, ... up to N, and N itself."""
    return sorted({2**i for i in range(num_tokens.bit_length()) if 2**i <= num_tokens} | {num_tokens})


def measure(reconstructions: torch.Tensor, originals: torch.Tensor, feature_net: Path) -> dict:
    """reconstructions, originals: float (M, 3, H, W) in [-1, 1] -> PSNR, SSIM, rFID[photos-net]."""
    fid = image_metrics(
        uint8_images(reconstructions),
        uint8_images(originals),
        PHOTOS_NET,
        feature_net,
        isc=False,
        prc=False,
        cache_name=None,
    )[f"fid[{PHOTOS_NET}]"]
    return {
        "psnr": psnr(reconstructions, originals).mean().item(),
        "ssim": ssim(reconstructions, originals).mean().item(),
        "rfid": fid,
    }


@torch.no_grad()
def tokenizer_curve(
    name: str, path: str, images: torch.Tensor, feature_net: Path, batch_size: int, seed: int
) -> tuple:
    """(rows of the curve, (K, 3, H, W) prefix grid of the first crops) of one exported tokenizer."""
    tokenizer = from_pretrained(path)
    spec = tokenizer.token_spec
    bits = spec.bits_per_token
    batches = images.split(batch_size)
    tokens = [tokenizer.encode(b) for b in batches]
    rows, grid_columns = [], []
    for k in tqdm(prefix_lengths(spec.num_tokens), desc=name, unit="prefix"):
        torch.manual_seed(seed)  # flow decoders draw noise: the same draws for every k
        recon = torch.cat([tokenizer.decode(t, num_tokens=k) for t in tokens]).float().clamp(-1, 1)
        rows.append({"tokens": k, "bytes": k * bits / 8, **measure(recon, images, feature_net)})
        grid_columns.append(recon[:8])
    grid = torch.stack([*grid_columns, images[:8]], dim=1).flatten(0, 1)  # (8 * (K + 1), 3, H, W)
    meta = {"path": path, "class": type(tokenizer).__name__, "bits_per_token": bits, "N": spec.num_tokens}
    return rows, grid, meta


def payload_bytes(codec: str, data: bytes) -> int:
    """The coded image without its container and tables: JPEG's entropy-coded scan (after the SOS header,
    before EOI), WebP's VP8 chunk minus its 10-byte frame header. What a codec would cost if, like a
    tokenizer's decoder, the receiver already knew the tables."""
    if codec == "JPEG":
        sos = data.index(b"\xff\xda")
        start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
        return data.rindex(b"\xff\xd9") - start
    if data[12:16] != b"VP8 ":  # extended or lossless layout: no simple payload, count the whole file
        return len(data)
    return int.from_bytes(data[16:20], "little") - 10


def codec_curves(codec: str, images: torch.Tensor, feature_net: Path) -> dict[str, list[dict]]:
    """Every quality setting of a Pillow codec: the decoded images' quality against the mean real file size
    ("JPEG") and against the mean payload size ("JPEG payload")."""
    originals = to_uint8(images)  # (M, H, W, 3)
    files, payloads = [], []
    for quality in tqdm(CODEC_QUALITIES, desc=codec, unit="quality"):
        sizes, payload_sizes, decoded = [], [], []
        for pixels in originals:
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, quality=quality, **CODECS[codec])
            sizes.append(buffer.tell())
            payload_sizes.append(payload_bytes(codec, buffer.getvalue()))
            buffer.seek(0)
            decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
        recon = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).float() / 127.5 - 1
        scores = measure(recon, images, feature_net)
        files.append({"quality": quality, "bytes": float(np.mean(sizes)), **scores})
        payloads.append({"quality": quality, "bytes": float(np.mean(payload_sizes)), **scores})
    return {codec: files, f"{codec} payload": payloads}


def codec_at(curve: list[dict], budget: float, key: str) -> float | None:
    """The codec's `key` at `budget` bytes, linearly interpolated; None outside the bytes it can reach."""
    points = sorted((row["bytes"], row[key]) for row in curve)
    sizes = [p[0] for p in points]
    if not sizes[0] <= budget <= sizes[-1]:
        return None
    return float(np.interp(budget, sizes, [p[1] for p in points]))


def verdicts(results: dict) -> list[str]:
    """Per tokenizer point: better or worse than each codec at equal bytes (PSNR and rFID), or unreachable."""
    lines = []
    for name, curve in results["tokenizers"].items():
        for row in curve["rows"]:
            parts = []
            for codec, codec_rows in results["codecs"].items():
                smallest = min(r["bytes"] for r in codec_rows)
                if row["bytes"] < smallest:
                    parts.append(f"{codec} cannot go below {smallest:.0f} B")
                    continue
                if row["bytes"] > max(r["bytes"] for r in codec_rows):
                    parts.append(f"beyond {codec}'s largest file")
                    continue
                psnr_codec = codec_at(codec_rows, row["bytes"], "psnr")
                fid_codec = codec_at(codec_rows, row["bytes"], "rfid")
                psnr_word = "beats" if row["psnr"] > psnr_codec else "loses to"
                fid_word = "beats" if row["rfid"] < fid_codec else "loses to"
                parts.append(f"PSNR {psnr_word} {codec} ({psnr_codec:.2f} dB)")
                parts.append(f"rFID {fid_word} {codec} ({fid_codec:.1f})")
            lines.append(f"| {name} | {row['tokens']} | {row['bytes']:.1f} | " + "; ".join(parts) + " |")
    return lines


def quality_cells(row: dict) -> str:
    return f"{row['bytes']:.1f} | {row['psnr']:.2f} | {row['ssim']:.3f} | {row['rfid']:.1f} |"


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        f"Held-out photo crops: {results['num_images']} at {results['resolution']}px; rFID[{PHOTOS_NET}] "
        "against the same crops. Token bytes = k * bits per token / 8; codec bytes = mean file size with "
        "headers, or (payload) the coded data alone.",
        "",
        "| method | tokens / quality | bytes | PSNR (dB) | SSIM | rFID |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, curve in results["tokenizers"].items():
        for r in curve["rows"]:
            lines.append(f"| {name} | {r['tokens']} | {quality_cells(r)}")
    for codec, rows in results["codecs"].items():
        for r in rows:
            lines.append(f"| {codec} | q{r['quality']} | {quality_cells(r)}")
    lines += [
        "",
        "Equal bytes:",
        "",
        "| tokenizer | tokens | bytes | against the codecs |",
        "| --- | --- | --- | --- |",
    ]
    lines += verdicts(results)
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = {**{n: c["rows"] for n, c in results["tokenizers"].items()}, **results["codecs"]}
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["bytes"])
        style = "-o" if name in results["tokenizers"] else ("--s" if name in CODECS else ":^")
        for ax, key in zip(axes, ("psnr", "rfid"), strict=True):
            ax.plot([r["bytes"] for r in rows], [r[key] for r in rows], style, label=name, markersize=4)
    for ax, label in zip(
        axes, ("PSNR (dB), higher is better", f"rFID[{PHOTOS_NET}], lower is better"), strict=True
    ):
        ax.set_xscale("log")
        ax.set_xlabel("bytes per image")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Rate-distortion on {results['num_images']} held-out {results['resolution']}px photo crops")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokenizer:
        pairs = [item.split("=", 1) for item in args.tokenizer]
        if any(len(p) != 2 for p in pairs):
            raise SystemExit("error: --tokenizer takes NAME=PATH")
        tokenizers = dict(pairs)
    else:
        tokenizers = {n: p for n, p in DEFAULT_TOKENIZERS.items() if (Path(p) / "config.json").is_file()}
    for name, path in tokenizers.items():
        if not (Path(path) / "config.json").is_file():
            raise SystemExit(f"error: tokenizer {name}: {path} is not an exported model (no config.json)")
    if not tokenizers:
        raise SystemExit(
            "error: no tokenizer export found; train one (see README) or pass --tokenizer NAME=PATH"
        )
    resolutions = {from_pretrained(p).config["image_size"] for p in tokenizers.values()}
    if len(resolutions) != 1:
        raise SystemExit(f"error: the tokenizers work at different resolutions {sorted(resolutions)}")
    resolution = resolutions.pop()
    feature_net = ensure_feature_net(args.feature_net_resolution, args.feature_net_root)

    data = PhotosDataModule(resolution, args.batch_size, seed=args.seed, val_per_class=args.val_per_class)
    images = torch.cat([b["image"] for b in data.val_dataloader()])  # (M, 3, H, W) in [-1, 1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"num_images": len(images), "resolution": resolution, "tokenizers": {}, "codecs": {}}
    for name, path in tokenizers.items():
        rows, grid, meta = tokenizer_curve(name, path, images, feature_net, args.batch_size, args.seed)
        results["tokenizers"][name] = {**meta, "rows": rows}
        scale = max(1, 64 // resolution)  # small crops, upscaled (nearest) so the grid is legible
        grid = torch.nn.functional.interpolate(grid * 0.5 + 0.5, scale_factor=scale, mode="nearest")
        save_image(grid, out / f"prefixes_{name}.png", nrow=len(rows) + 1, padding=2)
    for codec in CODECS:
        results["codecs"].update(codec_curves(codec, images, feature_net))
    (out / "rate_distortion.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / "rate_distortion.md")
    plot(results, out / "rate_distortion.png")
    print((out / "rate_distortion.md").read_text())
    print(f"written: {out}/rate_distortion.{{json,md,png}}, {out}/prefixes_<name>.png")
    return results


if __name__ == "__main__":
    main()
