"""Benchmark every decoding method on one generator, in one run: passes, wall-clock speed-up over plain
cached decoding at batch 1 and 16, sample quality with its seed noise, and where a speed-up can hold.

    python scripts/bench_decoding.py    # gpt_quickstart; drafters gpt_draft_quickstart, eagle_quickstart
    python scripts/bench_decoding.py --results docs/results/decoding.json     # the README's data
    python scripts/bench_decoding.py --num-samples 68 --timing-rows 4 --repeats 2 --skip-pass-cost  # quick
    python scripts/bench_decoding.py --replot docs/results/decoding.json --out docs  # tables + plot again

Methods (sampling/): ar (plain autoregressive decoding with the KV cache, the baseline); speculative with
the small-GPT drafter (--draft) and with the EAGLE drafter (--eagle), --gamma drafts per pass; LANTERN with
the EAGLE drafter at each --lantern-deltas and with the GPT drafter at the first; LANTERN++ at one (k,
lambda); SJD at each --sjd-windows (uniform init); at L = --jacobi-window SJD with draft reuse (SJD++),
with copy_left init, and GSD. Every method uses --cfg-scale (guidance on target and drafter alike), the
same class-balanced labels and the same per-batch seeds (as scripts/sample.py derives them); every row of
a batch has its own KV-cache length (sampling/engine.py).

The numbers (decoding.json, and the README's docs/results/decoding.json with --results):
1. Per method and batch size (1 and 16; `rows`): passes_per_image (target passes each image took part in,
   prefill included: a row leaves its batch when done), tokens_per_pass (N / passes_per_image),
   acceptance, draft_passes_per_image, speedup_wall (median wall time of ar / the method's, timing the same
   --timing-rows images in batches of that size, interleaved A B C ... A B C so a slow spell of the
   shared CPU hits every method), and, from --num-samples images sampled at --sample-batch-size, gFID, IS
   and conditional accuracy (scripts/evaluate.py's gfid: photos-net without an Inception weights file),
   and `exact` (samples the target's own distribution). Tokenizer decoding is the same for every method
   and is not timed.
2. noise_floor: gFID of plain decoding at each of --seeds (at least 4): its spread (max - min) is what
   sampling noise alone moves gFID by; "within noise" = within the spread of seed 0's gFID.
3. step_cost: on the benchmarked models, one target pass of k = 1 and k = the methods' windows, and one
   call of each drafter, at each batch size (seconds and ratio to the k = 1 target step).
4. pass_cost: one decode pass of k = --pass-cost-k new tokens on a GPT-B (111M parameters, 256 tokens,
   16,384 codes, random weights) at batch 1 and 16 with guidance, as a ratio to k = 1: near 1 the pass is
   memory-bound (verifying k tokens is nearly free), near k it is compute-bound (a window costs k steps
   and no windowed method can win).
5. projection: a projected GPT-B wall-clock per image for each method: its measured passes_per_image x the
   GPT-B cost of its pass (and its drafter calls x the cost of a GPT-B-sized drafter call), divided by the
   batch: a projection from measured pieces, not a measurement.

Writes decoding.json, decoding.md (tables) and decoding.png (speed-up against gFID at each batch size) to
--out, and with --results also the committed data file; --replot redraws decoding.md and decoding.png
from such a file without running anything. CPU runs use one thread unless --threads says so.
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

from generators import GPT, EagleDrafter  # noqa: E402
from sampling import (  # noqa: E402
    batch_seed,
    class_balanced_labels,
    sample_ar,
    sample_jacobi,
    sample_speculative,
    tokenizer_neighbours,
)
from tokenizers_vis.base import Tokens, from_pretrained  # noqa: E402
from training.config import ConfigError  # noqa: E402
from training.data import to_uint8  # noqa: E402
from training.evaluation import evaluate_gfid, gfid_config, resolve_extractor  # noqa: E402

MAKE = {  # argument -> the command that makes its default export
    "--generator": "python train.py +experiment=gpt_quickstart",
    "--draft": "python train.py +experiment=gpt_draft_quickstart",
    "--eagle": "python train.py +experiment=eagle_quickstart",
    "--tokenizer": "python train.py +experiment=titok_quickstart",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--generator", default="runs/gpt_quickstart/export", help="exported target GPT")
    add("--draft", default="runs/gpt_draft_quickstart/export", help="exported small draft GPT")
    add("--eagle", default="runs/eagle_quickstart/export", help="exported EAGLE drafter of the generator")
    add("--tokenizer", default="runs/titok_quickstart/export", help="exported tokenizer of the GPTs' codes")
    add("--num-samples", type=int, default=510, help="samples per method for gFID (510 = 30 per class of 17)")
    add("--sample-batch-size", type=int, default=16, help="batch of the quality samples")
    add("--cfg-scale", type=float, default=2.0, help="guidance of every method (the demo's setting)")
    add("--batch-sizes", type=int, nargs="+", default=[1, 16], help="batch sizes timed")
    add(
        "--timing-rows",
        type=int,
        nargs="+",
        default=[64, 64],
        help="images timed per repeat at each batch size (one value, or one per batch size; rounded up to "
        "whole batches)",
    )
    add("--repeats", type=int, default=5, help="timed repeats of every method per batch size (median)")
    add("--gamma", type=int, default=4, help="drafts per pass of speculative and LANTERN")
    add("--lantern-deltas", type=float, nargs="+", default=[0.1, 0.2], help="with the EAGLE drafter")
    add("--lantern-k", type=int, default=1000, help="LANTERN's latent neighbours per code (capped at V - 1)")
    add("--lantern-pp", type=float, nargs=2, default=[10, 5], metavar=("K", "LAMBDA"), help="LANTERN++ point")
    add("--sjd-windows", type=int, nargs="+", default=[4, 8, 16], help="SJD window lengths L (uniform init)")
    add("--jacobi-window", type=int, default=16, help="L of SJD with reuse, SJD copy_left and GSD")
    add("--gsd-group-size", type=int, default=8, help="GSD's group: the draft and its G - 1 nearest codes")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="plain decoding at each: the noise floor")
    add("--pass-cost-k", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="k of the GPT-B pass table")
    add("--pass-cost-repeats", type=int, default=3)
    add("--skip-pass-cost", action="store_true", help="no GPT-B pass table and projection (quick runs)")
    add("--compile", action="store_true", help="also time every method with compile=true (torch.compile)")
    add(
        "--eval",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of configs/evaluate.yaml, as scripts/evaluate.py takes them (reference_samples, "
        "feature_net.root, cache_root, extractor, ...)",
    )
    add("--out", default="runs/bench/decoding")
    add("--results", default=None, help="also write the rows, pass costs and projection here (JSON)")
    add("--replot", default=None, metavar="RESULTS", help="only redraw decoding.{md,png} from --results")
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
    family: str  # the line it belongs to in the plot
    settings: dict  # what the table and JSON show
    sample: callable  # (labels, generator, compile=False) -> SampleResult
    exact: bool  # samples the target's own distribution
    window: int = 1  # tokens per target pass (its verification width)
    drafter: str | None = None  # gpt | eagle
    sweep: str | None = None  # the swept setting, for the plot's annotations
    results: dict = field(default_factory=dict)


def load_export(path: str, argument: str, device: str):
    if not (Path(path) / "config.json").is_file():
        raise SystemExit(
            f"error: {argument} {path} is not an exported model folder (no config.json); "
            f"make it with `{MAKE[argument]}` or pass {argument} <folder>"
        )
    return from_pretrained(path, device=device)


def build_methods(args, target, draft, eagle, tokenizer) -> list[Method]:
    """Every method of the benchmark, in table order, each a closure over its models and settings."""
    guidance = dict(cfg_scale=args.cfg_scale)
    gamma = args.gamma

    def neighbours(k):
        return tokenizer_neighbours(args.tokenizer, k, tokenizer=tokenizer).to(args.device)

    def spec(drafter, **kw):
        return lambda labels, gen, compile=False: sample_speculative(
            target, drafter, labels, gamma=gamma, generator=gen, compile=compile, **guidance, **kw
        )

    def jacobi(**kw):
        return lambda labels, gen, compile=False: sample_jacobi(
            target, labels, generator=gen, compile=compile, **guidance, **kw
        )

    ar = lambda labels, gen, compile=False: sample_ar(
        target, labels, generator=gen, compile=compile, **guidance
    )
    spec_window = dict(window=gamma + 1)
    methods = [Method("ar", "ar", {"kv_cache": True}, ar, exact=True)]
    methods.append(
        Method(
            "speculative_gpt",
            "speculative",
            {"gamma": gamma},
            spec(draft),
            True,
            **spec_window,
            drafter="gpt",
        )
    )
    methods.append(
        Method(
            "speculative_eagle",
            "speculative",
            {"gamma": gamma},
            spec(eagle),
            True,
            **spec_window,
            drafter="eagle",
        )
    )
    near = neighbours(args.lantern_k)
    first = args.lantern_deltas[0]
    for drafter, model, deltas in (("gpt", draft, [first]), ("eagle", eagle, args.lantern_deltas)):
        for delta in deltas:
            settings = {"gamma": gamma, "k": near.shape[1], "delta": delta}
            run = spec(model, acceptance="lantern", lantern_delta=delta, neighbours=near)
            name = f"lantern_{drafter}_d{delta:g}"
            methods.append(
                Method(
                    name,
                    f"lantern ({drafter})",
                    settings,
                    run,
                    False,
                    **spec_window,
                    drafter=drafter,
                    sweep="delta",
                )
            )
    k, lam = int(args.lantern_pp[0]), args.lantern_pp[1]
    near_pp = neighbours(k)
    settings = {"gamma": gamma, "k": near_pp.shape[1], "lambda": lam}
    run = spec(eagle, acceptance="lantern", lantern_lambda=lam, neighbours=near_pp)
    methods.append(
        Method(
            f"lantern++_eagle_k{k}_l{lam:g}",
            "lantern++",
            settings,
            run,
            False,
            **spec_window,
            drafter="eagle",
        )
    )
    for window in args.sjd_windows:
        settings = {"L": window, "init": "uniform"}
        run = jacobi(window=window, init="uniform")
        methods.append(Method(f"sjd_L{window}", "sjd", settings, run, True, window=window + 1, sweep="L"))
    window = args.jacobi_window
    run = jacobi(window=window, init="uniform", reuse_drafts=True)
    settings = {"L": window, "init": "uniform", "reuse_drafts": True}
    methods.append(Method(f"sjd_reuse_L{window}", "sjd reuse", settings, run, True, window=window + 1))
    run = jacobi(window=window, init="copy_left")
    settings = {"L": window, "init": "copy_left"}
    methods.append(
        Method(f"sjd_copy_left_L{window}", "sjd copy_left", settings, run, True, window=window + 1)
    )
    group = args.gsd_group_size
    run = jacobi(window=window, grouped=True, neighbours=neighbours(group), group_size=group)
    settings = {"L": window, "group_size": group}
    methods.append(Method(f"gsd_G{group}_L{window}", "gsd", settings, run, False, window=window + 1))
    return methods


def batches(num_rows: int, batch_size: int) -> list[range]:
    return [range(i, min(i + batch_size, num_rows)) for i in range(0, num_rows, batch_size)]


def mean_stats(weighted: list[tuple[dict, int]]) -> dict:
    """Numeric sampler stats averaged over batches, weighted by batch size (as scripts/sample.py does)."""
    total = sum(size for _, size in weighted)
    keys = [k for k, v in weighted[0][0].items() if isinstance(v, int | float) and k != "wall_time"]
    return {k: sum(stats.get(k, 0) * size for stats, size in weighted) / total for k in keys}


def per_image(stats: dict, num_tokens: int) -> dict:
    """The sampler stats a table shows, per image (draft passes: drafter calls of the batch per row)."""
    out = {
        "passes_per_image": stats["passes_per_row"],
        "batch_passes": stats["forward_passes"],
        "tokens_per_pass": num_tokens / stats["passes_per_row"],
        "acceptance": stats.get("acceptance_rate"),
    }
    if "draft_forward_passes" in stats:
        out["draft_passes_per_image"] = stats["draft_forward_passes"]
    return out


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
def time_methods(
    methods: list[Method],
    batch: int,
    rows: int,
    num_classes: int,
    num_tokens: int,
    args,
    compile: bool = False,
) -> dict:
    """Median sampler wall time over interleaved repeats of every method on the same labels and seeds
    (compile: every sampler with compile=True, after a warm-up that compiles it)."""
    labels = class_balanced_labels(rows, num_classes).to(args.device)
    chunks = batches(rows, batch)

    def run(method):
        elapsed, weighted = 0.0, []
        for chunk in chunks:
            generator = torch.Generator(device=args.device).manual_seed(
                batch_seed(args.seeds[0], chunk.start)
            )
            result = method.sample(labels[chunk.start : chunk.stop], generator, compile=compile)
            elapsed += result.stats["wall_time"]
            weighted.append((result.stats, len(chunk)))
        return elapsed, mean_stats(weighted)

    for method in methods:  # warm-up: every batch once (compiles every shape a compiled run meets)
        run(method)
    times = {m.name: [] for m in methods}
    stats = {}
    steps = [(r, m) for r in range(args.repeats) for m in methods]  # A B C ... A B C ...
    desc = f"timing batch {batch}" + (" (compiled)" if compile else "")
    for _, method in tqdm(steps, desc=desc, unit="run", leave=False):
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
            "speedup_wall": baseline / median,
            **per_image(stats[method.name], num_tokens),
        }
    return out


@torch.no_grad()
def time_call(call, repeats: int, device: str) -> float:
    """Median seconds of `call()` (after one warm-up call)."""
    call()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def pass_costs(model, batch: int, ks, repeats: int, device: str, guided: bool = True) -> dict[int, float]:
    """Seconds of one decode pass of k new tokens per row at the middle of the sequence, for each k: the
    cache holds N / 2 positions; rows = 2 x batch with guidance."""
    rows = 2 * batch if guided else batch
    middle = model.num_tokens // 2
    model.setup_cache(rows, max_len=model.num_tokens + max(ks) + 1)
    labels = torch.zeros(rows, dtype=torch.long, device=device)
    model.prefill(labels)
    model.decode(torch.zeros(rows, middle - 1, dtype=torch.long, device=device))
    out = {}
    for k in ks:
        tokens = torch.zeros(rows, k, dtype=torch.long, device=device)

        def step(tokens=tokens):
            model.truncate_cache(middle)
            model.logits(model.decode(tokens))  # the head is part of every pass

        out[k] = time_call(step, repeats, device)
    model.clear_cache()
    return out


@torch.no_grad()
def drafter_call_cost(drafter, target, batch: int, k: int, repeats: int, device: str) -> float:
    """Seconds of one call of a drafter for k tokens per row at the middle of the sequence (with the head
    that turns its output into q), rows = 2 x batch (guidance)."""
    rows, middle = 2 * batch, target.num_tokens // 2
    tokens = torch.zeros(rows, k, dtype=torch.long, device=device)
    if isinstance(drafter, EagleDrafter):
        drafter.bind(target)
        drafter.setup_cache(rows, max_len=target.num_tokens + k + 1)
        width = target.width
        drafter.decode(tokens[:, :1].expand(-1, middle), torch.zeros(rows, middle, width, device=device))
        features = torch.zeros(rows, k, width, device=device)

        def step():
            drafter.truncate_cache(middle)
            drafter.logits(drafter.decode(tokens, features))

    else:
        drafter.setup_cache(rows, max_len=drafter.num_tokens + k + 1)
        drafter.prefill(torch.zeros(rows, dtype=torch.long, device=device))
        drafter.decode(torch.zeros(rows, middle - 1, dtype=torch.long, device=device))

        def step():
            drafter.truncate_cache(middle)
            drafter.logits(drafter.decode(tokens))

    seconds = time_call(step, repeats, device)
    drafter.clear_cache()
    return seconds


def step_costs(methods, target, draft, eagle, args) -> dict:
    """On the benchmarked models: a target pass of each window width and one call of each drafter."""
    widths = sorted({1, *(m.window for m in methods)})
    out = {}
    for batch in args.batch_sizes:
        target_cost = pass_costs(target, batch, widths, 20, args.device)
        base = target_cost[1]
        entry = {"target": {str(k): {"seconds": s, "ratio": s / base} for k, s in target_cost.items()}}
        for name, drafter in (("gpt", draft), ("eagle", eagle)):
            seconds = drafter_call_cost(drafter, target, batch, 1, 20, args.device)
            entry[f"drafter_{name}"] = {"seconds": seconds, "ratio": seconds / base}
        out[str(batch)] = entry
    return out


def gpt_b_costs(methods, args) -> dict:
    """The GPT-B pass table and the per-call costs the projection needs (random weights, seeded)."""
    torch.manual_seed(0)
    gpt_b = GPT(16384, 256, 1000, grid=(16, 16), size="B").to(args.device).eval()
    drafter = EagleDrafter.for_target(gpt_b).to(args.device).eval()
    small = GPT(16384, 256, 1000, grid=(16, 16), size="B", width=384, depth=6, heads=6).to(args.device).eval()
    widths = sorted({*args.pass_cost_k, *(m.window for m in methods)})
    table, calls = [], {}
    for batch in args.batch_sizes:
        costs = pass_costs(gpt_b, batch, widths, args.pass_cost_repeats, args.device)
        for k, seconds in costs.items():
            table.append({"batch": batch, "k": k, "seconds": seconds, "ratio_to_k1": seconds / costs[1]})
        calls[str(batch)] = {
            "target": {str(k): s for k, s in costs.items()},
            "drafter_eagle": drafter_call_cost(drafter, gpt_b, batch, 1, args.pass_cost_repeats, args.device),
            "drafter_gpt": drafter_call_cost(small, gpt_b, batch, 1, args.pass_cost_repeats, args.device),
        }
    params = sum(p.numel() for p in gpt_b.parameters())
    return {
        "model": {"size": "B", "params": params, "vocab_size": 16384, "num_tokens": 256, "guidance": True},
        "drafters": {
            "eagle": sum(p.numel() for p in drafter.parameters()),
            "gpt": sum(p.numel() for p in small.parameters()),
            "gpt_shape": "width 384, depth 6: half gpt_quickstart's width and depth, as gpt_draft_quickstart",
        },
        "table": [row for row in table if row["k"] in args.pass_cost_k],
        "calls": calls,
    }


def projection(methods, rows_by_method, costs) -> list[dict]:
    """Projected GPT-B seconds per image: passes_per_image x pass cost (+ drafter calls x call cost) / B."""
    out = []
    for batch, calls in costs["calls"].items():
        base = None
        for method in methods:
            measured = rows_by_method[method.name][batch]
            target = measured["passes_per_image"] * calls["target"][str(method.window)]
            drafts = measured.get("draft_passes_per_image", 0.0) * calls.get(f"drafter_{method.drafter}", 0.0)
            seconds = (target + drafts) / int(batch)
            base = seconds if method.name == "ar" else base
            out.append(
                {
                    "method": method.name,
                    "batch": int(batch),
                    "seconds_per_image": seconds,
                    "speedup": base / seconds,
                    "kind": "projection",
                }
            )
    return out


# ----------------------------------------------------------------------------- reports
def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def settings_text(row: dict) -> str:
    parts = [f"{k}={v}" for k, v in row["settings"].items() if k != "kv_cache"]
    if row.get("drafter"):
        parts.insert(0, f"drafter={row['drafter']}")
    return ", ".join(parts + ["exact" if row["exact"] else "approx."])


def markdown(report: dict) -> str:
    floor, s = report["noise_floor"], report["settings"]
    batch_sizes = s["batch_sizes"]
    header = ["method", "settings"]
    header += [f"passes/image b{b}" for b in batch_sizes] + ["tokens/pass b1", "acceptance"]
    header += [f"speed-up b{b}" for b in batch_sizes]
    compiled = s.get("compile", False)
    if compiled:
        header += [f"compiled b{b}" for b in batch_sizes]
    header += ["gFID", "cond. acc.", "within noise?"]
    lines = [
        f"Decoding methods on {s['generator']} (drafters {s['draft']}, {s['eagle']}; tokenizer "
        f"{s['tokenizer']}): cfg {s['cfg_scale']}, {s['num_samples']} samples per method (batch "
        f"{s['sample_batch_size']}) against {report['reference']}; "
        f"gFID = fid[{report['feature_extractor']}]. "
        f"Speed-up = median sampler wall time of ar / the method's at that batch size (compiled: both "
        f"with compile=true) "
        f"({report['environment']['device']}, {report['environment']['torch_threads']} thread(s)). Noise "
        f"floor: plain decoding at seeds {floor['seeds']} gives gFID "
        f"{', '.join(f'{g:.2f}' for g in floor['gfid'])}, spread {floor['spread']:.2f}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", ":---"] + ["---:"] * (len(header) - 3) + [":---:"]) + "|",
    ]
    for name, m in report["methods"].items():
        by_batch = {str(b): m["batches"][str(b)] for b in batch_sizes}
        first = by_batch[str(batch_sizes[0])]
        cells = [name, settings_text(m)]
        for b in batch_sizes:
            passes = f"{by_batch[str(b)]['passes_per_image']:.1f}"
            if by_batch[str(b)].get("draft_passes_per_image") is not None:
                passes += f" (+{by_batch[str(b)]['draft_passes_per_image']:.0f} d)"
            cells.append(passes)
        cells += [f"{first['tokens_per_pass']:.2f}", fmt(first.get("acceptance"), ".2f")]
        cells += [f"{by_batch[str(b)]['speedup_wall']:.2f}x" for b in batch_sizes]
        if compiled:
            cells += [f"{by_batch[str(b)]['compiled']['speedup_wall']:.2f}x" for b in batch_sizes]
        cells += [f"{m['gfid']:.2f}", fmt(m["cond_accuracy"], ".3f"), m["within_noise"]]
        lines.append("| " + " | ".join(cells) + " |")
    if "step_cost" in report:
        lines += ["", "Cost of one call on these models (ratio to the target's one-token step):", ""]
        for batch, entry in report["step_cost"].items():
            parts = [f"target k={k}: {v['ratio']:.2f}" for k, v in entry["target"].items()]
            parts += [f"{n}: {v['ratio']:.2f}" for n, v in entry.items() if n.startswith("drafter")]
            lines.append(f"- batch {batch}: " + ", ".join(parts))
    if "pass_cost" in report:
        cost = report["pass_cost"]
        lines += ["", f"GPT-B ({cost['model']['params'] / 1e6:.0f}M, guidance) pass of k tokens:", ""]
        ks = sorted({row["k"] for row in cost["table"]})
        lines.append("| batch | " + " | ".join(f"k={k}" for k in ks) + " |")
        lines.append("|---:|" + "|".join(["---:"] * len(ks)) + "|")
        for batch in batch_sizes:
            row = {r["k"]: r for r in cost["table"] if r["batch"] == batch}
            cells = [f"{row[k]['seconds'] * 1e3:.0f} ms ({row[k]['ratio_to_k1']:.2f}x)" for k in ks]
            lines.append(f"| {batch} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Projected GPT-B speed-up (measured passes x measured GPT-B pass cost; a projection):",
            "",
        ]
        lines.append("| method | " + " | ".join(f"b{b}" for b in batch_sizes) + " |")
        lines.append("|:---|" + "|".join(["---:"] * len(batch_sizes)) + "|")
        projected = {(p["method"], p["batch"]): p["speedup"] for p in report["projection"]}
        for name in report["methods"]:
            cells = [f"{projected[(name, b)]:.2f}x" for b in batch_sizes]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_sizes = report["settings"]["batch_sizes"]
    floor = report["noise_floor"]
    base = report["methods"]["ar"]["gfid"]
    fig, axes = plt.subplots(
        1, len(batch_sizes), figsize=(6.5 * len(batch_sizes), 5), sharey=True, squeeze=False
    )
    for ax, batch in zip(axes[0], batch_sizes, strict=True):
        ax.axhspan(
            base - floor["spread"], base + floor["spread"], color="grey", alpha=0.2, label="ar gFID ± spread"
        )
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        families: dict[str, list] = {}
        for name, m in report["methods"].items():
            families.setdefault(m["family"], []).append((name, m))
        markers = iter("osD^v<>ph*XP")
        for family, members in families.items():
            xs = [m["batches"][str(batch)]["speedup_wall"] for _, m in members]
            ys = [m["gfid"] for _, m in members]
            ax.plot(xs, ys, ("-" if len(members) > 1 else "") + next(markers), label=family, markersize=7)
            for (_, m), x, y in zip(members, xs, ys, strict=True):
                label = m["drafter"] or (f"{m['sweep']}={m['settings'][m['sweep']]}" if m["sweep"] else None)
                if m["sweep"] and m["drafter"]:
                    label = f"{m['drafter']} {m['sweep']}={m['settings'][m['sweep']]}"
                if label:
                    ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xlabel(f"wall-clock speed-up over plain cached decoding, batch {batch}")
        ax.set_title(f"batch {batch}")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(
        f"gFID[{report['feature_extractor']}] ({report['settings']['num_samples']} samples), lower is better"
    )
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Decoding: speed against quality (cfg {report['settings']['cfg_scale']})")
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


def results_file(report: dict) -> dict:
    """The committed data: one row per method and batch size, plus the cost tables and the projection."""
    rows = []
    for name, m in report["methods"].items():
        for batch, measured in m["batches"].items():
            rows.append(
                {
                    "method": name,
                    "family": m["family"],
                    "drafter": m["drafter"],
                    "settings": m["settings"],
                    "batch": int(batch),
                    "passes_per_image": measured["passes_per_image"],
                    "tokens_per_pass": measured["tokens_per_pass"],
                    "acceptance": measured.get("acceptance"),
                    "draft_passes_per_image": measured.get("draft_passes_per_image"),
                    "speedup_wall": measured["speedup_wall"],
                    "images_per_s": measured["images_per_s"],
                    "speedup_wall_compiled": measured.get("compiled", {}).get("speedup_wall"),
                    "gfid": m["gfid"],
                    "gfid_minus_ar": m["gfid_minus_ar"],
                    "within_noise": m["within_noise"],
                    "is": m["is"],
                    "cond_accuracy": m["cond_accuracy"],
                    "exact": m["exact"],
                    "window": m["window"],
                    "sweep": m["sweep"],
                }
            )
    keys = ("settings", "environment", "feature_extractor", "reference", "noise_floor", "step_cost")
    out = {key: report[key] for key in keys if key in report}
    out["rows"] = rows
    for key in ("pass_cost", "projection"):
        if key in report:
            out[key] = report[key]
    return out


def report_from_results(results: dict) -> dict:
    """The inverse of results_file, as far as markdown() and plot() read it."""
    report = {key: value for key, value in results.items() if key != "rows"}
    report["methods"] = {}
    for row in results["rows"]:
        method = report["methods"].setdefault(
            row["method"],
            {key: row[key] for key in ("family", "drafter", "settings", "exact", "window", "sweep")}
            | {key: row[key] for key in ("gfid", "is", "cond_accuracy", "gfid_minus_ar", "within_noise")}
            | {"batches": {}},
        )
        measured = {key: row[key] for key in row if key in PER_BATCH}
        if row.get("speedup_wall_compiled") is not None:
            measured["compiled"] = {"speedup_wall": row["speedup_wall_compiled"]}
        method["batches"][str(row["batch"])] = measured
    return report


PER_BATCH = (
    "passes_per_image",
    "tokens_per_pass",
    "acceptance",
    "draft_passes_per_image",
    "speedup_wall",
    "images_per_s",
)


def replot(path: str, out: Path) -> dict:
    try:
        results = json.loads(Path(path).read_text())
        report = report_from_results(results)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"error: --replot {path} is not a bench_decoding --results file: {error}") from None
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    (out / "decoding.md").write_text(table)
    plot(report, out / "decoding.png")
    print(table, end="")
    print(f"written: {out}/decoding.{{md,png}} from {path}")
    return report


# ----------------------------------------------------------------------------- main
def run(args) -> dict:
    start, cpu_start = time.perf_counter(), time.process_time()
    env = environment(args)
    target = load_export(args.generator, "--generator", args.device)
    draft = load_export(args.draft, "--draft", args.device)
    eagle = load_export(args.eagle, "--eagle", args.device)
    tokenizer = load_export(args.tokenizer, "--tokenizer", args.device)
    try:
        eagle.bind(target)
    except (AttributeError, ValueError) as error:
        raise SystemExit(
            f"error: --eagle {args.eagle} is not an EAGLE drafter of --generator: {error}"
        ) from None
    token_spec = tokenizer.token_spec
    if (token_spec.vocab_size, token_spec.num_tokens) != (target.config["vocab_size"], target.num_tokens):
        raise SystemExit(
            f"error: --generator makes {target.num_tokens} tokens over {target.config['vocab_size']} codes, "
            f"--tokenizer {args.tokenizer} decodes {token_spec.num_tokens} over {token_spec.vocab_size}"
        )
    eval_cfg = gfid_config(args.tokenizer, [f"device={args.device}", *args.eval])
    extractor, weights = resolve_extractor(eval_cfg)  # trains photos-net first if missing: before sampling
    num_classes, token_kind = target.config["num_classes"], target.config.get("token_kind", "categorical")
    methods = build_methods(args, target, draft, eagle, tokenizer)

    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    labels = class_balanced_labels(args.num_samples, num_classes)
    sample_args = (args.sample_batch_size, tokenizer, token_kind, args.device)
    evaluate_args = (eval_cfg, extractor, weights, args.device)
    floor_gfid, reference = [], None
    for method in tqdm(methods, desc="sampling + gFID", unit="method"):
        images, stats = sample_images(method, labels, args.seeds[0], *sample_args)
        measured = quality(images, labels, out / "samples" / f"{method.name}.npz", *evaluate_args)
        method.results["quality"] = {**per_image(stats, target.num_tokens), **measured}
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
        timings = time_methods(methods, batch, rows, num_classes, target.num_tokens, args)
        compiled = (
            time_methods(methods, batch, rows, num_classes, target.num_tokens, args, True)
            if args.compile
            else {}
        )
        for method in methods:
            entry = timings[method.name]
            if compiled:
                keys = ("wall_time", "wall_times", "images_per_s", "speedup_wall")
                entry["compiled"] = {key: compiled[method.name][key] for key in keys}
            method.results.setdefault("batches", {})[str(batch)] = entry

    def count(model):
        return sum(p.numel() for p in model.parameters())

    report = {
        "settings": dict(vars(args)),
        "environment": env,
        "feature_extractor": extractor,
        "feature_extractor_weights": str(weights),
        "reference": reference,
        "num_tokens": target.num_tokens,
        "params": {"target": count(target), "draft_gpt": count(draft), "draft_eagle": count(eagle)},
        "noise_floor": {
            "seeds": args.seeds,
            "gfid": floor_gfid,
            "spread": spread,
            "mean": statistics.mean(floor_gfid),
            "std": statistics.stdev(floor_gfid),
        },
        "methods": {},
    }
    for m in methods:
        q = m.results["quality"]
        difference = q["gfid"] - floor_gfid[0]
        within = "baseline" if m is ar else ("yes" if abs(difference) <= spread else "no")
        report["methods"][m.name] = {
            "family": m.family,
            "drafter": m.drafter,
            "settings": m.settings,
            "exact": m.exact,
            "window": m.window,
            "sweep": m.sweep,
            "gfid": q["gfid"],
            "is": q["is"],
            "cond_accuracy": q["cond_accuracy"],
            "gfid_minus_ar": difference,
            "within_noise": within,
            "quality_samples": {k: v for k, v in q.items() if k not in ("gfid", "is", "cond_accuracy")},
            "batches": m.results["batches"],
        }
    report["step_cost"] = step_costs(methods, target, draft, eagle, args)
    if not args.skip_pass_cost:
        report["pass_cost"] = gpt_b_costs(methods, args)
        by_method = {name: m["batches"] for name, m in report["methods"].items()}
        report["projection"] = projection(methods, by_method, report["pass_cost"])
    report["wall_time_s"] = time.perf_counter() - start
    report["cpu_time_s"] = time.process_time() - cpu_start  # ~ the wall time on idle cores (1 thread)
    (out / "decoding.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "decoding.md").write_text(table)
    plot(report, out / "decoding.png")
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(results_file(report), indent=2) + "\n")
    print(table, end="")
    print(f"written: {out}/decoding.{{json,md,png}} in {report['wall_time_s']:.0f} s")
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.replot:
        return replot(args.replot, Path(args.out))
    try:
        return run(args)
    except (ConfigError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
