"""End-to-end training through train.run with the real configs, shrunk to seconds on a CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN
from PIL import Image

import train
from tokenizers_vis import from_pretrained
from training.config import ConfigError, compose_config

REPO = Path(__file__).resolve().parent.parent


def test_train_writes_checkpoint_export_grid_and_metrics(tiny_run_config):
    cfg = tiny_run_config()
    metrics = train.run(cfg)
    run_dir = Path(cfg.paths.run_dir)
    # max_steps counts tokenizer steps, although the discriminator also stepped from step 2 on.
    assert metrics["steps"] == 4
    for key in ("psnr", "ssim", "codebook_usage", "perplexity", "train_images_per_second"):
        assert key in metrics
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "grids" / "reconstructions.png").is_file()
    assert (run_dir / "grids" / "reconstructions_step000004.png").is_file()
    assert (run_dir / "config.yaml").is_file()


def test_discriminator_trains_and_step_count_excludes_it(tiny_run_config):
    cfg = tiny_run_config()
    checkpoint_dir = Path(cfg.paths.run_dir) / "checkpoints"
    train.run(cfg)
    state = torch.load(checkpoint_dir / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    tokenizer_state, disc_state = state["optimizer_states"]
    # Adam's step counters: the tokenizer stepped 4 times, the discriminator from gan_start_step=2 on.
    assert next(iter(tokenizer_state["state"].values()))["step"] == 4
    assert next(iter(disc_state["state"].values()))["step"] == 2


def test_export_reproduces_the_trained_ema_exactly(tiny_run_config):
    cfg = tiny_run_config()
    train.run(cfg)
    export = from_pretrained(Path(cfg.paths.run_dir) / "export")
    state = torch.load(Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    ema_state = {k.removeprefix("ema."): v for k, v in state["state_dict"].items() if k.startswith("ema.")}
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    reference = type(export)(**export.config)
    reference.load_state_dict(ema_state, strict=True)
    reference.eval()
    with torch.no_grad():
        assert torch.equal(export.reconstruct(images), reference.reconstruct(images))


def test_rerun_resumes_and_continues_the_step_count(tiny_run_config):
    first = train.run(tiny_run_config())
    assert first["steps"] == 4
    resumed_cfg = tiny_run_config("trainer.max_steps=6")
    second = train.run(resumed_cfg)
    assert second["steps"] == 6
    # Each attempt logs to its own version folder: resuming never deletes the earlier logs.
    logs = sorted((Path(resumed_cfg.paths.run_dir) / "logs").glob("version_*/metrics.csv"))
    assert len(logs) == 2 and all("train/loss" in log.read_text() for log in logs)
    state = torch.load(Path(resumed_cfg.paths.run_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert next(iter(state["optimizer_states"][0]["state"].values()))["step"] == 6


def test_rerun_with_another_config_is_refused(tiny_run_config):
    train.run(tiny_run_config())
    with pytest.raises(ConfigError, match="module.lr"):
        train.run(tiny_run_config("module.lr=0.5"))


def test_ddp_on_cpu_with_two_processes(tmp_path, tiny_run_overrides):
    overrides = [o for o in tiny_run_overrides if not o.startswith("trainer.max_steps")]
    command = [
        sys.executable,
        "train.py",
        *overrides,
        f"paths.run_dir={tmp_path / 'ddp'}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.benchmark=false",
        "trainer.max_steps=4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["steps"] == 4
    # Two ranks of 8 images per step.
    assert (tmp_path / "ddp" / "export" / "model.safetensors").is_file()


def test_unreadable_images_are_skipped_counted_and_summed_in_metrics(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
        (root / name / "broken.jpg").write_bytes(rng.bytes(200))
    sizes = [o for o in TINY_RUN if not o.startswith(("data.samples_per_epoch", "data.val_per_class"))]
    cfg = compose_config(
        [*sizes, "data=imagenet_folder", f"data.root={root}", f"data.val_root={root}", "data.num_workers=0"]
        + [f"paths.run_dir={tmp_path / 'run'}"]
    )
    with pytest.warns(UserWarning, match="broken.jpg"):
        metrics = train.run(cfg)
    # every validation (steps 2 and 4, and the final one) reads both bad files; training may draw them too
    assert metrics["skipped_images"] >= 2 * 3
    assert (
        json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_images"]
        == metrics["skipped_images"]
    )
