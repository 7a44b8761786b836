"""`make demo`: the whole pipeline on the embedded photos, on a CPU, in a wall-clock budget.

    1. train a TiTok tokenizer                   python train.py +experiment=titok_quickstart
    2. extract its tokens from 20k photo crops   python scripts/extract_codes.py ...
    3. train a GPT on the tokens                 python train.py +experiment=gpt_quickstart
    4. sample without and with guidance, and decode uniformly random tokens as a floor
                                                 python scripts/sample.py ...
    5. measure rFID, gFID, IS, conditional accuracy, and the floor: the gFID of the tokenizer's own
       reconstructions of training crops, the best a generator of its tokens can reach
                                                 python scripts/evaluate.py ...

    python scripts/demo.py                      # 15-minute budget (after the install), runs/demo/
    python scripts/demo.py --budget-minutes 30  # more steps where the machine allows
    python scripts/demo.py --full               # the full recipes (make demo-full), runs/titok_quickstart ...

With a budget, a probe first measures a tokenizer training step (a 40-step run of titok_quickstart) and a
GPT step here; training/budget.py turns them into both stages' step counts and compressed schedules, never
more than the full recipe's. The plan is printed and kept in runs/demo/plan.json, so running the demo
again reuses it and resumes or skips finished work. Each stage prints its time, and the summary states the
quality the budget reached (the same table as the full recipe's, in runs/demo/gpt/metrics.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.budget import generator_overrides, plan, tokenizer_overrides  # noqa: E402

RUNS = Path("runs")
NUM_SAMPLES = 510  # 30 per class
CFG_SCALE = 2.0


@dataclass
class Layout:
    """Where each stage writes."""

    tokenizer_run: Path
    generator_run: Path

    @property
    def tokenizer(self) -> Path:
        return self.tokenizer_run / "export"

    @property
    def codes(self) -> Path:
        return self.tokenizer_run / "codes"

    @property
    def generator(self) -> Path:
        return self.generator_run / "export"

    @property
    def samples(self) -> Path:
        return self.generator_run / "samples"

    @property
    def eval(self) -> Path:
        return self.generator_run / "eval"


FULL = Layout(RUNS / "titok_quickstart", RUNS / "gpt_quickstart")
BUDGETED = Layout(RUNS / "demo" / "tokenizer", RUNS / "demo" / "gpt")


class Stages:
    """Runs one command per stage, timing each."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, title: str, *command: str) -> None:
        print(f"\n=== {title}\n$ python {' '.join(command)}", flush=True)
        start = time.time()
        subprocess.run([sys.executable, *command], check=True)
        self.seconds[title] = time.time() - start
        print(f"=== {title}: {self.seconds[title]:.0f}s", flush=True)


def probe_generator_step(batch: int = 64, steps: int = 8) -> float:
    """Seconds per optimiser step of gpt_quickstart's GPT on random codes of its shape (no data needed)."""
    import torch

    from generators import GPT

    torch.manual_seed(0)
    model = GPT(1024, 32, 17, size="tiny").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens, labels = torch.randint(1024, (batch, 32)), torch.randint(17, (batch,))
    times = []
    for _ in range(steps + 2):  # the first two warm up
        start = time.perf_counter()
        optimizer.zero_grad()
        model.loss(tokens, labels).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return sum(times[2:]) / steps


