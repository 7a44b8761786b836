"""scripts/evaluate.py end to end on tiny sets: rfid, gfid (npz and folder), folders, extractor choice."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import training.data
from scripts.evaluate import run
from tokenizers_vis.onedpiece import OneDPiece
from tokenizers_vis.titok import TiTok
from training.config import ConfigError, compose_config
from training.data import PhotosDataModule, to_uint8
from training.feature_net import ensure_feature_net

REPO = Path(__file__).resolve().parent.parent
CHANCE = 1 / 17


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny photos-net (16 px), held-out crops as a PNG folder and a samples.npz, and a noise folder."""
    root = tmp_path_factory.mktemp("evaluate")
    ensure_feature_net(16, root / "nets", steps=60, pool_size=512, val_per_class=4, progress=False)
    data = PhotosDataModule(16, 8, val_per_class=2)
    items = [data.val_dataset[i] for i in range(len(data.val_dataset))]
    images = to_uint8(torch.stack([item["image"] for item in items]))  # (34, 16, 16, 3)
    labels = np.array([item["label"] for item in items])
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    for name, array in (("photos", images), ("noise", noise)):
        (root / name).mkdir()
        for i, image in enumerate(array):
            Image.fromarray(image).save(root / name / f"{i:03d}.png")
    np.savez(root / "samples.npz", images=images, labels=labels)
    return root


def evaluate(workspace, *overrides):
    settings = [
        f"feature_net.root={workspace / 'nets'}",
        "feature_net.resolution=16",
        f"cache_root={workspace / 'cache'}",
        "reference_data=config",  # the workspace's samples carry no settings.json: data= (photos) is meant
        "force=true",  # a few dozen 16 px samples: below the protocol's minimum, on purpose
    ]
    return run(compose_config([*settings, *overrides], "evaluate"))


def test_identical_folders_give_zero_fid_and_different_ones_do_not(workspace):
    photos, out = workspace / "photos", workspace / "same.json"
    same = evaluate(workspace, "mode=folders", f"input1={photos}", f"input2={photos}", f"out={out}")
    assert abs(same["fid[photos-net]"]) < 1e-3
    assert json.loads(out.read_text()) == same
    assert same["feature_extractor"] == "photos-net" and same["num_samples"] == same["num_reference"] == 34
    other = evaluate(workspace, "mode=folders", f"input1={photos}", f"input2={workspace / 'noise'}")
    assert other["fid[photos-net]"] > 10 and other["precision[photos-net]"] < 0.5
    assert (workspace / "photos-folders.json").is_file(), "the default JSON sits beside input1"


def test_gfid_of_an_npz_with_labels(workspace, monkeypatch):
    npz = workspace / "samples.npz"
    result = evaluate(workspace, "mode=gfid", f"samples={npz}", "reference_samples=64")
    keys = {f"{k}[photos-net]" for k in ("fid", "is", "is_std", "precision", "recall")}
    assert keys <= set(result) and result["num_samples"] == 34 and result["num_reference"] == 64
    assert "training crops" in result["reference"] and result["resolution"] == 16
    assert result["cond_accuracy"] > 2 * CHANCE  # held-out photo crops, labelled with their photo
    assert json.loads((workspace / "samples-gfid.json").read_text()) == result

    def no_crops(self, key):
        raise AssertionError("reference crops were drawn again")

    monkeypatch.setattr(training.data.PhotoCrops, "__getitem__", no_crops)
    again = evaluate(workspace, "mode=gfid", f"samples={npz}", "reference_samples=64")
    assert again["fid[photos-net]"] == pytest.approx(result["fid[photos-net]"])  # cached statistics


def test_gfid_of_a_png_folder_has_no_conditional_accuracy(workspace):
    result = evaluate(workspace, "mode=gfid", f"samples={workspace / 'photos'}", "reference_samples=64")
    assert "cond_accuracy" not in result and result["num_samples"] == 34


def test_rfid_reconstructs_at_the_tokenizer_resolution(workspace):
    tokenizer = workspace / "tokenizer"
    model = TiTok(16, 4, "tiny", width=32, depth=1, heads=2, num_tokens=8, codebook_size=64)
    model.save_pretrained(tokenizer)
    result = evaluate(workspace, "mode=rfid", f"tokenizer_path={tokenizer}", "data.val_per_class=2")
    assert result["resolution"] == 16 and result["num_samples"] == 34  # data.resolution says 32
    assert {"fid[photos-net]", "is[photos-net]", "psnr", "ssim"} <= set(result)
    assert result["fid[photos-net]"] > 0 and 0 < result["psnr"] < 60
    assert (workspace / "tokenizer-rfid.json").is_file()


