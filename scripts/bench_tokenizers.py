"""Every tokenizer of the framework under one CPU budget, each with the same small GPT, in one table.

    python scripts/bench_tokenizers.py                        # all of them, 3 minutes of training each
    python scripts/bench_tokenizers.py --only titok binary --minutes 1 --gpt-steps 300

For each tokenizer (titok, onedpiece, flextok, binary, fq, tokenbridge, titok with latent perturbation,
titok with decoder post-training), with the quickstart experiment of its kind:

    1. a short probe run measures its training throughput on this machine, and the step count that fills
       `--minutes` of training follows from it, so every tokenizer gets the same wall-clock budget (its
       learning-rate schedule still runs to the end). Post-training is the exception: it starts from the
       titok tokenizer and generator of this bench and adds `--posttrain-steps`; its time is reported as
       the titok budget plus its own.
    2. train it (train.py), extract its tokens from 20k crops (extract_codes.py), train the tiny GPT of its
       token kind for `--gpt-steps` steps (every GPT: same size, steps, batch and learning rate; the head is
       the one the token kind needs), sample `--num-samples` images with guidance `--cfg-scale`
       (sample.py), and measure rFID and PSNR of reconstructions, pFID (categorical codes only: RobustTok's
       perturbation needs a code neighbourhood), gFID, IS and conditional accuracy (evaluate.py).
    3. write tokenizers.json, tokenizers.md (the table, plus the Spearman rank correlation of rFID and of
       pFID with gFID across tokenizers) and tokenizers.png (gFID against rFID and pFID) to --out.

Every stage is skipped when its output exists, so an interrupted bench resumes where it stopped; delete a
tokenizer's folder under --out to redo it. The per-tokenizer commands are printed as they run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenizers_vis.base import TokenSpec  # noqa: E402

PYTHON = sys.executable


@dataclass(frozen=True)
class Entry:
    tokenizer: str  # quickstart experiment of the tokenizer (or of the post-training)
    generator: str  # quickstart experiment of its GPT
    posttrain_of: str | None = None  # post-training: the entry whose tokenizer and GPT it starts from


ENTRIES = {
    "titok": Entry("titok_quickstart", "gpt_quickstart"),
    "onedpiece": Entry("onedpiece_quickstart", "gpt_onedpiece_quickstart"),
    "flextok": Entry("flextok_quickstart", "gpt_flextok_quickstart"),
    "binary": Entry("binary_quickstart", "gpt_binary_quickstart"),
    "fq": Entry("fq_quickstart", "gpt_fq_quickstart"),
    "tokenbridge": Entry("tokenbridge_quickstart", "gpt_tokenbridge_quickstart"),
    "titok_perturb": Entry("titok_perturb_quickstart", "gpt_quickstart"),
    "titok_posttrain": Entry("titok_posttrain_quickstart", "gpt_quickstart", posttrain_of="titok"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(ENTRIES), help="a subset (default: all)")
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget per tokenizer")
    parser.add_argument("--probe-steps", type=int, default=40, help="steps of the throughput probe")
    parser.add_argument("--posttrain-steps", type=int, default=300)
    parser.add_argument("--gpt-steps", type=int, default=1000)
    parser.add_argument("--codes", type=int, default=20000, help="training crops whose tokens the GPT sees")
    parser.add_argument("--num-samples", type=int, default=510, help="samples for gFID (30 per class)")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--out", default="runs/bench/tokenizers")
    return parser.parse_args(argv)


def run(*command: str) -> float:
    """Run one of the project's scripts; returns its wall time in seconds."""
    print(f"$ {' '.join(command)}", flush=True)
    start = time.time()
    subprocess.run([PYTHON, *command], check=True, stdout=subprocess.DEVNULL)
    return time.time() - start


def schedule(steps: int) -> list[str]:
    """Overrides that make a run of `steps` steps validate, checkpoint and warm up within its length."""
    return [
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        f"callbacks.checkpoint.every_n_train_steps={max(1, steps // 2)}",
        f"module.warmup_steps={min(100, max(1, steps // 10))}",
    ]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def budget_steps(name: str, entry: Entry, folder: Path, args) -> tuple[int, float]:
    """(steps filling --minutes, images per second) from a probe run, cached in folder/probe.json."""
    record = folder / "probe.json"
    if not record.is_file():
        probe_dir = folder / "probe"
        run(
            "train.py",
            f"+experiment={entry.tokenizer}",
            f"paths.run_dir={probe_dir}",
            *schedule(args.probe_steps),
        )
        metrics = read_json(probe_dir / "metrics.json")
        batch = int(OmegaConf.load(probe_dir / "config.yaml").data.batch_size)
        record.write_text(
            json.dumps({"images_per_second": metrics["train_images_per_second"], "batch": batch})
        )
    probe = read_json(record)
    steps = int(args.minutes * 60 * probe["images_per_second"] / probe["batch"])
    print(f"{name}: {probe['images_per_second']:.0f} images/s in the probe -> {steps} steps", flush=True)
    return steps, probe["images_per_second"]


