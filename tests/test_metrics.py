"""FID-family plumbing (training/metrics.py) and photos-net (training/feature_net.py), on tiny sets."""

import json
import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

import training.feature_net as feature_net
from scripts.train_feature_net import main as train_feature_net_main
from training.data import PhotosDataModule
from training.feature_net import PhotosNet, PhotosNetExtractor, ensure_feature_net, load_feature_net
from training.metrics import (
    INCEPTION_FEATURES,
    FidelityImages,
    conditional_accuracy,
    feature_dimension,
    image_metrics,
    inception_weights,
    isc_splits,
    psnr,
    reference_statistics,
    ssim,
    uint8_images,
    weights_fingerprint,
)

TINY = dict(steps=60, pool_size=512, val_per_class=4, progress=False)  # a few seconds, well above chance
CHANCE = 1 / 17


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net_path(tmp_path_factory):
    return ensure_feature_net(16, tmp_path_factory.mktemp("nets"), **TINY)


@pytest.fixture(scope="module")
def val_crops():
    """34 held-out crops at 16 px: float images (34, 3, 16, 16) in [-1, 1] and their labels (34,)."""
    data = PhotosDataModule(16, 8, val_per_class=2)
    items = [data.val_dataset[i] for i in range(len(data.val_dataset))]
    return torch.stack([item["image"] for item in items]), torch.tensor([item["label"] for item in items])


def metrics(input1, input2, net_path, tmp_path, **kwargs):
    return image_metrics(input1, input2, weights=net_path, cache_root=tmp_path / "cache", **kwargs)


# ----------------------------------------------------------------------------- photos-net
def test_photos_net_registers_with_torch_fidelity_with_declared_shapes(net_path):
    assert FEATURE_EXTRACTORS_REGISTRY["photos-net"] is PhotosNetExtractor
    extractor = create_feature_extractor(
        "photos-net", ["features", "logits"], cuda=False, feature_extractor_weights_path=str(net_path)
    )
    for size in (16, 40):  # its training resolution, and another that it resizes
        images = torch.randint(0, 256, (5, 3, size, size), dtype=torch.uint8)
        features, logits = extractor(images)
        assert features.shape == (5, 256) and logits.shape == (5, 17)
    assert PhotosNetExtractor.get_default_feature_layer_for_metric("fid") == "features"
    assert PhotosNetExtractor.get_default_feature_layer_for_metric("isc") == "logits"
    with pytest.raises(ValueError, match="uint8"):
        extractor(torch.zeros(2, 3, 16, 16))


def test_photos_net_extractor_never_downloads():
    with pytest.raises(FileNotFoundError, match="feature_extractor_weights_path"):
        PhotosNetExtractor("photos-net", ["features"])


def test_saved_net_records_resolution_classes_and_accuracy(net_path):
    meta = json.loads((net_path / "config.json").read_text())
    assert meta["model_type"] == "photos-net"
    assert meta["resolution"] == 16 and len(meta["classes"]) == 17
    assert meta["val_accuracy"] > 2 * CHANCE
    net = load_feature_net(net_path)
    assert net.report["val_accuracy"] == meta["val_accuracy"] and not net.training
    with pytest.raises(FileNotFoundError, match="train_feature_net.py"):
        load_feature_net(net_path.parent / "missing")


def test_train_script_beats_chance_and_reuses_its_net(tmp_path, monkeypatch):
    args = ["--resolution", "16", "--steps", "60", "--pool-size", "512", "--root", str(tmp_path)]
    path = train_feature_net_main(args)
    assert path == tmp_path / "photos-net-16"
    assert json.loads((path / "config.json").read_text())["val_accuracy"] > 2 * CHANCE

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(feature_net, "train_feature_net", no_training)
    assert train_feature_net_main(args) == path  # reused from the cache
    with pytest.raises(AssertionError, match="trained again"):
        train_feature_net_main(args + ["--force"])
    assert (path / "model.safetensors").is_file(), "a failed retraining must leave the old net in place"


# ----------------------------------------------------------------------------- conditional accuracy
class StubNet(PhotosNet):
    """Predicts class 0 for every image whose first pixel is dark, class 1 otherwise."""

    def forward(self, images):
        bright = (images.float()[:, 0, 0, 0] > 127).long()  # (B,)
        return torch.zeros(len(images), 4), torch.nn.functional.one_hot(bright, 2).float()


def test_conditional_accuracy_counts_samples_of_their_class():
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    images[2:] = 255  # predicted classes 0, 0, 1, 1
    net = StubNet(["a", "b"])
    assert conditional_accuracy(images, [0, 0, 1, 1], net) == 1.0
    assert conditional_accuracy(images, np.array([0, 1, 1, 1]), net, batch_size=3) == 0.75
    with pytest.raises(ValueError, match="labels"):
        conditional_accuracy(images, [0, 1], net)


