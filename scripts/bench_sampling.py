"""Benchmark plain autoregressive sampling: KV-cached decoding vs recomputing the whole prefix every step.

    python scripts/bench_sampling.py                                  # random tiny GPT, batch 1 and 64
    python scripts/bench_sampling.py --generator runs/gpt/export --batch-sizes 1 16 --cfg-scale 4

Both variants run in one process on the same model, labels and seeds, so their ratio is meaningful even
on a shared CPU. For each batch size: one warm-up run of each, then `--repeats` timed runs alternating the
two; the median wall time gives tokens per second (B * N / time) and the speed-up of the cache. The table
also checks that both variants sampled identical tokens. CPU runs are single-threaded unless --threads says
otherwise. Writes sampling.json and sampling.md to --out.
Without --generator the model is a randomly initialised tiny GPT (vocab 1024, 32 tokens, 17 classes),
so the benchmark runs without any training.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from generators import GPT
from sampling import class_balanced_labels, sample_ar
from tokenizers_vis.base import from_pretrained


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", help="exported GPT folder (default: a random tiny GPT)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant and batch size")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="!= 1 doubles the batch (guidance)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads; 1 by default, as extra threads spin against other jobs on shared cores "
        "and distort timings (0: torch's default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/sampling")
    return parser.parse_args(argv)


def load_model(path: str | None, device: str, seed: int) -> tuple[GPT, str]:
    if path is not None:
        return from_pretrained(path, device=device), path
    torch.manual_seed(seed)
    model = GPT(vocab_size=1024, num_tokens=32, num_classes=17, size="tiny")
    return model.to(device).eval(), "random tiny GPT (vocab 1024, 32 tokens, 17 classes)"


def bench_batch(model: GPT, batch: int, args) -> dict:
    labels = class_balanced_labels(batch, model.num_classes)

    def run(use_cache: bool):
        generator = torch.Generator(args.device).manual_seed(args.seed)
        return sample_ar(model, labels, cfg_scale=args.cfg_scale, generator=generator, use_cache=use_cache)

    run(True), run(False)  # warm-up
    cached_times, recompute_times, identical = [], [], True
    for _ in range(args.repeats):
        cached_run, recompute_run = run(True), run(False)
        cached_times.append(cached_run.stats["wall_time"])
        recompute_times.append(recompute_run.stats["wall_time"])
        identical &= torch.equal(cached_run.tokens, recompute_run.tokens)
    num_tokens = model.num_tokens
    cached, recompute = statistics.median(cached_times), statistics.median(recompute_times)
    return {
        "batch": batch,
        "num_tokens": num_tokens,
        "forward_passes": cached_run.stats["forward_passes"],
        "cached_wall_time": cached,
        "recompute_wall_time": recompute,
        "cached_tokens_per_s": batch * num_tokens / cached,
        "recompute_tokens_per_s": batch * num_tokens / recompute,
        "speedup": recompute / cached,
        "identical_tokens": identical,
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "| batch | tokens | cached tok/s | recompute tok/s | speed-up (cache) | passes | identical tokens |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['batch']} | {r['num_tokens']} | {r['cached_tokens_per_s']:.0f} | "
            f"{r['recompute_tokens_per_s']:.0f} | {r['speedup']:.2f}x | {r['forward_passes']} | "
            f"{'yes' if r['identical_tokens'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, description = load_model(args.generator, args.device, args.seed)
    results = [bench_batch(model, batch, args) for batch in args.batch_sizes]
    report = {
        "generator": description,
        "config": model.config,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cfg_scale": args.cfg_scale,
        "repeats": args.repeats,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(results)
    header = f"Sampling: KV cache vs full recompute; {description}, cfg {args.cfg_scale}, {args.device}\n\n"
    (out / "sampling.md").write_text(header + table)
    print(header + table, end="")
    return report


if __name__ == "__main__":
    main()