def train_tokenizer(name: str, entry: Entry, folder: Path, args, results: dict) -> dict:
    """Train (or post-train) the tokenizer into folder/tokenizer; returns its timing record."""
    record = folder / "tokenizer.json"
    if record.is_file():
        return read_json(record)
    run_dir = folder / "tokenizer"
    if entry.posttrain_of is None:
        steps, _ = budget_steps(name, entry, folder, args)
        overrides = schedule(steps)
        base_seconds = 0.0
    else:
        base = Path(args.out) / entry.posttrain_of
        steps = args.posttrain_steps
        overrides = [
            *schedule(steps),
            f"module.tokenizer_path={base / 'tokenizer' / 'export'}",
            f"module.generator_path={base / 'gpt' / 'export'}",
        ]
        base_seconds = results[entry.posttrain_of]["tokenizer_seconds"]
    seconds = run("train.py", f"+experiment={entry.tokenizer}", f"paths.run_dir={run_dir}", *overrides)
    timing = {"tokenizer_steps": steps, "tokenizer_seconds": base_seconds + seconds}
    record.write_text(json.dumps(timing))
    return timing


def train_generator(entry: Entry, folder: Path, args) -> Path:
    """Extract tokens and train the GPT; returns its export. Post-training reuses its base's GPT (the
    encoder is frozen, so the tokens are the base tokenizer's)."""
    if entry.posttrain_of is not None:
        return Path(args.out) / entry.posttrain_of / "gpt" / "export"
    tokenizer, codes, gpt = folder / "tokenizer" / "export", folder / "codes", folder / "gpt"
    if not (codes / "meta.json").is_file():  # written last
        run(
            "scripts/extract_codes.py",
            f"tokenizer_path={tokenizer}",
            f"out={codes}",
            f"data.samples_per_epoch={args.codes}",
        )
    if not (gpt / "export").is_dir():
        run(
            "train.py",
            f"+experiment={entry.generator}",
            f"paths.run_dir={gpt}",
            f"data.codes_dir={codes}",
            f"module.tokenizer_path={tokenizer}",
            *schedule(args.gpt_steps),
        )
    return gpt / "export"


def evaluate(folder: Path, name: str, *overrides: str) -> dict:
    out = folder / "eval" / f"{name}.json"
    if not out.is_file():
        run("scripts/evaluate.py", *overrides, f"out={out}")
    return read_json(out)


def bench_entry(name: str, entry: Entry, args, results: dict) -> dict:
    """Train, sample and measure one tokenizer; returns its row of the table."""
    folder = Path(args.out) / name
    folder.mkdir(parents=True, exist_ok=True)
    timing = train_tokenizer(name, entry, folder, args, results)
    tokenizer = folder / "tokenizer" / "export"
    generator = train_generator(entry, folder, args)
    samples = folder / "samples"
    if not (samples / "samples.npz").is_file():
        run(
            "scripts/sample.py",
            f"generator_path={generator}",
            f"tokenizer_path={tokenizer}",
            f"out={samples}",
            f"num_samples={args.num_samples}",
            "sampler=ar",
            f"sampler.cfg_scale={args.cfg_scale}",
        )
    spec = json.loads((tokenizer / "config.json").read_text())["token_spec"]
    recon = evaluate(folder, "rfid", "mode=rfid", f"tokenizer_path={tokenizer}")
    extractor = recon["feature_extractor"]
    pfid = None
    if spec["kind"] == "categorical":
        pfid = evaluate(folder, "pfid", "mode=pfid", f"tokenizer_path={tokenizer}")[f"pfid[{extractor}]"]
    generated = evaluate(folder, "gfid", "mode=gfid", f"samples={samples / 'samples.npz'}")
    bits = TokenSpec(**spec).bits_per_token
    return {
        "tokenizer": name,
        "experiment": entry.tokenizer,
        "kind": spec["kind"],
        "tokens": spec["num_tokens"],
        "bits_per_image": spec["num_tokens"] * bits,
        "psnr": recon["psnr"],
        "rfid": recon[f"fid[{extractor}]"],
        "pfid": pfid,
        "gfid": generated[f"fid[{extractor}]"],
        "inception_score": generated[f"is[{extractor}]"],
        "cond_accuracy": generated["cond_accuracy"],
        "feature_extractor": extractor,
        **timing,
    }


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (scipy; ties share their mean rank); None below 3 points or with a constant
    side, where it is undefined."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def correlations(rows: list[dict]) -> dict:
    """Spearman correlation with gFID of rFID (every row) and of pFID (rows that have one), and the counts."""
    with_pfid = [r for r in rows if r["pfid"] is not None]
    return {
        "rfid_gfid": spearman([r["rfid"] for r in rows], [r["gfid"] for r in rows]),
        "rfid_gfid_n": len(rows),
        "pfid_gfid": spearman([r["pfid"] for r in with_pfid], [r["gfid"] for r in with_pfid]),
        "pfid_gfid_n": len(with_pfid),
        # the same rows as pFID's, for a like-for-like comparison of the two
        "rfid_gfid_categorical": spearman([r["rfid"] for r in with_pfid], [r["gfid"] for r in with_pfid]),
    }