def test_conditional_accuracy_of_held_out_crops_beats_chance(net_path, val_crops):
    images, labels = val_crops
    net = load_feature_net(net_path)
    as_float = conditional_accuracy(images, labels, net)
    as_uint8 = conditional_accuracy(uint8_images(images), labels, net)
    assert as_float > 2 * CHANCE and abs(as_float - as_uint8) <= 2 / len(images)  # PNG rounding may flip one


# ----------------------------------------------------------------------------- FID family
def test_identical_sets_give_zero_fid_with_extractor_named_keys(net_path, val_crops, tmp_path):
    images = val_crops[0]
    result = metrics(images, images.clone(), net_path, tmp_path)
    assert set(result) == {f"{k}[photos-net]" for k in ("fid", "is", "is_std", "precision", "recall")}
    assert abs(result["fid[photos-net]"]) < 1e-3
    assert result["precision[photos-net]"] == result["recall[photos-net]"] == 1.0
    assert result["is[photos-net]"] >= 1.0


def test_photos_against_noise_or_flat_images_give_large_fid(net_path, val_crops, tmp_path):
    images = val_crops[0]
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    flat = torch.zeros_like(images)
    for other in (noise, flat):
        assert metrics(images, other, net_path, tmp_path, isc=False, prc=False)["fid[photos-net]"] > 10


def test_reference_statistics_are_cached_and_keyed_by_weights(net_path, val_crops, tmp_path):
    images = val_crops[0]
    first = metrics(images, images, net_path, tmp_path, cache_name="ref")
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached == [f"ref-{weights_fingerprint(net_path)}.safetensors"]

    class Unreadable(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, index):
            raise AssertionError("the cached reference was read again")

    again = metrics(images, Unreadable(), net_path, tmp_path, cache_name="ref")
    assert again == pytest.approx(first)


