"""training/evaluation.py (scripts/evaluate.py) end to end on tiny sets: rfid (+ LPIPS), gfid (npz, ADM's npz,
folder, reference statistics), folders, extractor choice."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

import training.data
from tokenizers_vis.onedpiece import OneDPiece
from tokenizers_vis.titok import TiTok
from training import evaluation
from training.config import ConfigError, compose_config
from training.data import PhotosDataModule, to_uint8
from training.evaluation import run
from training.feature_net import ensure_feature_net, load_feature_net

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


def test_gfid_reads_adm_sample_batches(workspace):
    """ADM's samplers write the images at arr_0 and class labels at arr_1: the same numbers as our layout."""
    ours, adm = workspace / "samples.npz", workspace / "adm" / "samples.npz"
    adm.parent.mkdir()
    with np.load(ours) as npz:
        np.savez(adm, arr_0=npz["images"], arr_1=npz["labels"])
    common = ("mode=gfid", "reference_samples=64")
    expected = evaluate(workspace, *common, f"samples={ours}", f"out={workspace / 'ours.json'}")
    result = evaluate(workspace, *common, f"samples={adm}")
    assert result["fid[photos-net]"] == pytest.approx(expected["fid[photos-net]"])
    assert result["cond_accuracy"] == expected["cond_accuracy"] and result["num_samples"] == 34


# ----------------------------------------------------------------------------- reference statistics
def photos_net_statistics(workspace, path, shift=0.0):
    """mu / sigma of photos-net's features of the workspace's samples, mu shifted by `shift`, saved as ADM's
    reference batches hold them -> the feature dimension."""
    net = load_feature_net(ensure_feature_net(16, workspace / "nets"))
    with np.load(workspace / "samples.npz") as npz:
        images = torch.from_numpy(npz["images"]).permute(0, 3, 1, 2)  # uint8 (34, 3, 16, 16)
    with torch.no_grad():
        features = net(images)[0].double().numpy()  # (34, D)
    np.savez(path, mu=features.mean(0) + shift, sigma=np.cov(features, rowvar=False))
    return features.shape[1]


def evaluate_settings(workspace, **settings):
    """evaluation.evaluate(), the keyword API, with the workspace's photos-net and cache."""
    common = dict(feature_net={"root": workspace / "nets", "resolution": 16}, cache_root=workspace / "cache")
    return evaluation.evaluate(**common, force=True, **settings)


def test_gfid_against_reference_statistics_of_the_samples_own_features(workspace):
    same, shifted = workspace / "same_stats.npz", workspace / "shifted_stats.npz"
    dimension = photos_net_statistics(workspace, same)
    photos_net_statistics(workspace, shifted, shift=1.0)
    samples = workspace / "samples.npz"
    common = dict(samples=samples, extractor="photos-net", reference_data="recorded")  # no data is read
    result = evaluate_settings(workspace, mode="gfid", reference_stats=same, **common)
    assert abs(result["fid[photos-net]"]) < 1e-2 and "is[photos-net]" in result
    assert "precision[photos-net]" not in result, "precision/recall need reference images"
    assert result["reference_stats"] == str(same) and result["num_reference"] is None
    assert "cond_accuracy" not in result and f"{dimension}-d features" in result["reference"]
    far = evaluate_settings(
        workspace, mode="gfid", reference_stats=shifted, out=workspace / "far.json", **common
    )
    assert far["fid[photos-net]"] == pytest.approx(dimension, abs=0.5)  # |mu shift|^2 = D * 1^2


