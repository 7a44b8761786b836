"""`make demo`: the whole pipeline on the embedded photos, on a CPU, one user-facing command per step.

    1. train a TiTok tokenizer                   python train.py +experiment=titok_quickstart
    2. extract its tokens from 20k photo crops   python scripts/extract_codes.py ...
    3. train a GPT on the tokens                 python train.py +experiment=gpt_quickstart
    4. sample without and with guidance, and decode uniformly random tokens as a floor
                                                 python scripts/sample.py ...
    5. measure rFID, gFID, IS, conditional accuracy, and the floor: the gFID of the tokenizer's own
       reconstructions of training crops, the best a generator of its tokens can reach
                                                 python scripts/evaluate.py ...

Each step resumes or skips finished work, so running the demo again is quick. The summary table is
printed and stored in runs/gpt_quickstart/metrics.json (merged into what training wrote there).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

RUNS = Path("runs")
TOKENIZER = RUNS / "titok_quickstart" / "export"
CODES = RUNS / "titok_quickstart" / "codes"
GENERATOR = RUNS / "gpt_quickstart" / "export"
SAMPLES = RUNS / "gpt_quickstart" / "samples"
EVAL = RUNS / "gpt_quickstart" / "eval"
NUM_SAMPLES = 510  # 30 per class
CFG_SCALE = 2.0


def step(title: str, *command: str) -> None:
    print(f"\n=== {title}\n$ {' '.join(command)}", flush=True)
    start = time.time()
    subprocess.run([sys.executable, *command], check=True)
    print(f"=== {title}: {time.time() - start:.0f}s", flush=True)


def sample(name: str, sampler: str, cfg_scale: float) -> Path:
    out = SAMPLES / name
    step(
        f"sample {name}",
        "scripts/sample.py",
        f"generator_path={GENERATOR}",
        f"tokenizer_path={TOKENIZER}",
        f"out={out}",
        f"num_samples={NUM_SAMPLES}",
        f"sampler={sampler}",
        f"sampler.cfg_scale={cfg_scale}",
    )
    return out


def evaluate(name: str, *overrides: str) -> dict:
    out = EVAL / f"{name}.json"
    step(f"evaluate {name}", "scripts/evaluate.py", *overrides, f"out={out}")
    return json.loads(out.read_text())


def main() -> None:
    start = time.time()
    step("1/5 tokenizer", "train.py", "+experiment=titok_quickstart")
    step(
        "2/5 extract codes",
        "scripts/extract_codes.py",
        f"tokenizer_path={TOKENIZER}",
        f"out={CODES}",
        "data.samples_per_epoch=20000",
    )
    step("3/5 generator", "train.py", "+experiment=gpt_quickstart")
    folders = {
        "random": sample("random_tokens", "uniform", 1.0),
        "plain": sample("cfg1.0", "ar", 1.0),
        "cfg": sample(f"cfg{CFG_SCALE}", "ar", CFG_SCALE),
    }
    recon = evaluate("rfid", "mode=rfid", f"tokenizer_path={TOKENIZER}")
    floor = evaluate("floor", "mode=floor", f"tokenizer_path={TOKENIZER}", f"floor_samples={NUM_SAMPLES}")
    scores = {k: evaluate(k, "mode=gfid", f"samples={v / 'samples.npz'}") for k, v in folders.items()}

    extractor = recon["feature_extractor"]
    summary = {
        "feature_extractor": extractor,
        "rfid": recon[f"fid[{extractor}]"],
        "psnr": recon["psnr"],
        "gfid": scores["plain"][f"fid[{extractor}]"],
        "gfid_cfg": scores["cfg"][f"fid[{extractor}]"],
        "gfid_random_tokens": scores["random"][f"fid[{extractor}]"],
        "gfid_floor": floor[f"fid[{extractor}]"],
        "inception_score": scores["cfg"][f"is[{extractor}]"],
        "cond_accuracy": scores["cfg"]["cond_accuracy"],
        "cond_accuracy_no_cfg": scores["plain"]["cond_accuracy"],
        "cfg_scale": CFG_SCALE,
        "num_samples": NUM_SAMPLES,
    }
    metrics_file = RUNS / "gpt_quickstart" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    metrics_file.write_text(json.dumps({**metrics, **summary}, indent=2) + "\n")

    print(f"\n=== summary ({time.time() - start:.0f}s; features: {extractor}, {NUM_SAMPLES} samples)")
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
    print(f"\nreconstructions: {RUNS / 'titok_quickstart' / 'grids' / 'reconstructions.png'}")
    print(f"tokenizer metrics: {RUNS / 'titok_quickstart' / 'metrics.json'}")
    for name, folder in folders.items():
        print(f"samples ({name}): {folder / 'grid.png'}")
    print(f"metrics: {metrics_file}")


if __name__ == "__main__":
    main()
