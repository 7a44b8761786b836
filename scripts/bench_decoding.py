"""Benchmark every decoding method on one generator: speed against plain cached decoding, and sample quality.

    python scripts/bench_decoding.py     # gpt_quickstart drafted by gpt_draft_quickstart, titok_quickstart
    python scripts/bench_decoding.py --draft /tmp/draft/export --num-samples 68 --timing-rows 4 \
        --lantern-deltas 0.1 --sjd-windows 8                      # a quick check (about a minute)
    python scripts/bench_decoding.py --eval reference_samples=5000   # settings of configs/evaluate.yaml

Methods (sampling/): ar (plain autoregressive decoding with the KV cache, the baseline), speculative (exact,
drafted by --draft, --gamma drafts per pass), LANTERN at each --lantern-deltas (k = --lantern-k latent
neighbours), LANTERN++ at one (k, lambda), SJD at each --sjd-windows (uniform init), SJD with copy_left
init and GSD (grouped acceptance) at L = --jacobi-window. Every method uses --cfg-scale (guidance on target
and draft alike), the same class-balanced labels and the same per-batch seeds (as scripts/sample.py
derives them).

What each number means:
- passes/image: target forward passes to make one image (prefill included, as sampling/ar.py counts them);
  a pass runs the whole batch, so it is the mean over batches of the passes each batch needed, measured on
  the quality samples (batch --sample-batch-size; rows of a batch share one cache length, so bigger batches
  need a few more passes, see sampling/speculative.py). ar needs N. Speculative methods also run the draft:
  "+ d draft" counts its passes, each cheaper than a target pass (the JSON gives the draft's share of the
  target's parameters).
- tokens/pass: new tokens per target pass per row (N / passes); acceptance: accepted drafts / tested
  drafts (the JSON also has accepted drafts per pass).
- speed-up at batch B: median sampler wall time of ar / that of the method, timing the same --timing-rows
  images (rounded up to whole batches) in batches of B; the JSON also has images/s and the passes at that
  batch size. Tokenizer decoding is the same for every method and is not timed.
- gFID, IS, cond. accuracy: scripts/evaluate.py's gfid mode on the --num-samples decoded samples of each
  method (its `evaluate_gfid`, with configs/evaluate.yaml and any --eval overrides): samples against the
  cached statistics of training crops (photos-net without an Inception weights file), and the share of
  samples photos-net assigns to their class. Numbers from a few hundred samples are biased upwards:
  compare them only with each other.
- noise floor: gFID of plain decoding at each of --seeds (other per-batch seeds, same labels); the spread
  (max - min) is how much gFID moves by sampling noise alone. A method whose gFID differs from plain
  decoding's by no more than the spread is "within noise". Exact methods (speculative, SJD) sample the
  target's own distribution and should be; LANTERN and GSD trade some of it for speed. Two seeds make a
  rough floor: on gpt_quickstart with 510 samples, seeds 0 and 1 differ by 0.04 while seeds 0-5 span 0.6;
  more --seeds give a firmer one (each costs one plain-decoding gFID, a few seconds of CPU).

Why timing is interleaved: on shared CPUs the speed of the machine drifts with other jobs. Each method is
warmed up once, then every repeat times all methods one after another (A B C ... A B C ...), ar among
them, and each method's time is the median over repeats: a slow spell hits every method, not one, and the
ratios stay meaningful where absolute times do not. CPU runs use one thread unless --threads says so.

Writes decoding.json (every number, the settings and the environment), decoding.md (one table),
decoding.png (speed-up at batch 1 against gFID) and samples/<method>.npz (the evaluated samples) to --out.
The defaults take about 7 minutes of one CPU core on gpt_quickstart (9 minutes of wall time with other jobs
on the 2 cores): 2/3 sampling and gFID, 1/3 timing. Peak memory about 1.1 GB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sampling import (  # noqa: E402
    batch_seed,
    class_balanced_labels,
    sample_ar,
    sample_jacobi,
    sample_speculative,
    tokenizer_neighbours,
)
from scripts.evaluate import evaluate_gfid, resolve_extractor  # noqa: E402
from tokenizers_vis.base import Tokens, from_pretrained  # noqa: E402
from training.config import ConfigError, compose_config  # noqa: E402
from training.data import to_uint8  # noqa: E402

MAKE = {  # argument -> the command that makes its default export
    "--generator": "python train.py +experiment=gpt_quickstart",
    "--draft": "python train.py +experiment=gpt_draft_quickstart",
    "--tokenizer": "python train.py +experiment=titok_quickstart",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--generator", default="runs/gpt_quickstart/export", help="exported target GPT")
    add(
        "--draft",
        default="runs/gpt_draft_quickstart/export",
        help="exported draft GPT (speculative, LANTERN)",
    )
    add("--tokenizer", default="runs/titok_quickstart/export", help="exported tokenizer of the GPTs' codes")
    add("--num-samples", type=int, default=510, help="samples per method for gFID (510 = 30 per class of 17)")
    add("--sample-batch-size", type=int, default=16, help="batch of the quality samples")
    add("--cfg-scale", type=float, default=2.0, help="guidance of every method (the demo's setting)")
    add("--batch-sizes", type=int, nargs="+", default=[1, 16], help="batch sizes timed")
    add(
        "--timing-rows",
        type=int,
        nargs="+",
        default=[32, 64],
        help="images timed per repeat at each batch size (one value, or one per batch size; rounded up to "
        "whole batches)",
    )
    add("--repeats", type=int, default=5, help="timed repeats of every method per batch size (median)")
    add("--gamma", type=int, default=4, help="drafts per pass of speculative and LANTERN")
    add("--lantern-deltas", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    add("--lantern-k", type=int, default=1000, help="LANTERN's latent neighbours per code (capped at V - 1)")
    add("--lantern-pp", type=float, nargs=2, default=[10, 5], metavar=("K", "LAMBDA"), help="LANTERN++ point")
    add(
        "--sjd-windows",
        type=int,
        nargs="+",
        default=[4, 8, 16, 32],
        help="SJD window lengths L (uniform init)",
    )
    add("--jacobi-window", type=int, default=16, help="L of SJD copy_left and GSD")
    add("--gsd-group-size", type=int, default=8, help="GSD's group: the draft and its G - 1 nearest codes")
    add(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1],
        help="plain decoding at each seed gives the noise floor; the first seeds every method",
    )
    add(
        "--eval",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of configs/evaluate.yaml, as scripts/evaluate.py takes them (reference_samples, "
        "feature_net.root, cache_root, extractor, ...)",
    )
    add("--out", default="runs/bench/decoding")
    add(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads; 1 by default, as extra threads spin against other jobs on shared cores "
        "and distort timings (0: torch's default)",
    )
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if len(args.timing_rows) == 1:
        args.timing_rows = args.timing_rows * len(args.batch_sizes)
    if len(args.timing_rows) != len(args.batch_sizes):
        parser.error("--timing-rows takes one value, or one per --batch-sizes")
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least two seeds (the noise floor is their gFID spread)")
    return args


# ----------------------------------------------------------------------------- methods
@dataclass
class Method:
    name: str  # unique key of the JSON
    family: str  # ar | speculative | lantern | lantern++ | sjd | gsd: the line it belongs to in the plot
    settings: dict  # what the table and JSON show
    sample: callable  # (labels, generator) -> SampleResult
    exact: bool  # samples the target's own distribution
    sweep: str | None = None  # the swept setting, for the plot's annotations
    results: dict = field(default_factory=dict)


def load_export(path: str, argument: str, device: str):
    if not (Path(path) / "config.json").is_file():
        raise SystemExit(
            f"error: {argument} {path} is not an exported model folder (no config.json); "
            f"make it with `{MAKE[argument]}` or pass {argument} <folder>"
        )
    return from_pretrained(path, device=device)


def build_methods(args, target, draft, tokenizer) -> list[Method]:
    """Every method of the benchmark, in table order, each a closure over its models and settings."""
    guidance = dict(cfg_scale=args.cfg_scale)

    def neighbours(k):
        return tokenizer_neighbours(args.tokenizer, k, tokenizer=tokenizer).to(args.device)

    def spec(**kw):
        return lambda labels, gen: sample_speculative(
            target, draft, labels, gamma=args.gamma, generator=gen, **guidance, **kw
        )

    def jacobi(**kw):
        return lambda labels, gen: sample_jacobi(target, labels, generator=gen, **guidance, **kw)

    ar = lambda labels, gen: sample_ar(target, labels, generator=gen, **guidance)
    methods = [Method("ar", "ar", {"kv_cache": True}, ar, exact=True)]
    methods.append(Method("speculative", "speculative", {"gamma": args.gamma}, spec(), exact=True))
    near = neighbours(args.lantern_k)
    for delta in args.lantern_deltas:
        settings = {"gamma": args.gamma, "k": near.shape[1], "delta": delta}
        run = spec(acceptance="lantern", lantern_delta=delta, neighbours=near)
        methods.append(Method(f"lantern_d{delta:g}", "lantern", settings, run, exact=False, sweep="delta"))
    k, lam = int(args.lantern_pp[0]), args.lantern_pp[1]
    near_pp = neighbours(k)
    settings = {"gamma": args.gamma, "k": near_pp.shape[1], "lambda": lam}
    run = spec(acceptance="lantern", lantern_lambda=lam, neighbours=near_pp)
    methods.append(Method(f"lantern++_k{k}_l{lam:g}", "lantern++", settings, run, exact=False))
    for window in args.sjd_windows:
        run = jacobi(window=window, init="uniform")
        settings = {"L": window, "init": "uniform"}
        methods.append(Method(f"sjd_L{window}", "sjd", settings, run, exact=True, sweep="L"))
    window = args.jacobi_window
    run = jacobi(window=window, init="copy_left")
    settings = {"L": window, "init": "copy_left"}
    methods.append(Method(f"sjd_copy_left_L{window}", "sjd copy_left", settings, run, exact=True))
    group = args.gsd_group_size
    run = jacobi(window=window, grouped=True, neighbours=neighbours(group), group_size=group)
    settings = {"L": window, "group_size": group}
    methods.append(Method(f"gsd_G{group}_L{window}", "gsd", settings, run, exact=False))
    return methods


def batches(num_rows: int, batch_size: int) -> list[range]:
    return [range(i, min(i + batch_size, num_rows)) for i in range(0, num_rows, batch_size)]


def mean_stats(weighted: list[tuple[dict, int]]) -> dict:
    """Numeric sampler stats averaged over batches, weighted by batch size (as scripts/sample.py does)."""
    total = sum(size for _, size in weighted)
    keys = [k for k, v in weighted[0][0].items() if isinstance(v, int | float) and k != "wall_time"]
    return {k: sum(stats.get(k, 0) * size for stats, size in weighted) / total for k in keys}


# ----------------------------------------------------------------------------- quality
def sample_images(method: Method, labels, seed, batch_size, tokenizer, token_kind, device) -> tuple:
    """All `labels` sampled by `method` and decoded -> (uint8 images (N, H, W, 3), mean sampler stats)."""
    images, weighted = [], []
    for rows in batches(len(labels), batch_size):
        generator = torch.Generator(device=device).manual_seed(batch_seed(seed, rows.start))
        result = method.sample(labels[rows.start : rows.stop].to(device), generator)
        with torch.no_grad():
            images.append(to_uint8(tokenizer.decode(Tokens(token_kind, result.tokens))))
        weighted.append((result.stats, len(rows)))
    return np.concatenate(images), mean_stats(weighted)


def quality(images, labels, path: Path, eval_cfg, extractor, weights, device) -> dict:
    """scripts/evaluate.py's gfid on the samples (written to `path` as scripts/sample.py writes them)."""
    np.savez(path, images=images, labels=labels.numpy())
    eval_cfg.samples = str(path)
    torch.manual_seed(eval_cfg.seed)  # as evaluate.run does, for reference crops drawn from torch's RNG
    metrics = evaluate_gfid(eval_cfg, extractor, weights, device)
    return {
        "gfid": metrics[f"fid[{extractor}]"],
        "is": metrics[f"is[{extractor}]"],
        "cond_accuracy": metrics.get("cond_accuracy"),
        "metrics": metrics,
    }


