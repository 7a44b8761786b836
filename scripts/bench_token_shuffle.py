"""Benchmark Token-Shuffle: GPTs with s = 1, 2, 4 on the same grid codes, side by side in one run.

    python train.py +experiment=vqgan_quickstart              # the tokenizer (8 x 8 = 64 grid tokens)
    python scripts/extract_codes.py tokenizer_path=runs/vqgan_quickstart/export \
        out=runs/vqgan_quickstart/codes data.samples_per_epoch=20000
    for s in 1 2 4; do python train.py +experiment=gpt_vqgan_quickstart generator.shuffle=$s \
        paths.run_dir=runs/gpt_vqgan_quickstart_s$s; done     # the same width, depth and steps
    python scripts/bench_token_shuffle.py --results docs/results/token_shuffle.json
    python scripts/bench_token_shuffle.py --replot docs/results/token_shuffle.json --out docs

For each s (`--shuffles`; the GPT exports `--generator-pattern`, s substituted) and sampler (plain
autoregressive decoding, and SJD with a window of `--sjd-window` positions), the rows of the JSON hold:
shuffle, sampler, batch (1 and 16), positions (transformer positions per image: 64 / s^2), train_step_s
(seconds per training step at the run's batch size, from its metrics.json), images_per_s (sampling only:
median over `--repeats` interleaved repeats of `--timing-rows` images at that batch; the tokenizer's decode
is the same for every row and is not timed), speedup_wall (images/s over s = 1's plain decoding at the same
batch), passes_per_image, and from `--num-samples` class-balanced samples at batch 16: gfid (gFID[photos-net]
against the tokenizer's training crops, or Inception with paths.inception_weights) and cond_accuracy.
`noise` holds plain decoding's gFID at each of `--seeds` for every s: the spread (max - min) of s = 1 is the
seed noise a difference must exceed to mean anything.

Writes token_shuffle.json, token_shuffle.md (table) and token_shuffle.png (speed against gFID, one panel per
batch size) to --out, and with --results also the committed data file. CPU runs use one thread unless
--threads says so (two processes on two cores must not share them).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import Tokens, from_pretrained  # noqa: E402
from sampling import batch_seed, class_balanced_labels, sample_ar, sample_jacobi  # noqa: E402
from training.data import to_uint8  # noqa: E402
from training.evaluation import evaluate_gfid, gfid_config, resolve_extractor  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default="runs/vqgan_quickstart/export")
    parser.add_argument("--generator-pattern", default="runs/gpt_vqgan_quickstart_s{s}/export")
    parser.add_argument("--shuffles", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--sjd-window", type=int, default=4)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--timing-rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=510)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/bench/token_shuffle")
    parser.add_argument("--results", default=None, help="also write the data file here (docs/results/...)")
    parser.add_argument("--replot", default=None, help="redraw table and plot from this JSON; run nothing")
    parser.add_argument(
        "--eval", nargs="*", default=[], help="evaluate.yaml overrides, e.g. feature_net.root=..."
    )
    return parser.parse_args(argv)


def load(path: str, what: str, device: str):
    if not (Path(path) / "config.json").is_file():
        raise SystemExit(f"error: {what} {path} is not an export folder (see this script's docstring)")
    return from_pretrained(path, device=device)


def samplers(window: int, cfg_scale: float) -> dict:
    return {
        "ar": lambda model, labels, generator: sample_ar(
            model, labels, cfg_scale=cfg_scale, generator=generator
        ),
        f"sjd_L{window}": lambda model, labels, generator: sample_jacobi(
            model, labels, window=window, cfg_scale=cfg_scale, generator=generator
        ),
    }


def sample(method, model, tokenizer, labels, seed, batch_size, device) -> tuple[np.ndarray, float]:
    """Every label sampled in batches (seeds as scripts/sample.py derives them) and decoded -> uint8 images
    and the mean target passes per image."""
    images, passes = [], 0.0
    for start in range(0, len(labels), batch_size):
        rows = labels[start : start + batch_size].to(device)
        result = method(model, rows, torch.Generator(device=device).manual_seed(batch_seed(seed, start)))
        passes += result.stats["passes_per_row"] * len(rows)
        with torch.no_grad():
            images.append(to_uint8(tokenizer.decode(Tokens("categorical", result.tokens, grid=model.grid))))
    return np.concatenate(images), passes / len(labels)


def quality(images, labels, path: Path, eval_cfg, extractor, weights, device) -> dict:
    np.savez(path, arr_0=images, labels=labels.numpy())
    eval_cfg.samples = str(path)
    torch.manual_seed(eval_cfg.seed)  # the reference crops are drawn from torch's RNG, as evaluate.py does
    metrics = evaluate_gfid(eval_cfg, extractor, weights, device)
    return {"gfid": metrics[f"fid[{extractor}]"], "cond_accuracy": metrics.get("cond_accuracy")}


def images_per_second(jobs: dict, batch: int, rows: int, repeats: int, device: str) -> dict:
    """jobs: name -> (method, model). Each repeat times every job once, in turn (A B C A B C ...), so a slow
    spell of the shared CPU hits them all; the median over repeats is reported."""
    labels = torch.arange(rows) % 2
    times = {name: [] for name in jobs}
    for repeat in range(repeats + 1):  # the first round warms up and is not counted
        for name, (method, model) in jobs.items():
            start = time.perf_counter()
            for first in range(0, rows, batch):
                generator = torch.Generator(device=device).manual_seed(repeat * 1000 + first)
                method(model, labels[first : first + batch].to(device), generator)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if repeat:
                times[name].append(time.perf_counter() - start)
    return {name: rows / statistics.median(t) for name, t in times.items()}


def train_step_seconds(export: str) -> float | None:
    """From the training run of an export: batch size / measured training images per second."""
    run = Path(export).parent
    metrics, config = run / "metrics.json", run / "config.yaml"
    if not (metrics.is_file() and config.is_file()):
        return None
    speed = json.loads(metrics.read_text()).get("train_images_per_second")
    return OmegaConf.load(config).data.batch_size / speed if speed else None


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    tokenizer = load(args.tokenizer, "--tokenizer", args.device)
    if tokenizer.token_spec.grid is None:
        raise SystemExit(f"error: --tokenizer {args.tokenizer} makes 1D tokens; Token-Shuffle needs a grid")
    models = {
        s: load(args.generator_pattern.format(s=s), f"--generator-pattern (s={s})", args.device)
        for s in args.shuffles
    }
    for s, model in models.items():
        if model.shuffle != s or model.num_tokens != tokenizer.token_spec.num_tokens:
            raise SystemExit(
                f"error: the s={s} export has shuffle={model.shuffle} and {model.num_tokens} tokens; "
                f"expected shuffle={s} and the tokenizer's {tokenizer.token_spec.num_tokens}"
            )
    eval_cfg = gfid_config(args.tokenizer, [f"device={args.device}", *args.eval])
    extractor, weights = resolve_extractor(eval_cfg)  # trains photos-net first if missing
    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    methods = samplers(args.sjd_window, args.cfg_scale)
    num_classes = models[args.shuffles[0]].num_classes
    labels = class_balanced_labels(args.num_samples, num_classes)

    jobs = {(s, name): (method, model) for s, model in models.items() for name, method in methods.items()}
    speed = {
        batch: images_per_second(jobs, batch, args.timing_rows, args.repeats, args.device)
        for batch in args.batch_sizes
    }
    rows, noise = [], {}
    for (s, name), (method, model) in jobs.items():
        images, passes = sample(method, model, tokenizer, labels, args.seeds[0], 16, args.device)
        measured = quality(
            images, labels, out / "samples" / f"s{s}_{name}.npz", eval_cfg, extractor, weights, args.device
        )
        print(f"s={s} {name}: gFID {measured['gfid']:.2f}, {passes:.1f} passes per image", flush=True)
        for batch in args.batch_sizes:
            baseline = speed[batch][(args.shuffles[0], "ar")]
            rows.append(
                {
                    "shuffle": s,
                    "sampler": name,
                    "batch": batch,
                    "positions": model.num_positions,
                    "train_step_s": train_step_seconds(args.generator_pattern.format(s=s)),
                    "images_per_s": speed[batch][(s, name)],
                    "speedup_wall": speed[batch][(s, name)] / baseline,
                    "passes_per_image": passes,
                    **measured,
                }
            )
        if name == "ar":
            noise[s] = [measured["gfid"]]
            for seed in args.seeds[1:]:
                images, _ = sample(method, model, tokenizer, labels, seed, 16, args.device)
                path = out / "samples" / f"s{s}_ar_seed{seed}.npz"
                noise[s].append(
                    quality(images, labels, path, eval_cfg, extractor, weights, args.device)["gfid"]
                )
    report = {
        "rows": rows,
        "noise": {
            str(s): {"seeds": args.seeds, "gfid": values, "spread": max(values) - min(values)}
            for s, values in noise.items()
        },
        "settings": {
            "tokenizer": args.tokenizer,
            "generators": {str(s): args.generator_pattern.format(s=s) for s in args.shuffles},
            "cfg_scale": args.cfg_scale,
            "sjd_window": args.sjd_window,
            "num_samples": args.num_samples,
            "timing_rows": args.timing_rows,
            "repeats": args.repeats,
            "feature_extractor": extractor,
            "threads": args.threads,
            "device": args.device,
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)",
        },
    }
    write(report, out, args.results)
    return report


def markdown(report: dict) -> str:
    header = ["s", "sampler", "batch", "positions", "train step (s)", "images/s", "speed-up", "passes/image"]
    lines = [
        "| " + " | ".join([*header, "gFID", "cond. acc."]) + " |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        step = "-" if r["train_step_s"] is None else f"{r['train_step_s']:.3f}"
        cells = [r["shuffle"], r["sampler"], r["batch"], r["positions"], step, f"{r['images_per_s']:.1f}"]
        cells += [f"{r['speedup_wall']:.2f}x", f"{r['passes_per_image']:.1f}", f"{r['gfid']:.2f}"]
        cells += [f"{r['cond_accuracy']:.3f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    for s, entry in report["noise"].items():
        values = ", ".join(f"{g:.2f}" for g in entry["gfid"])
        lines.append(
            f"- s = {s}, plain decoding, seeds {entry['seeds']}: gFID {values} (spread {entry['spread']:.2f})"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in report["rows"]})
    figure, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    spread = report["noise"].get("1", {}).get("spread")
    for axis, batch in zip(axes[0], batches, strict=True):
        for r in (r for r in report["rows"] if r["batch"] == batch):
            marker = "o" if r["sampler"] == "ar" else "s"
            axis.scatter(r["speedup_wall"], r["gfid"], marker=marker, s=50)
            axis.annotate(
                f"s={r['shuffle']} {r['sampler']}",
                (r["speedup_wall"], r["gfid"]),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
        if spread is not None:
            base = next(r["gfid"] for r in report["rows"] if r["shuffle"] == 1 and r["sampler"] == "ar")
            axis.axhspan(base - spread, base + spread, color="grey", alpha=0.15, label="s=1 seed noise")
            axis.legend(loc="upper left", fontsize=8)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("speed-up over s=1 plain decoding (wall clock)")
        axis.set_ylabel("gFID (lower is better)")
        axis.set_title(f"batch {batch}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(report: dict, out: Path, results: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    (out / "token_shuffle.json").write_text(text)
    (out / "token_shuffle.md").write_text(markdown(report))
    plot(report, out / "token_shuffle.png")
    if results:
        Path(results).parent.mkdir(parents=True, exist_ok=True)
        Path(results).write_text(text)
    print(markdown(report))
    print(
        f"wrote {out / 'token_shuffle.json'}, token_shuffle.md, token_shuffle.png"
        + (f" and {results}" if results else "")
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        write(report, Path(args.out), None)
        return report
    return run(args)


if __name__ == "__main__":
    main()
