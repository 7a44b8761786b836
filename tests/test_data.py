"""Tests for training/data.py and scripts/make_shards.py: tiny sizes, CPU, a few seconds."""

import importlib.util
import io
import json
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.fabric.utilities.data import _set_sampler_epoch
from PIL import Image

from training.config import compose_config
from training.data import (
    ClassFolderDataModule,
    DataError,
    ImageFiles,
    KeySampler,
    PhotosDataModule,
    ShardsDataModule,
    load_photos,
    scan_class_folder,
    to_tensor_image,
    to_uint8,
)

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_shards", ROOT / "scripts" / "make_shards.py")
make_shards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_shards)


def first_batch(loader):
    return next(iter(loader))


def image_hashes(batches):
    return [img.numpy().tobytes() for batch in batches for img in batch["image"]]


# ----------------------------------------------------------------------------- conversions
def test_tensor_uint8_round_trip():
    array = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tensor = to_tensor_image(array)
    assert tensor.shape == (3, 5, 7) and tensor.min() >= -1 and tensor.max() <= 1
    np.testing.assert_array_equal(to_uint8(tensor), array)
    np.testing.assert_array_equal(to_uint8(to_tensor_image(Image.fromarray(array))[None])[0], array)
    assert to_tensor_image(array[..., 0]).shape == (3, 5, 7)  # grayscale -> RGB


# ----------------------------------------------------------------------------- embedded photos
def test_all_embedded_photos_load_offline():
    names = [name for name, _ in load_photos()]
    assert len(names) == 17 and {"astronaut", "immunohistochemistry", "camera", "flower"} <= set(names)
    assert all(photo.dtype == np.uint8 and photo.shape[2:] == (3,) for _, photo in load_photos())
    dm = PhotosDataModule(resolution=32, batch_size=4)
    assert dm.class_names == names and dm.num_classes == 17


@pytest.mark.parametrize("resolution", [32, 64])
def test_photo_batches_shape_and_range(resolution):
    dm = PhotosDataModule(resolution=resolution, batch_size=8, samples_per_epoch=16, val_per_class=2)
    for batch in (first_batch(dm.train_dataloader()), first_batch(dm.val_dataloader())):
        assert batch["image"].shape == (8, 3, resolution, resolution)
        assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.long
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        assert batch["image"].std() > 0.05  # real content, not a constant
    assert len(list(dm.train_dataloader())) == 2
    assert len(dm.val_dataset) == 2 * dm.num_classes


def test_photo_crops_deterministic_under_seed():
    modules = [PhotosDataModule(resolution=32, batch_size=8, seed=s) for s in (0, 0, 1)]
    batches = [first_batch(dm.train_dataloader()) for dm in modules]
    assert torch.equal(batches[0]["image"], batches[1]["image"])
    assert torch.equal(batches[0]["label"], batches[1]["label"])
    assert not torch.equal(batches[0]["image"], batches[2]["image"])
    vals = [dm.val_dataset for dm in modules]
    assert torch.equal(vals[0][5]["image"], vals[1][5]["image"])
    assert not torch.equal(vals[0][5]["image"], vals[2][5]["image"])