class Payload:
    """Unpickling this creates `marker`: what a crafted cache file would do to a loader that unpickles."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_cache_file_is_never_executed(net_path, val_crops, tmp_path):
    images = val_crops[0]
    cache, marker = tmp_path / "cache", tmp_path / "executed"
    cache.mkdir()
    name = f"ref-{weights_fingerprint(net_path)}"
    # where torch-fidelity would look for features and statistics, and the project's own cache file
    for file in [f"{name}-photos-net-features-{layer}.pt" for layer in ("2048", "logits_unbiased", "128")]:
        torch.save(Payload(marker), cache / file)
    torch.save(Payload(marker), cache / f"{name}-photos-net-stat-fid-128.pt")
    (cache / f"{name}.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.warns(UserWarning, match="unreadable feature cache"):
        result = metrics(images, images, net_path, tmp_path, cache_name="ref")
    assert not marker.exists()
    assert result["fid[photos-net]"] == pytest.approx(0.0, abs=1e-3)
    # the bad file was replaced by real features: the next call reads them
    assert metrics(images, images, net_path, tmp_path, cache_name="ref") == pytest.approx(result)
    assert not marker.exists()


def test_fid_against_reference_statistics_of_the_same_features(net_path, val_crops, tmp_path):
    """Statistics written as ADM's reference batches hold them: FID ~ 0 against the images they summarise,
    and |mu shift|^2 against shifted ones; precision/recall need images and are left out."""
    images = uint8_images(val_crops[0])  # (34, 3, 16, 16)
    with torch.no_grad():
        features = load_feature_net(net_path)(images)[0].double().numpy()  # (34, D)
    dimension = feature_dimension("photos-net", net_path)
    assert features.shape[1] == dimension and feature_dimension("inception", None) == INCEPTION_FEATURES
    for name, shift in (("same", 0.0), ("shifted", 0.5)):
        np.savez(tmp_path / f"{name}.npz", mu=features.mean(0) + shift, sigma=np.cov(features, rowvar=False))
    same = metrics(
        images, None, net_path, tmp_path, reference_stats=reference_statistics(tmp_path / "same.npz")
    )
    assert abs(same["fid[photos-net]"]) < 1e-2 and "precision[photos-net]" not in same
    shifted = reference_statistics(tmp_path / "shifted.npz", dimension)
    far = metrics(images, None, net_path, tmp_path, reference_stats=shifted)
    assert far["fid[photos-net]"] == pytest.approx(dimension * 0.5**2, abs=0.1)
    with pytest.raises(ValueError, match="input2 or against reference_stats"):
        metrics(images, images, net_path, tmp_path, reference_stats=shifted)


def test_reference_statistics_refuse_missing_keys_pickles_and_other_sizes(tmp_path):
    np.savez(tmp_path / "adm.npz", mu=np.zeros(4, np.float32), sigma=np.eye(4), mu_s=np.zeros(2))
    assert {k: v.dtype for k, v in reference_statistics(tmp_path / "adm.npz", 4).items()} == {
        "mu": np.float64,
        "sigma": np.float64,
    }
    with pytest.raises(ValueError, match=r"4-d features, but the extractor's features are 2048-d"):
        reference_statistics(tmp_path / "adm.npz", 2048)
    np.savez(tmp_path / "inception.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="2048-d features .Inception's: extractor=inception."):
        reference_statistics(tmp_path / "inception.npz", 256)
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"has no mu and sigma \(keys: arr_0\)"):
        reference_statistics(tmp_path / "samples.npz")
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(ValueError, match="must be"):
        reference_statistics(tmp_path / "shapes.npz")
    np.savez(tmp_path / "pickled.npz", mu=np.array([Fraction(1, 2)], dtype=object), sigma=np.eye(1))
    with pytest.raises(ValueError, match="not a readable .npz"):  # never unpickled
        reference_statistics(tmp_path / "pickled.npz")
    with pytest.raises(ValueError, match="not a readable .npz"):
        reference_statistics(tmp_path / "absent.npz")


def test_small_sets_shrink_is_splits_and_skip_precision_recall(net_path, val_crops, tmp_path):
    assert [isc_splits(n) for n in (3, 150, 999, 50_000)] == [1, 1, 9, 10]
    images = val_crops[0]
    with pytest.warns(UserWarning, match="precision/recall skipped"):
        result = metrics(images[:3], images, net_path, tmp_path)
    assert set(result) == {"fid[photos-net]", "is[photos-net]", "is_std[photos-net]"}
    assert set(metrics(images[:3], None, net_path, tmp_path)) == {"is[photos-net]", "is_std[photos-net]"}
    with pytest.raises(ValueError, match="at least 2"):
        metrics(images[:1], images, net_path, tmp_path)


def test_folder_input_matches_tensor_input(net_path, val_crops, tmp_path):
    images = uint8_images(val_crops[0])  # (N, 3, H, W)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    from_folder = metrics(folder, images, net_path, tmp_path, isc=False, prc=False)
    assert abs(from_folder["fid[photos-net]"]) < 1e-3


def test_inception_weights_must_be_a_present_plain_state_dict(tmp_path, val_crops):
    for missing in (None, tmp_path / "absent.pth"):
        with pytest.raises(FileNotFoundError, match="paths.inception_weights"):
            image_metrics(val_crops[0], val_crops[0], extractor="inception", weights=missing)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"weight": Fraction(1, 2)}, unsafe)  # an arbitrary object: would need unpickling code
    with pytest.raises(ValueError, match="not a plain state dict"):
        inception_weights(unsafe)
    plain = tmp_path / "plain.pth"
    torch.save({"weight": torch.zeros(2)}, plain)
    assert inception_weights(plain) == plain
    with pytest.raises(ValueError, match="extractor"):
        image_metrics(val_crops[0], extractor="vgg")


def test_fidelity_images_accepts_every_source(val_crops):
    images = val_crops[0][:4]
    expected = uint8_images(images)  # (4, 3, 16, 16)
    as_array = expected.permute(0, 2, 3, 1).numpy()  # the samples.npz layout
    data = PhotosDataModule(16, 8, val_per_class=2).val_dataset
    for source in (images, expected, as_array, data):
        dataset = FidelityImages(source, length=4)
        assert len(dataset) == 4 and dataset[3].dtype == torch.uint8
        assert torch.equal(torch.stack([dataset[i] for i in range(4)]), expected)
        with pytest.raises(IndexError):
            dataset[4]
    with pytest.raises(ValueError, match="uint8"):
        FidelityImages(as_array.astype(np.float32))


def test_weights_fingerprint_follows_content(tmp_path):
    file = tmp_path / "w.pth"
    file.write_bytes(b"one")
    first = weights_fingerprint(file)
    file.write_bytes(b"two")
    assert weights_fingerprint(file) != first


def test_psnr_and_ssim_still_work():
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.all(psnr(images, images) > 90) and torch.allclose(ssim(images, images), torch.ones(2))


def test_inception_runs_from_a_weights_file_without_downloading(val_crops, tmp_path, monkeypatch):
    """A randomly initialised Inception saved to a file: the plumbing of the standard extractor, offline."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download Inception weights")

    monkeypatch.setattr(inception, "load_state_dict_from_url", no_download)
    with monkeypatch.context() as patch:  # build it once without weights, to get a state dict to save
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        patch.setattr(inception.torch, "load", lambda *args, **kwargs: {})
        model = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], "unused.pth")
    weights = tmp_path / "inception.pth"
    torch.save(model.state_dict(), weights)
    images = val_crops[0][:6]
    result = image_metrics(images, images, extractor="inception", weights=weights, cache_root=tmp_path)
    assert set(result) == {f"{k}[inception]" for k in ("fid", "is", "is_std", "precision", "recall")}
    assert abs(result["fid[inception]"]) < 1e-3