def test_rfid_at_a_target_psnr_reports_the_tokens_spent(workspace):
    tokenizer = workspace / "onedpiece"
    size = dict(image_size=16, patch_size=4, size="tiny", width=32, depth=1, heads=2)
    OneDPiece(**size, num_tokens=8, codebook_size=64).save_pretrained(tokenizer)
    common = ("mode=rfid", f"tokenizer_path={tokenizer}", "data.val_per_class=2")
    full = evaluate(workspace, *common)
    assert "mean_tokens" not in full
    easy = evaluate(workspace, *common, "target_psnr=0", f"out={workspace / 'easy.json'}")
    assert easy["mean_tokens"] == 1 and easy["num_tokens"] == 8 and easy["target_psnr"] == 0
    impossible = evaluate(workspace, *common, "target_psnr=99", f"out={workspace / 'hard.json'}")
    assert impossible["mean_tokens"] == 8  # no prefix reaches it: every crop keeps all N tokens
    assert impossible["psnr"] == pytest.approx(full["psnr"], abs=1e-4)  # so it decodes as plain rfid does
    with pytest.raises(ConfigError, match="target_psnr"):
        evaluate(workspace, "mode=pfid", *common[1:], "target_psnr=20")


def test_floor_scores_reconstructed_training_crops_outside_the_reference(workspace, monkeypatch):
    tokenizer = workspace / "floor_tokenizer"
    TiTok(16, 4, "tiny", width=32, depth=1, heads=2, num_tokens=8, codebook_size=64).save_pretrained(
        tokenizer
    )
    settings = ["mode=floor", f"tokenizer_path={tokenizer}", "reference_samples=64", "floor_samples=48"]
    untrained = evaluate(workspace, *settings)
    assert untrained["num_samples"] == 48 and untrained["num_reference"] == 64
    assert untrained["samples"] == "reconstructions of training crops 64..111"
    assert {"fid[photos-net]", "cond_accuracy"} <= set(untrained)
    assert (workspace / "floor_tokenizer-floor.json").is_file()

    seen = []

    def identity(self, images):
        seen.append(images)
        return images

    monkeypatch.setattr(TiTok, "reconstruct", identity)  # a lossless tokenizer: its floor is real crops
    lossless = evaluate(workspace, *settings)
    crops = PhotosDataModule(16, 8).train_dataset
    first = torch.stack([crops[64 + i]["image"] for i in range(len(seen[0]))])
    assert torch.equal(seen[0], first), "floor reconstructs the crops after the reference's"
    assert lossless["fid[photos-net]"] < untrained["fid[photos-net]"] / 2
    assert lossless["cond_accuracy"] > untrained["cond_accuracy"]


def test_auto_extractor_is_inception_when_its_weights_are_set(workspace):
    folders = ["mode=folders", f"input1={workspace / 'photos'}", f"input2={workspace / 'photos'}"]
    with pytest.raises(FileNotFoundError, match="paths.inception_weights"):
        evaluate(workspace, *folders, f"paths.inception_weights={workspace / 'absent.pth'}")
    with pytest.raises(FileNotFoundError, match="paths.inception_weights"):
        evaluate(workspace, *folders, "extractor=inception")


def test_bad_commands_fail_in_one_line(workspace):
    with pytest.raises(ConfigError, match="mode"):
        evaluate(workspace, f"input1={workspace / 'photos'}")
    with pytest.raises(ConfigError, match="input2"):
        evaluate(workspace, "mode=folders", f"input1={workspace / 'photos'}")
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate(workspace, "mode=gfid", f"samples={workspace / 'absent.npz'}")


def test_command_line(workspace, tmp_path):
    out = tmp_path / "cli.json"
    command = [sys.executable, str(REPO / "scripts" / "evaluate.py"), "mode=folders"]
    command += [f"input1={workspace / 'photos'}", f"input2={workspace / 'noise'}", f"out={out}"]
    command += [f"feature_net.root={workspace / 'nets'}", "feature_net.resolution=16"]
    command += [f"cache_root={workspace / 'cache'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "fid[photos-net]" in finished.stdout and json.loads(out.read_text())["fid[photos-net]"] > 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.json"], "nothing else written where it ran"