def test_photo_epochs_differ_and_ranks_split():
    dm = PhotosDataModule(resolution=32, batch_size=8, samples_per_epoch=64)
    loader = dm.train_dataloader()
    epoch0 = first_batch(loader)["image"]
    _set_sampler_epoch(loader, 1)  # what Lightning calls at the start of every epoch
    assert list(loader.sampler)[:2] == [64, 65]
    assert not torch.equal(first_batch(loader)["image"], epoch0)
    loader.sampler.set_epoch(0)
    assert torch.equal(first_batch(loader)["image"], epoch0)
    ranks = [KeySampler(10, num_replicas=2, rank=r) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(3)
    ids = [list(sampler) for sampler in ranks]
    assert len(ids[0]) == len(ids[1]) == len(ranks[0]) == 5
    assert sorted(ids[0] + ids[1]) == list(range(30, 40))


def test_photo_labels_cover_photos_and_train_val_disjoint():
    dm = PhotosDataModule(resolution=32, batch_size=8, val_per_class=4)
    train, val = dm.train_dataset, dm.val_dataset
    train_boxes = [train.crop_box(g) for g in range(3000)]
    assert {box[0] for box in train_boxes} == set(range(dm.num_classes))
    val_boxes = [val.crop_box(i) for i in range(len(val))]
    assert [box[0] for box in val_boxes] == [
        p for _ in range(4) for p in range(dm.num_classes)
    ]  # interleaved
    for split, boxes in ((train, train_boxes), (val, val_boxes)):
        for photo, top, left, side, _ in boxes:
            start, stop = split.region(photo)
            assert start <= left and left + side <= stop
            assert 0 <= top and top + side <= train.photos[photo].shape[0]
    for photo in range(dm.num_classes):  # the column ranges themselves do not overlap and split the photo
        (train_start, train_stop), (val_start, val_stop) = train.region(photo), val.region(photo)
        assert train_start == 0 and train_stop == val_start < val_stop == train.photos[photo].shape[1]
        assert val_stop - val_start == pytest.approx(0.25 * val_stop, abs=1)


@pytest.mark.parametrize("resolution", [8, 512])
def test_photo_extreme_resolutions(resolution):
    dm = PhotosDataModule(resolution, batch_size=2, val_per_class=1, val_fraction=0.05, min_scale=1.0)
    assert dm.train_dataset[7]["image"].shape == (3, resolution, resolution)
    narrowest = min(range(dm.num_classes), key=lambda p: np.diff(dm.val_dataset.region(p))[0])
    photo, _, _, side, _ = dm.val_dataset.crop_box(narrowest)  # strip narrower than a full-scale crop
    assert side == np.diff(dm.val_dataset.region(photo))[0]
    assert dm.val_dataset[narrowest]["image"].shape == (3, resolution, resolution)


# ----------------------------------------------------------------------------- class folders
def make_class_folder(root: Path, per_class: int = 4, corrupt: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for name in ["cat", "dog", "fox"]:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)), 3)
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / name / f"{name}{i}.png")
    if corrupt:
        (root / "dog" / "broken.jpg").write_bytes(rng.bytes(300))
    return root