def test_reference_statistics_are_checked_before_any_feature_is_computed(workspace):
    samples, stats = workspace / "samples.npz", workspace / "checked"
    stats.mkdir()
    np.savez(stats / "inception.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(stats / "no_sigma.npz", mu=np.zeros(8), mu_s=np.zeros(8))
    np.savez(stats / "pickled.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    common = dict(mode="gfid", samples=samples)
    with pytest.raises(ValueError, match="2048-d features .*Inception's.* are 256-d"):
        evaluate_settings(
            workspace, **common, reference_stats=stats / "inception.npz", extractor="photos-net"
        )
    with pytest.raises(ConfigError, match="no mu and sigma"):
        evaluate_settings(workspace, **common, reference_stats=stats / "no_sigma.npz")
    with pytest.raises(ConfigError, match="not a readable .npz"):  # np.load(allow_pickle=False)
        evaluate_settings(workspace, **common, reference_stats=stats / "pickled.npz")
    with pytest.raises(FileNotFoundError, match="paths.inception_weights"):  # auto: ADM's are Inception's
        evaluate_settings(workspace, **common, reference_stats=stats / "inception.npz")
    with pytest.raises(ConfigError, match="reference_stats is the reference of mode=gfid"):
        evaluate_settings(
            workspace,
            mode="folders",
            input1=workspace / "photos",
            input2=workspace / "photos",
            reference_stats=stats / "inception.npz",
        )


def test_adm_reference_preset_needs_its_statistics_and_50000_samples(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the preset's default: ADM's file name, in the working directory
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ConfigError, match="reference_stats=VIRTUAL_imagenet256_labeled.npz does not exist"):
        evaluation.evaluate(
            "gfid", reference="adm_imagenet256", samples=workspace / "samples.npz", force=True
        )
    with pytest.raises(ConfigError, match="min_samples=50000"):
        evaluation.evaluate(
            "gfid",
            reference="adm_imagenet256",
            samples=workspace / "samples.npz",
            reference_stats=tmp_path / "stats.npz",
        )


# ----------------------------------------------------------------------------- LPIPS
@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    """A randomly initialised torchvision VGG16 trunk in its state-dict layout, saved with safetensors, and an
    LPIPS linear-layer file of ones (the same weighting as none)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("lpips")
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    save_file(
        {f"features.{k}": v.contiguous() for k, v in features.state_dict().items()},
        root / "vgg16.safetensors",
    )
    channels = (64, 128, 256, 512, 512)
    save_file(
        {f"lin{i}.model.1.weight": torch.ones(1, c, 1, 1) for i, c in enumerate(channels)},
        root / "lin.safetensors",
    )
    return root / "vgg16.safetensors", root / "lin.safetensors"


def test_rfid_reports_lpips_from_local_weights_and_omits_it_without(
    workspace, vgg_weights, monkeypatch, capsys
):
    tokenizer = workspace / "lpips_tokenizer"
    TiTok(16, 4, "tiny", width=32, depth=1, heads=2, num_tokens=8, codebook_size=64).save_pretrained(
        tokenizer
    )
    vgg, linear = vgg_weights
    common = ("mode=rfid", f"tokenizer_path={tokenizer}", "data.val_per_class=2")
    plain = evaluate(workspace, *common)
    assert not any(key.startswith("lpips") for key in plain), "no weights: no column, never downloaded"
    assert "lpips: not measured, paths.vgg_weights is not set" in capsys.readouterr().out

    monkeypatch.setattr(TiTok, "reconstruct", lambda self, images: images)  # LPIPS(x, x)
    same = evaluate(workspace, *common, f"paths.vgg_weights={vgg}")
    assert same["lpips[vgg-baseline]"] == 0 and same["lpips_weights"] == {"vgg": str(vgg), "linear": None}
    noise = torch.Generator().manual_seed(0)
    monkeypatch.setattr(TiTok, "reconstruct", lambda self, x: x + 0.3 * torch.randn(x.shape, generator=noise))
    noisy = evaluate(workspace, *common, f"paths.vgg_weights={vgg}")
    assert noisy["lpips[vgg-baseline]"] > 0 and {"psnr", "ssim"} <= set(noisy)
    calibrated = evaluate(workspace, *common, f"paths.vgg_weights={vgg}", f"paths.lpips_weights={linear}")
    assert "lpips[vgg-baseline]" not in calibrated and calibrated["lpips[vgg]"] > 0  # layers of ones

    with pytest.raises(ConfigError, match="paths.vgg_weights=.*does not exist"):
        evaluate(workspace, *common, f"paths.vgg_weights={workspace / 'absent.safetensors'}")
    with pytest.raises(ConfigError, match="set paths.vgg_weights too"):
        evaluate(workspace, *common, f"paths.lpips_weights={linear}")


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