# ----------------------------------------------------------------------------- timing
def time_methods(methods: list[Method], batch: int, rows: int, num_classes: int, args) -> dict:
    """Median sampler wall time over interleaved repeats of every method on the same labels and seeds."""
    labels = class_balanced_labels(rows, num_classes).to(args.device)
    chunks = batches(rows, batch)

    def run(method):
        elapsed, weighted = 0.0, []
        for chunk in chunks:
            generator = torch.Generator(device=args.device).manual_seed(
                batch_seed(args.seeds[0], chunk.start)
            )
            result = method.sample(labels[chunk.start : chunk.stop], generator)
            elapsed += result.stats["wall_time"]
            weighted.append((result.stats, len(chunk)))
        return elapsed, mean_stats(weighted)

    for method in methods:  # warm-up: one batch each
        generator = torch.Generator(device=args.device).manual_seed(batch_seed(args.seeds[0], 0))
        method.sample(labels[:batch], generator)
    times = {m.name: [] for m in methods}
    stats = {}
    steps = [(r, m) for r in range(args.repeats) for m in methods]  # A B C ... A B C ...
    for _, method in tqdm(steps, desc=f"timing batch {batch}", unit="run", leave=False):
        elapsed, stats[method.name] = run(method)
        times[method.name].append(elapsed)
    baseline = statistics.median(times["ar"])
    out = {}
    for method in methods:
        median = statistics.median(times[method.name])
        out[method.name] = {
            "batch": batch,
            "rows": rows,
            "wall_time": median,
            "wall_times": times[method.name],
            "images_per_s": rows / median,
            "speedup": baseline / median,
            "forward_passes": stats[method.name]["forward_passes"],
            "tokens_per_pass": stats[method.name]["tokens_per_pass"],
        }
    return out


