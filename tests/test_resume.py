"""Exact resume: a run killed with SIGKILL and rerun ends bitwise equal to an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN, TINY_SIZES
from safetensors.torch import load_file

from training.checkpoints import (
    AtomicCheckpointIO,
    RandomStates,
    capture_random_state,
    previous_path,
    restore_random_state,
    resume_checkpoint,
)
from training.data import KeySampler

REPO = Path(__file__).resolve().parent.parent
STEPS, EVERY = 18, 3
SCHEDULE = [
    f"trainer.max_steps={STEPS}",
    f"callbacks.checkpoint.every_n_train_steps={EVERY}",
    "trainer.val_check_interval=9",
]
BASE = [
    o for o in TINY_RUN if not o.startswith(("trainer.max_steps", "callbacks.checkpoint", "trainer.val_"))
]
GAN = ["module.loss.gan_weight=0.1", "module.loss.gan_start_step=2"]
GAN += ["module.loss.disc_channels=8", "module.loss.disc_layers=1"]
# One-D-Piece draws a tail length per image from torch's RNG at every step: the random states must resume.
QUIET = ["trainer.log_every_n_steps=1", "trainer.enable_model_summary=false", "callbacks.progress=null"]
ONEDPIECE = ["+experiment=onedpiece_quickstart", *TINY_SIZES, *GAN, *QUIET]
# Two CPU processes (gloo): every rank's random states and the LeCam EMAs (averaged over ranks) resume.
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
DDP += ["trainer.benchmark=false"]
CONFIGS = {
    "titok_gan": BASE + SCHEDULE,
    "onedpiece_gan": ONEDPIECE + SCHEDULE,
    "onedpiece_gan_ddp": ONEDPIECE + SCHEDULE + DDP,
}
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on two cores


def command(overrides, run_dir):
    return [sys.executable, str(REPO / "train.py"), *overrides, f"paths.run_dir={run_dir}"]


def train(overrides, run_dir):
    result = subprocess.run(
        command(overrides, run_dir), cwd=REPO, capture_output=True, text=True, timeout=600, env=ONE_THREAD
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_state(run_dir):
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return checkpoint, load_file(run_dir / "export" / "model.safetensors")


def assert_bitwise_equal(run_dir, reference_dir):
    (checkpoint, export), (reference, reference_export) = final_state(run_dir), final_state(reference_dir)
    assert checkpoint["global_step"] == reference["global_step"]
    weights, expected = checkpoint["state_dict"], reference["state_dict"]
    assert weights.keys() == expected.keys()
    differing = [key for key in expected if not torch.equal(weights[key], expected[key])]
    assert not differing, f"{len(differing)} of {len(expected)} tensors differ, e.g. {differing[:3]}"
    for ours, theirs in zip(checkpoint["optimizer_states"], reference["optimizer_states"], strict=True):
        for state, expected_state in zip(ours["state"].values(), theirs["state"].values(), strict=True):
            assert all(torch.equal(state[k], expected_state[k]) for k in expected_state)
    assert all(torch.equal(export[key], reference_export[key]) for key in reference_export)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    for name, overrides in CONFIGS.items():
        train(overrides, root / name)
    return root


@pytest.mark.parametrize(
    "name, extra, truncate",
    [
        ("titok_gan", [], False),  # the GAN is active from step 2, so across every kill
        ("onedpiece_gan", [], False),
        ("onedpiece_gan", ["data.num_workers=2"], True),  # workers, and a truncated last.ckpt
        ("onedpiece_gan_ddp", [], False),
    ],
)
def test_a_killed_run_resumes_bitwise(references, tmp_path, name, extra, truncate):
    overrides, run_dir = CONFIGS[name] + extra, tmp_path / "run"
    process = subprocess.Popen(  # its own process group: a DDP run's second rank dies with it
        command(overrides, run_dir),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ONE_THREAD,
        start_new_session=True,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(random.uniform(0.0, 0.15))  # a random step after the first checkpoint
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert killed_at < STEPS

    if truncate:  # as if the disk filled up during the last write: resume from the one before
        data = last.read_bytes()
        last.write_bytes(data[: len(data) // 2])
    result = train(overrides, run_dir)
    if truncate:
        assert "truncated or unreadable" in result.stderr and (last.parent / "last.ckpt.corrupt").is_file()
    assert_bitwise_equal(run_dir, references / name)


def test_random_states_round_trip_and_validation_leaves_them_alone():
    callback = RandomStates()
    state = callback.state_dict()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    callback.load_state_dict(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]

    before = capture_random_state()
    callback.on_validation_start(None, None)
    torch.rand(5), np.random.rand(5), random.random()  # validation draws
    callback.on_validation_end(None, None)
    after = capture_random_state()
    assert torch.equal(before["torch"], after["torch"]) and torch.equal(
        before["numpy"]["keys"], after["numpy"]["keys"]
    )
    restore_random_state(after)


def test_key_sampler_skips_exactly_the_trained_part_of_one_epoch():
    sampler = KeySampler(20, shuffle=True, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sorted(full) == list(range(40, 60)) and full != sorted(full)
    sampler.skip_once(2, 8)
    assert list(sampler) == full[8:]
    assert list(sampler) == full  # only once
    sampler.skip_once(1, 8)  # another epoch's position is ignored
    assert list(sampler) == full


def test_a_truncated_or_empty_last_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    io = AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, last)
    io.save_checkpoint({"global_step": 2}, last)
    assert torch.load(previous_path(last), weights_only=True)["global_step"] == 1
    assert resume_checkpoint(tmp_path) == last
    last.write_bytes(b"")
    assert resume_checkpoint(tmp_path) == previous_path(last)
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "resuming from" in message and "last.prev.ckpt" in message
    previous_path(last).write_bytes(previous_path(last).read_bytes()[:10])
    assert resume_checkpoint(tmp_path) is None
    assert "starts afresh" in capsys.readouterr().err