def test_class_folder_skips_corrupt_file(tmp_path):
    root = make_class_folder(tmp_path / "images")
    dm = ClassFolderDataModule(root=str(root), resolution=16, batch_size=3, val_root=str(root))
    assert dm.class_names == ["cat", "dog", "fox"] and dm.num_classes == 3
    with pytest.warns(UserWarning, match=r"broken\.jpg"):
        batches = list(dm.train_dataloader())
    assert len(batches) == 13 // 3
    assert all(b["image"].min() >= -1 and b["image"].max() <= 1 for b in batches)
    assert all(b["label"].dtype == torch.long for b in batches)
    # the bad file leaves a hole in its batch, counted, instead of a copy of another image
    assert sum(int(b["skipped"]) for b in batches) <= 1
    assert all(len(b["image"]) + int(b["skipped"]) == 3 for b in batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        val = list(dm.val_dataloader())
    assert sum(len(b["label"]) for b in val) == 12 and sum(int(b["skipped"]) for b in val) == 1
    assert len({tuple(image.flatten()[:16].tolist()) for b in val for image in b["image"]}) == 12
    first = dm.val_dataset[0]["image"]
    assert torch.equal(first, dm.val_dataset[0]["image"])  # validation view is deterministic


def test_class_folders_read_every_format_pillow_opens(tmp_path):
    root = make_class_folder(tmp_path / "images", per_class=1, corrupt=False)
    pixels = np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    for suffix in (".gif", ".tiff", ".tif", ".webp", ".bmp", ".JPG"):
        Image.fromarray(pixels).save(
            root / "cat" / f"extra{suffix}", format=Image.registered_extensions()[suffix.lower()]
        )
    (root / "cat" / "notes.txt").write_text("not an image")
    _, files = scan_class_folder(root)
    names = {Path(path).name for path, _ in files}
    assert {f"extra{s}" for s in (".gif", ".tiff", ".tif", ".webp", ".bmp", ".JPG")} <= names
    assert "notes.txt" not in names
    dataset = ImageFiles(files, resolution=16, train=False)
    assert all(dataset[i]["image"].shape == (3, 16, 16) for i in range(len(dataset)))
    assert not dataset.skipped


def test_class_folder_holdout_and_errors(tmp_path):
    root = make_class_folder(tmp_path / "images", per_class=10, corrupt=False)
    dm = ClassFolderDataModule(root=str(root), resolution=16, batch_size=2, val_fraction=0.3)
    train = {path for path, _ in dm.train_dataset.files}
    val = {path for path, _ in dm.val_dataset.files}
    assert not train & val and len(train | val) == 30 and 3 <= len(val) <= 18
    again = ClassFolderDataModule(root=str(root), resolution=16, batch_size=2, val_fraction=0.3, seed=5)
    assert {path for path, _ in again.val_dataset.files} == val  # stable, independent of the seed
    with pytest.raises(ValueError, match="missing"):
        ClassFolderDataModule(root=str(tmp_path / "missing"), resolution=16, batch_size=2)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        ClassFolderDataModule(root=str(tmp_path / "empty"), resolution=16, batch_size=2)


# ----------------------------------------------------------------------------- shards
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    src = make_class_folder(tmp / "src", per_class=8)
    pattern, written, skipped = make_shards.write_shards(str(src), str(tmp / "out" / "train"), 5)
    return pattern, written, skipped, tmp


def test_write_shards(shards):
    pattern, written, skipped, tmp = shards
    assert (written, skipped) == (24, 1)
    assert pattern == str(tmp / "out" / "train") + "-{000000..000004}.tar"
    urls = list(wds.shardlists.expand_urls(pattern))
    assert all(Path(url).is_file() for url in urls) and len(urls) == 5
    assert json.loads((tmp / "out" / "classes.json").read_text()) == {"0": "cat", "1": "dog", "2": "fox"}
    samples = list(wds.WebDataset(pattern, shardshuffle=False))
    assert len(samples) == 24 and {int(s["cls"]) for s in samples} == {0, 1, 2}
    assert len({s["__key__"] for s in samples}) == 24 and all("png" in s for s in samples)
    resized, n, _ = make_shards.write_shards(str(tmp / "src"), str(tmp / "small" / "s"), 100, resize=10)
    sample = next(iter(wds.WebDataset(resized, shardshuffle=False)))
    assert n == 24 and min(Image.open(io.BytesIO(sample["jpg"])).size) == 10


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_label_outside_num_classes_names_the_shard_and_key(shards, num_workers, tmp_path):
    for url in wds.shardlists.expand_urls(shards[0]):  # labels 0..2; without classes.json, whose class
        shutil.copy(url, tmp_path)  # count the module checks at once
    pattern = str(tmp_path / Path(shards[0]).name)
    loader = shard_module(pattern, num_classes=2, num_workers=num_workers).train_dataloader()
    with pytest.raises(DataError) as error:
        list(loader)
    message = DataError.one_line(error.value)
    assert "cls=2" in message and "data.num_classes=2" in message and ".tar" in message
    assert "\n" not in message


def test_printed_shard_override_works_pasted_into_a_shell(shards):
    pattern, _, _, tmp = shards
    line = make_shards.shard_override(pattern, make_shards.num_classes(str(tmp / "src")))
    # the shell splits and unquotes the line as a user's paste would; Hydra must get the pattern intact
    argv = subprocess.run(
        ["bash", "-c", f"printf '%s\\n' {line}"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    cfg = compose_config(["+experiment=titok_quickstart", *argv])
    assert cfg.data.train_shards == pattern and cfg.data.num_classes == 3
    assert len(list(wds.shardlists.expand_urls(cfg.data.train_shards))) == 5


def shard_module(pattern, **kw):
    args = dict(train_shards=pattern, val_shards=pattern, batches_per_epoch=3, num_classes=3)
    return ShardsDataModule(**(args | dict(resolution=16, batch_size=4) | kw))


def test_shards_train_ranks_get_equal_batches_from_different_shards(shards):
    pattern = shards[0]
    modules = [shard_module(pattern, rank=r, world_size=2, shuffle_buffer=6) for r in (0, 1)]
    assert modules[0].class_names == ["cat", "dog", "fox"]
    for dm in modules:
        batches = list(dm.train_dataloader())
        assert len(batches) == 3 == len(dm.train_dataloader())
        assert all(b["image"].shape == (4, 3, 16, 16) and b["image"].abs().max() <= 1 for b in batches)
        assert all(b["label"].dtype == torch.long and b["label"].max() < 3 for b in batches)
    urls = [{next(dm.train_stream.shards())["url"] for _ in range(50)} for dm in modules]
    assert urls[0] and urls[1] and not urls[0] & urls[1]


def test_shards_train_deterministic_and_epochs_differ(shards):
    def run(seed, epoch=0, num_workers=0):
        dm = shard_module(shards[0], seed=seed, rank=0, world_size=1, num_workers=num_workers)
        loader = dm.train_dataloader()
        _set_sampler_epoch(loader, epoch)  # what Lightning calls at the start of every epoch
        return torch.cat([b["image"] for b in loader])

    reference = run(0)
    assert torch.equal(reference, run(0))
    assert not torch.equal(reference, run(1))
    assert not torch.equal(reference, run(0, epoch=1))
    assert len(run(0, num_workers=2)) == 3 * 4  # the epoch length is per rank, not per worker


def test_missing_shards_stop_before_training_naming_the_setting(shards, tmp_path):
    pattern = shards[0]
    nowhere = str(tmp_path / "none-{000000..000003}.tar")
    with pytest.raises(ValueError, match=r"data.train_shards=.* matches no file"):
        shard_module(pattern, train_shards=nowhere)
    with pytest.raises(ValueError, match=r"data.val_shards=.* matches no file"):
        shard_module(pattern, val_shards=nowhere)
    partly = pattern.replace("}", "").rsplit("..", 1)[0] + "..000099}.tar"  # the same shards and more
    with pytest.raises(ValueError, match=r"data.train_shards=.* shards do not exist"):
        shard_module(pattern, train_shards=partly)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shards_resume_mid_epoch_where_the_run_stopped(shards, num_workers):
    def batches(resume=None):
        dm = shard_module(shards[0], rank=0, world_size=1, num_workers=num_workers, batches_per_epoch=5)
        if resume is not None:
            dm.load_state_dict({"epoch": 1, "batches": resume})
        loader = dm.train_dataloader()
        _set_sampler_epoch(loader, 1)
        return [b["image"] for b in loader]

    full = batches()
    for trained in (1, 3):
        resumed = batches(trained)
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[trained:], strict=False))
        assert len(resumed) >= len(full) - trained


def test_shards_val_split_across_ranks_is_disjoint_and_complete(shards):
    pattern = shards[0]
    everything = image_hashes(shard_module(pattern, rank=0, world_size=1).val_dataloader())
    parts = [image_hashes(shard_module(pattern, rank=r, world_size=2).val_dataloader()) for r in (0, 1)]
    assert len(everything) == len(set(everything)) == 24
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(everything)
    again = image_hashes(shard_module(pattern, rank=0, world_size=1).val_dataloader())
    assert again == everything  # no shuffle in validation


def test_shards_skip_corrupt_sample(tmp_path):
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(tmp_path / "bad-000000.tar")) as sink:
        for i in range(4):
            image = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = rng.bytes(200) if i == 2 else buffer.getvalue()
            sink.write({"__key__": f"{i:04d}", "jpg" if i == 2 else "png": data, "cls": i % 3})
    pattern = str(tmp_path / "bad-{000000..000000}.tar")
    dm = shard_module(pattern, rank=0, world_size=1)
    assert dm.class_names == ["0", "1", "2"]  # no classes.json here
    with pytest.warns(UserWarning, match="0002.*1 skipped"):
        batches = list(dm.val_dataloader())
    assert sum(len(b["label"]) for b in batches) == 3 and dm.val_stream.num_skipped == 1
    assert sum(int(b["skipped"].sum()) for b in batches) == 1
    with pytest.warns(UserWarning, match="skipped"):
        assert len(list(dm.train_dataloader())) == 3  # training streams past it as well