# ----------------------------------------------------------------------------- reports
def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def settings_text(method: dict) -> str:
    parts = [f"{k}={v}" for k, v in method["settings"].items() if k != "kv_cache"]
    return ", ".join(parts + ["exact" if method["exact"] else "approx."])


def markdown(report: dict) -> str:
    floor = report["noise_floor"]
    batch_sizes = report["settings"]["batch_sizes"]
    sample_batch = report["settings"]["sample_batch_size"]
    header = ["method", "settings", f"passes/image (b{sample_batch})", "tokens/pass", "acceptance"]
    header += [f"speed-up b{b}" for b in batch_sizes] + ["gFID", "IS", "cond. acc.", "within noise?"]
    s = report["settings"]
    lines = [
        f"Decoding methods on {s['generator']} (draft {s['draft']}, tokenizer {s['tokenizer']}): "
        f"cfg {s['cfg_scale']}, {s['num_samples']} samples per method (batch {s['sample_batch_size']}) "
        f"against {report['reference']}; gFID = fid[{report['feature_extractor']}]. Speed-up = median "
        f"sampler wall time of ar / the method's at that batch size ({report['environment']['device']}, "
        f"{report['environment']['torch_threads']} thread(s)). Noise floor: plain decoding at seeds "
        f"{floor['seeds']} gives gFID {', '.join(f'{g:.2f}' for g in floor['gfid'])}, spread "
        f"{floor['spread']:.2f}. A draft pass costs about {report['draft_param_ratio']:.2f} of a target "
        "pass in parameters.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", ":---"] + ["---:"] * (len(header) - 3) + [":---:"]) + "|",
    ]
    for name, m in report["methods"].items():
        q = m["quality"]
        passes = f"{q['forward_passes']:.1f}"
        if q.get("draft_forward_passes") is not None:
            passes += f" (+{q['draft_forward_passes']:.1f} draft)"
        acceptance = fmt(q.get("acceptance_rate"), ".2f")
        speedups = [f"{m['timing'][str(b)]['speedup']:.2f}x" for b in batch_sizes]
        cells = [name, settings_text(m), passes, f"{q['tokens_per_pass']:.2f}", acceptance, *speedups]
        cells += [f"{q['gfid']:.2f}", f"{q['is']:.2f}", fmt(q["cond_accuracy"], ".3f"), m["within_noise"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = report["settings"]["batch_sizes"][0] if 1 not in report["settings"]["batch_sizes"] else 1
    floor = report["noise_floor"]
    base = report["methods"]["ar"]["quality"]["gfid"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.axhspan(
        base - floor["spread"], base + floor["spread"], color="grey", alpha=0.2, label="ar gFID ± spread"
    )
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    families: dict[str, list] = {}
    for name, m in report["methods"].items():
        families.setdefault(m["family"], []).append((name, m))
    markers = iter("osD^v<>ph*X")
    for family, members in families.items():
        xs = [m["timing"][str(batch)]["speedup"] for _, m in members]
        ys = [m["quality"]["gfid"] for _, m in members]
        style = "-" if len(members) > 1 else ""
        ax.plot(xs, ys, style + next(markers), label=family, markersize=7)
        for (_, m), x, y in zip(members, xs, ys, strict=True):
            if m["sweep"]:
                label = f"{m['sweep']}={m['settings'][m['sweep']]}"
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"speed-up over plain cached decoding at batch {batch} (wall clock)")
    ax.set_ylabel(
        f"gFID[{report['feature_extractor']}] ({report['settings']['num_samples']} samples), lower is better"
    )
    ax.set_title(f"Decoding: speed against quality (cfg {report['settings']['cfg_scale']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(args) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        env["load_average_at_start"] = os.getloadavg()[0]
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(args.device)
    return env


# ----------------------------------------------------------------------------- main
def run(args) -> dict:
    start, cpu_start = time.perf_counter(), time.process_time()
    env = environment(args)
    target = load_export(args.generator, "--generator", args.device)
    draft = load_export(args.draft, "--draft", args.device)
    tokenizer = load_export(args.tokenizer, "--tokenizer", args.device)
    token_spec = tokenizer.token_spec
    if (token_spec.vocab_size, token_spec.num_tokens) != (target.config["vocab_size"], target.num_tokens):
        raise SystemExit(
            f"error: --generator makes {target.num_tokens} tokens over {target.config['vocab_size']} codes, "
            f"--tokenizer {args.tokenizer} decodes {token_spec.num_tokens} over {token_spec.vocab_size}"
        )
    eval_cfg = compose_config(["mode=gfid", f"device={args.device}", *args.eval], "evaluate")
    extractor, weights = resolve_extractor(eval_cfg)  # trains photos-net first if missing: before sampling
    num_classes, token_kind = target.config["num_classes"], target.config.get("token_kind", "categorical")
    methods = build_methods(args, target, draft, tokenizer)

    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    labels = class_balanced_labels(args.num_samples, num_classes)
    sample_args = (args.sample_batch_size, tokenizer, token_kind, args.device)
    evaluate_args = (eval_cfg, extractor, weights, args.device)
    floor_gfid, reference = [], None
    for method in tqdm(methods, desc="sampling + gFID", unit="method"):
        images, stats = sample_images(method, labels, args.seeds[0], *sample_args)
        measured = quality(images, labels, out / "samples" / f"{method.name}.npz", *evaluate_args)
        method.results["quality"] = {**stats, **measured}
        reference = measured["metrics"]["reference"]
    ar = methods[0]
    floor_gfid.append(ar.results["quality"]["gfid"])
    for seed in tqdm(args.seeds[1:], desc="noise floor (ar)", unit="seed"):
        images, _ = sample_images(ar, labels, seed, *sample_args)
        path = out / "samples" / f"ar_seed{seed}.npz"
        floor_gfid.append(quality(images, labels, path, *evaluate_args)["gfid"])
    spread = max(floor_gfid) - min(floor_gfid)

    for batch, rows in zip(args.batch_sizes, args.timing_rows, strict=True):
        rows = math.ceil(rows / batch) * batch
        timings = time_methods(methods, batch, rows, num_classes, args)
        for method in methods:
            method.results.setdefault("timing", {})[str(batch)] = timings[method.name]

    def count(model):
        return sum(p.numel() for p in model.parameters())

    report = {
        "settings": dict(vars(args)),
        "environment": env,
        "feature_extractor": extractor,
        "feature_extractor_weights": str(weights),
        "reference": reference,
        "num_tokens": target.num_tokens,
        "target_params": count(target),
        "draft_params": count(draft),
        "draft_param_ratio": count(draft) / count(target),
        "noise_floor": {"seeds": args.seeds, "gfid": floor_gfid, "spread": spread},
        "methods": {},
    }
    for m in methods:
        difference = m.results["quality"]["gfid"] - floor_gfid[0]
        within = "baseline" if m is ar else ("yes" if abs(difference) <= spread else "no")
        report["methods"][m.name] = {
            "family": m.family,
            "settings": m.settings,
            "exact": m.exact,
            "sweep": m.sweep,
            "quality": m.results["quality"],
            "gfid_minus_ar": difference,
            "within_noise": within,
            "timing": m.results["timing"],
        }
    report["wall_time_s"] = time.perf_counter() - start
    report["cpu_time_s"] = time.process_time() - cpu_start  # ~ the wall time on idle cores (1 thread)
    (out / "decoding.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "decoding.md").write_text(table)
    plot(report, out / "decoding.png")
    print(table, end="")
    print(f"written: {out}/decoding.{{json,md,png}} in {report['wall_time_s']:.0f} s")
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    except (ConfigError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