def fmt(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    rows, corr, setup = results["rows"], results["correlations"], results["setup"]
    extractor = rows[0]["feature_extractor"] if rows else "?"
    lines = [
        f"Embedded photos at 32px; {setup['minutes']:g} min of tokenizer training each (steps from a "
        f"throughput probe), the tiny GPT of each token kind for {setup['gpt_steps']} steps, "
        f"{setup['num_samples']} samples at guidance {setup['cfg_scale']:g}; features: {extractor}. "
        f"pFID: alpha {setup['pfid_alpha']}, delta {setup['pfid_delta']} (categorical codes only).",
        "",
        "| tokenizer | tokens | bits/image | PSNR | rFID | pFID | gFID | IS | cond. acc. | train steps "
        "| train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokenizer']} | {r['tokens']} | {r['bits_per_image']:.0f} | {r['psnr']:.2f} "
            f"| {r['rfid']:.1f} | {fmt(r['pfid'])} | {r['gfid']:.1f} | {r['inception_score']:.2f} "
            f"| {r['cond_accuracy']:.2f} "
            f"| {r['tokenizer_steps']} | {r['tokenizer_seconds']:.0f} |"
        )
    lines += [
        "",
        f"Spearman rank correlation with gFID: rFID {fmt(corr['rfid_gfid'], 2)} (n={corr['rfid_gfid_n']}), "
        f"pFID {fmt(corr['pfid_gfid'], 2)} (n={corr['pfid_gfid_n']}; rFID on the same tokenizers: "
        f"{fmt(corr['rfid_gfid_categorical'], 2)}).",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "rfid", "rFID"), (axes[1], "pfid", "pFID")):
        points = [r for r in rows if r[key] is not None]
        ax.scatter([r[key] for r in points], [r["gfid"] for r in points])
        for r in points:
            ax.annotate(
                r["tokenizer"], (r[key], r["gfid"]), fontsize=8, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gFID")
    fig.suptitle("Does reconstruction quality predict generation quality?")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(ENTRIES)
    for name in names:  # post-training needs its base benched first
        base = ENTRIES[name].posttrain_of
        if base is not None and base not in names:
            raise SystemExit(
                f"--only {name} needs {base} too: post-training starts from its tokenizer and GPT"
            )
    rows, timings = [], {}
    for name in sorted(names, key=lambda n: ENTRIES[n].posttrain_of is not None):
        print(f"\n=== {name}", flush=True)
        row = bench_entry(name, ENTRIES[name], args, timings)
        timings[name] = row
        rows.append(row)
        print(f"=== {name}: " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    pfid_setup = (
        read_json(out / rows[0]["tokenizer"] / "eval" / "pfid.json") if rows and rows[0]["pfid"] else {}
    )
    results = {
        "setup": {
            "minutes": args.minutes,
            "gpt_steps": args.gpt_steps,
            "posttrain_steps": args.posttrain_steps,
            "num_samples": args.num_samples,
            "cfg_scale": args.cfg_scale,
            "pfid_alpha": pfid_setup.get("pfid_alpha"),
            "pfid_delta": pfid_setup.get("pfid_delta"),
        },
        "rows": rows,
        "correlations": correlations(rows),
    }
    (out / "tokenizers.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "tokenizers.md").write_text(markdown(results))
    plot(rows, out / "tokenizers.png")
    print("\n" + markdown(results))
    print(f"written: {out / 'tokenizers.json'}, {out / 'tokenizers.md'}, {out / 'tokenizers.png'}")
    return results


if __name__ == "__main__":
    main()
