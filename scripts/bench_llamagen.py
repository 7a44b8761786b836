"""Plain cached decoding against LlamaGen's own `generate`, on a GPT-B with the same weights.

    git clone https://github.com/FoundationVision/LlamaGen /tmp/LlamaGen      # its public code, run locally
    python scripts/bench_llamagen.py --llamagen /tmp/LlamaGen                  # never in CI or the tests

Both decode class-conditional GPT-B (12 x 768, 111M parameters, 16,384 codes, a 16 x 16 grid of 256 tokens,
1000 classes; random weights, seeded) with classifier-free guidance (--cfg-scale, default 2.0: the doubled
batch), temperature 1, no top-k / top-p, at each --batch-sizes: ours with `sampling.sample_ar` (the KV cache
of generators/gpt.py), LlamaGen with `autoregressive.models.generate.generate` on its `GPT_B`, into which our
state dict is copied key by key (`to_llamagen`). Each repeat times both, interleaved (ours, LlamaGen, ours,
...); the figure is the median over --repeats of tokens per second (batch x 256 / wall time of one batch).

The two models compute the same function except at the class position, whose query and key LlamaGen's 2D
RoPE table zeroes (ours leaves it unrotated, generators/gpt.py): position 0 gives the same logits in both
(checked, `first_logits_max_diff`), later ones differ slightly; the cost of a step does not.

Writes --out (default docs/results/llamagen_decoding.json): the settings, the environment and, per batch
size, both medians, every repeat and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generators import GPT  # noqa: E402
from sampling import sample_ar  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llamagen", required=True, help="a checkout of FoundationVision/LlamaGen")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time ours with sampler compile=true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="docs/results/llamagen_decoding.json")
    return parser.parse_args(argv)


def to_llamagen(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our GPT's state dict -> LlamaGen's Transformer keys (LlamaGen's gpt.py names)."""
    names = {
        "class_embed.weight": "cls_embedding.embedding_table.weight",
        "embed.table.weight": "tok_embeddings.weight",
        "norm.weight": "norm.weight",
        "head.proj.weight": "output.weight",
    }
    per_layer = {
        "attn_norm.weight": "attention_norm.weight",
        "attn.qkv.weight": "attention.wqkv.weight",  # [q; k; v] rows in both
        "attn.proj.weight": "attention.wo.weight",
        "mlp_norm.weight": "ffn_norm.weight",
        "mlp.gate.weight": "feed_forward.w1.weight",
        "mlp.up.weight": "feed_forward.w3.weight",
        "mlp.down.weight": "feed_forward.w2.weight",
    }
    out = {}
    for key, value in state.items():
        if key in names:
            out[names[key]] = value
            continue
        _, layer, rest = key.split(".", 2)  # blocks.{i}.rest
        out[f"layers.{layer}.{per_layer[rest]}"] = value
    return out


def load_llamagen(folder: Path):
    if not (folder / "autoregressive" / "models" / "generate.py").is_file():
        raise SystemExit(f"error: --llamagen {folder} is not a LlamaGen checkout (no autoregressive/models)")
    sys.path.insert(0, str(folder))
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import GPT_B

    return GPT_B, generate


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    gpt_b, generate = load_llamagen(Path(args.llamagen))
    torch.manual_seed(0)
    ours = GPT(16384, 256, 1000, grid=(16, 16), size="B").to(args.device).eval()
    theirs = gpt_b(vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1, model_type="c2i")
    missing = theirs.load_state_dict(to_llamagen(ours.state_dict()), strict=True)
    theirs = theirs.to(args.device).eval()
    params = sum(p.numel() for p in ours.parameters())

    labels = torch.tensor([7], device=args.device)
    with torch.no_grad():  # the class position: the same logits in both (module docstring)
        no_tokens = torch.zeros(1, 0, dtype=torch.long, device=args.device)
        first_ours = ours.logits(ours.forward_prefix(no_tokens, labels))[:, -1]
        theirs.setup_caches(max_batch_size=1, max_seq_length=257, dtype=torch.float32)
        first_theirs, _ = theirs(None, labels, torch.arange(0, 1, device=args.device))
        first_diff = (first_theirs[:, -1] - first_ours).abs().max().item()

    def run_ours(batch, compile=False):
        label = torch.arange(batch, device=args.device) % 1000
        generator = torch.Generator(device=args.device).manual_seed(0)
        start = time.perf_counter()
        sample_ar(ours, label, cfg_scale=args.cfg_scale, generator=generator, compile=compile)
        return time.perf_counter() - start

    def run_theirs(batch):
        label = torch.arange(batch, device=args.device) % 1000
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad():
            generate(theirs, label, 256, cfg_scale=args.cfg_scale, temperature=1.0, top_k=0, top_p=1.0)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    results = {}
    for batch in args.batch_sizes:
        runners = {"ours": lambda b=batch: run_ours(b), "llamagen": lambda b=batch: run_theirs(b)}
        if args.compile:
            runners["ours_compiled"] = lambda b=batch: run_ours(b, compile=True)
        for run in runners.values():  # warm-up (and compilation)
            run()
        times = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                times[name].append(run())
        tokens = batch * 256
        entry = {
            name: {"tokens_per_s": tokens / statistics.median(t), "seconds": t} for name, t in times.items()
        }
        entry["ratio"] = entry["ours"]["tokens_per_s"] / entry["llamagen"]["tokens_per_s"]
        if args.compile:
            entry["ratio_compiled"] = (
                entry["ours_compiled"]["tokens_per_s"] / entry["llamagen"]["tokens_per_s"]
            )
        results[str(batch)] = entry
        print(
            f"batch {batch}: ours {entry['ours']['tokens_per_s']:.1f} tokens/s, LlamaGen "
            f"{entry['llamagen']['tokens_per_s']:.1f} tokens/s: {entry['ratio']:.2f}x"
        )
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "llamagen"},
        "model": {
            "size": "GPT-B",
            "params": params,
            "vocab_size": 16384,
            "num_tokens": 256,
            "grid": [16, 16],
        },
        "load": str(missing),
        "first_logits_max_diff": first_diff,
        "environment": {
            "torch": torch.__version__,
            "device": args.device,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        },
        "batches": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out}")
    return report


if __name__ == "__main__":
    main()