def probe_tokenizer_step(stages: Stages, run_dir: Path, steps: int = 40) -> float:
    """Seconds per tokenizer step, from a short titok_quickstart run's measured throughput (batch 64)."""
    stages.run(
        "probe",
        "train.py",
        "+experiment=titok_quickstart",
        f"paths.run_dir={run_dir}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        f"callbacks.checkpoint.every_n_train_steps={steps}",
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return 64 / metrics["train_images_per_second"]


def budget_plan(stages: Stages, budget_s: float, replan: bool) -> dict:
    """The stored plan, or a new one from the probes (whose own time counts against the budget)."""
    path = RUNS / "demo" / "plan.json"
    if path.is_file() and not replan:
        stored = json.loads(path.read_text())
        print(f"reusing the plan in {path} (--replan to probe again): {stored}")
        return stored
    start = time.time()
    tokenizer_step = probe_tokenizer_step(stages, RUNS / "demo" / "probe")
    generator_step = probe_generator_step()
    spent = time.time() - start
    chosen = plan(budget_s - spent, tokenizer_step, generator_step).as_dict() | {"probe_s": spent}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chosen, indent=2) + "\n")
    print(
        f"\n=== plan for a {budget_s / 60:.0f}-minute budget: tokenizer step {tokenizer_step:.3f}s, GPT step "
        f"{generator_step:.3f}s -> tokenizer {chosen['tokenizer_steps']} steps, GPT "
        f"{chosen['generator_steps']} steps (full recipe: 2800 / 2000); estimated "
        f"{(chosen['estimate_s'] + spent) / 60:.1f} min with the probe; stored in {path}"
    )
    return chosen


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-minutes", type=float, default=15.0)
    parser.add_argument("--full", action="store_true", help="the full recipes, whatever they take")
    parser.add_argument("--replan", action="store_true", help="probe again instead of reusing plan.json")
    args = parser.parse_args(argv)
    start = time.time()
    stages = Stages()
    layout, tokenizer_extra, generator_extra, chosen = FULL, [], [], None
    if not args.full:
        layout = BUDGETED
        chosen = budget_plan(stages, args.budget_minutes * 60, args.replan)
        tokenizer_extra = [
            f"paths.run_dir={layout.tokenizer_run}",
            *tokenizer_overrides(chosen["tokenizer_steps"]),
        ]
        generator_extra = [
            f"paths.run_dir={layout.generator_run}",
            f"data.codes_dir={layout.codes}",
            f"module.tokenizer_path={layout.tokenizer}",
            *generator_overrides(chosen["generator_steps"]),
        ]

    stages.run("1/5 tokenizer", "train.py", "+experiment=titok_quickstart", *tokenizer_extra)
    stages.run(
        "2/5 extract codes",
        "scripts/extract_codes.py",
        f"tokenizer_path={layout.tokenizer}",
        f"out={layout.codes}",
        "data.samples_per_epoch=20000",
    )
    stages.run("3/5 generator", "train.py", "+experiment=gpt_quickstart", *generator_extra)
    folders = {}
    for name, sampler, scale in [
        ("random_tokens", "uniform", 1.0),
        ("cfg1.0", "ar", 1.0),
        ("cfg2.0", "ar", 2.0),
    ]:
        folders[name] = layout.samples / name
        stages.run(
            f"4/5 sample {name}",
            "scripts/sample.py",
            f"generator_path={layout.generator}",
            f"tokenizer_path={layout.tokenizer}",
            f"out={folders[name]}",
            f"num_samples={NUM_SAMPLES}",
            f"sampler={sampler}",
            f"sampler.cfg_scale={scale}",
        )

    def evaluate(name: str, *overrides: str) -> dict:
        out = layout.eval / f"{name}.json"
        stages.run(f"5/5 evaluate {name}", "scripts/evaluate.py", *overrides, f"out={out}")
        return json.loads(out.read_text())

    recon = evaluate("rfid", "mode=rfid", f"tokenizer_path={layout.tokenizer}")
    floor = evaluate(
        "floor", "mode=floor", f"tokenizer_path={layout.tokenizer}", f"floor_samples={NUM_SAMPLES}"
    )
    scores = {k: evaluate(k, "mode=gfid", f"samples={v / 'samples.npz'}") for k, v in folders.items()}
    total = time.time() - start
    return report(layout, recon, floor, scores, folders, stages, total, chosen)


def report(layout, recon, floor, scores, folders, stages, total, chosen) -> dict:
    extractor = recon["feature_extractor"]
    tokenizer_metrics = json.loads((layout.tokenizer_run / "metrics.json").read_text())
    summary = {
        "feature_extractor": extractor,
        "rfid": recon[f"fid[{extractor}]"],
        "psnr": recon["psnr"],
        "gfid": scores["cfg1.0"][f"fid[{extractor}]"],
        "gfid_cfg": scores["cfg2.0"][f"fid[{extractor}]"],
        "gfid_random_tokens": scores["random_tokens"][f"fid[{extractor}]"],
        "gfid_floor": floor[f"fid[{extractor}]"],
        "inception_score": scores["cfg2.0"][f"is[{extractor}]"],
        "cond_accuracy": scores["cfg2.0"]["cond_accuracy"],
        "cond_accuracy_no_cfg": scores["cfg1.0"]["cond_accuracy"],
        "cfg_scale": CFG_SCALE,
        "num_samples": NUM_SAMPLES,
        "tokenizer_steps": tokenizer_metrics["steps"],
        "demo_seconds": total,
        "stage_seconds": stages.seconds,
        "plan": chosen,
    }
    metrics_file = layout.generator_run / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    metrics_file.write_text(json.dumps({**metrics, **summary}, indent=2) + "\n")

    budget = "" if chosen is None else f" of a {chosen['budget_s'] / 60:.0f}-minute budget"
    print(f"\n=== summary: {total / 60:.1f} min{budget}; features {extractor}, {NUM_SAMPLES} samples")
    print("| stage | seconds |\n| --- | --- |")
    for title, seconds in stages.seconds.items():
        print(f"| {title} | {seconds:.0f} |")
    steps = f"tokenizer {summary['tokenizer_steps']} steps, GPT {metrics.get('steps', '?')} steps"
    print(f"\nquality reached ({steps}; full recipe 2800 / 2000):")
    rows = [
        ("rFID (tokenizer reconstructions)", summary["rfid"]),
        ("PSNR (dB)", summary["psnr"]),
        ("gFID, uniformly random tokens", summary["gfid_random_tokens"]),
        ("gFID, tokenizer reconstructions (floor)", summary["gfid_floor"]),
        ("gFID, no guidance", summary["gfid"]),
        (f"gFID, guidance {CFG_SCALE}", summary["gfid_cfg"]),
        (f"IS, guidance {CFG_SCALE}", summary["inception_score"]),
        ("conditional accuracy, no guidance", summary["cond_accuracy_no_cfg"]),
        (f"conditional accuracy, guidance {CFG_SCALE}", summary["cond_accuracy"]),
    ]
    print("| metric | value |\n| --- | --- |")
    for label, value in rows:
        print(f"| {label} | {value:.3f} |")
    print(f"\nreconstructions: {layout.tokenizer_run / 'grids' / 'reconstructions.png'}")
    print(f"tokenizer metrics: {layout.tokenizer_run / 'metrics.json'}")
    for name, folder in folders.items():
        print(f"samples ({name}): {folder / 'grid.png'}")
    print(f"metrics: {metrics_file}")
    return summary


if __name__ == "__main__":
    main()