def test_flips_are_a_data_setting_and_leave_the_crops_alone():
    flipping = PhotosDataModule(resolution=16, batch_size=4, samples_per_epoch=64)
    fixed = PhotosDataModule(resolution=16, batch_size=4, samples_per_epoch=64, flip=False)
    boxes = [flipping.train_dataset.crop_box(key) for key in range(64)]
    assert any(box[-1] for box in boxes)  # half the crops are mirrored by default
    assert not any(fixed.train_dataset.crop_box(key)[-1] for key in range(64))
    for key, box in enumerate(boxes):  # the same crop either way, only never mirrored
        assert fixed.train_dataset.crop_box(key)[:-1] == box[:-1]
        image, plain = flipping.train_dataset[key]["image"], fixed.train_dataset[key]["image"]
        assert torch.equal(image.flip(-1) if box[-1] else image, plain)


def test_class_folder_flip_off_never_mirrors(tmp_path):
    root = make_class_folder(tmp_path / "images", per_class=2, corrupt=False)
    on = ClassFolderDataModule(root=str(root), resolution=16, batch_size=2, val_root=str(root))
    off = ClassFolderDataModule(root=str(root), resolution=16, batch_size=2, val_root=str(root), flip=False)
    pairs = [(on.train_dataset[k]["image"], off.train_dataset[k]["image"]) for k in range(12)]
    assert all(torch.equal(a, b) or torch.equal(a.flip(-1), b) for a, b in pairs)
    assert any(not torch.equal(a, b) for a, b in pairs)  # some were mirrored with flips on
