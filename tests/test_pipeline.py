"""The stage-1 -> codes -> stage-2 -> samples pipeline, end to end, with tiny models on the CPU."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY_RUN, TINY_TRAINER
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file

import train
from scripts.extract_codes import extract
from tokenizers_vis import from_pretrained
from training.config import ConfigError, compose_config
from training.evaluation import run as evaluate_run
from training.sample_folder import index_range
from training.sample_folder import run as sample_run

TINY_GPT = [
    "+experiment=gpt_quickstart",
    "data.batch_size=8",
    "generator.size=tiny",
    "generator.width=32",
    "generator.depth=1",
    "generator.heads=2",
    "generator.vocab_size=64",
    "generator.num_tokens=8",
    "module.warmup_steps=2",
    "module.grid_classes=3",
    "module.grid_samples_per_class=2",
    *TINY_TRAINER,
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny trained tokenizer and 96 extracted samples, shared by the tests of this file."""
    root = tmp_path_factory.mktemp("pipeline")
    train.run(compose_config(TINY_RUN + [f"paths.run_dir={root / 'titok'}"]))
    codes_cfg = compose_config(
        [
            f"tokenizer_path={root / 'titok' / 'export'}",
            f"out={root / 'codes'}",
            "num_samples=96",
            "shard_size=40",
            "batch_size=32",
        ],
        config_name="extract_codes",
    )
    extract(codes_cfg)
    return root, codes_cfg


def test_extracted_codes_match_the_tokenizer(pipeline):
    root, codes_cfg = pipeline
    tokenizer = from_pretrained(root / "titok" / "export")
    meta = json.loads((root / "codes" / "meta.json").read_text())
    assert meta["num_samples"] == 96 and len(meta["shards"]) == 3 and meta["flips"]
    assert meta["token_spec"]["vocab_size"] == 64 and meta["num_classes"] == 17
    shard = load_file(str(root / "codes" / meta["shards"][1]))  # samples 40..79
    dataset = instantiate({**meta["data"]}).train_dataset
    images = torch.stack([dataset[i]["image"] for i in (40, 41, 79)])
    with torch.no_grad():
        assert torch.equal(shard["tokens"][[0, 1, 39]].long(), tokenizer.encode(images).data)
        assert torch.equal(shard["tokens_flip"][[0, 1, 39]].long(), tokenizer.encode(images.flip(-1)).data)
    assert shard["labels"][0] == dataset[40]["label"]


def test_extraction_resumes_and_skips_finished_shards(pipeline):
    root, codes_cfg = pipeline
    first, second = root / "codes" / "codes-00000.safetensors", root / "codes" / "codes-00001.safetensors"
    reference = load_file(str(second))
    os.utime(first, (1, 1))
    second.unlink()  # as if the run had died while writing shard 1
    extract(codes_cfg)
    assert first.stat().st_mtime == 1  # untouched
    assert all(torch.equal(reference[k], v) for k, v in load_file(str(second)).items())  # same samples


def test_generator_trains_exports_and_samples(pipeline):
    root, _ = pipeline
    gpt_cfg = compose_config(
        TINY_GPT
        + [
            f"data.codes_dir={root / 'codes'}",
            f"module.tokenizer_path={root / 'titok' / 'export'}",
            f"paths.run_dir={root / 'gpt'}",
        ]
    )
    metrics = train.run(gpt_cfg)
    assert metrics["steps"] == 4 and np.isfinite(metrics["loss"])
    assert (root / "gpt" / "grids" / "samples.png").is_file()
    state = torch.load(root / "gpt" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(k.startswith(("generator.", "ema.")) for k in state)  # the frozen tokenizer stays out
    assert train.run(gpt_cfg)["steps"] == 4  # rerunning a finished run resumes and changes nothing
    generator = from_pretrained(root / "gpt" / "export")
    assert generator.config["vocab_size"] == 64

    sample_overrides = [
        f"generator_path={root / 'gpt' / 'export'}",
        f"tokenizer_path={root / 'titok' / 'export'}",
        f"out={root / 'samples'}",
        "num_samples=20",
        "batch_size=8",
        "sampler.cfg_scale=2.0",
    ]
    sample_cfg = compose_config(sample_overrides, config_name="sample")
    summary = sample_run(sample_cfg)
    assert summary["forward_passes_per_image"] == 8  # one pass per token with the cache
    assert len(list((root / "samples" / "images").glob("*.png"))) == 20
    npz = np.load(root / "samples" / "samples.npz")
    assert npz.files == ["arr_0", "labels"], "the images once, at ADM's key: no second copy"
    assert npz["arr_0"].shape == (20, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["labels"].tolist() == [i % 17 for i in range(20)]  # class-balanced
    assert (root / "samples" / "grid.png").is_file()
    # Rerunning finds every PNG and samples nothing new: identical npz.
    sample_run(sample_cfg)
    assert np.array_equal(np.load(root / "samples" / "samples.npz")["arr_0"], npz["arr_0"])
    # The same folder with settings that change the images is refused before sampling, naming them;
    # more samples, or another grid, extend the run.
    changes = [
        ("sampler.cfg_scale=3.0", "sampler.cfg_scale"),
        ("seed=1", "seed"),
        ("batch_size=4", "batch_size"),
    ]
    for change, key in changes:
        changed = compose_config([*sample_overrides, change], config_name="sample")
        with pytest.raises(ConfigError, match=rf"other settings \({key} differ"):
            sample_run(changed)
    assert json.loads((root / "samples" / "stats.json").read_text())["cfg_scale"] == 2.0
    extended = sample_run(
        compose_config([*sample_overrides, "num_samples=24", "grid=false"], config_name="sample")
    )
    assert extended["num_samples"] == 24

    # A k-token prefix: k passes per image, decoded at the tokenizer's resolution; k > N is refused.
    prefix_cfg = compose_config(
        [*sample_cfg_overrides(root, "prefix"), "num_samples=4", "num_tokens=3"], config_name="sample"
    )
    summary = sample_run(prefix_cfg)
    assert summary["forward_passes_per_image"] == 3 and summary["num_tokens"] == 3
    assert np.load(root / "prefix" / "samples.npz")["arr_0"].shape == (4, 16, 16, 3)
    with pytest.raises(ValueError, match="num_tokens=9"):
        sample_run(compose_config([*sample_cfg_overrides(root, "bad"), "num_tokens=9"], config_name="sample"))


def test_eagle_drafter_trains_on_the_generator_and_drafts_for_it(pipeline):
    """eagle_quickstart on the codes, with the tiny GPT as target; then sample.py drafts with it (exact)."""
    root, _ = pipeline
    if not (root / "gpt" / "export").is_dir():
        pytest.skip("needs test_generator_trains_exports_and_samples's GPT")
    cfg = compose_config(
        [
            "+experiment=eagle_quickstart",
            f"data.codes_dir={root / 'codes'}",
            "data.batch_size=8",
            f"module.target_path={root / 'gpt' / 'export'}",
            "module.warmup_steps=2",
            f"paths.run_dir={root / 'eagle'}",
            *TINY_TRAINER,
        ]
    )
    metrics = train.run(cfg)
    assert metrics["steps"] == 4 and 0 < metrics["acceptance"] < 1
    state = torch.load(root / "eagle" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(k.startswith("drafter.") for k in state)  # the frozen target stays out
    drafter = from_pretrained(root / "eagle" / "export")
    assert drafter.registry_name == "eagle"
    overrides = [
        *sample_cfg_overrides(root, "eagle_samples"),
        "num_samples=6",
        "batch_size=3",
        "sampler=speculative",
        "sampler.drafter=eagle",
        f"sampler.drafter_path={root / 'eagle' / 'export'}",
        "sampler.cfg_scale=2.0",
    ]
    summary = sample_run(compose_config(overrides, config_name="sample"))
    assert summary["sampler_stats"]["draft_forward_passes"] > 0
    assert len(list((root / "eagle_samples" / "images").glob("*.png"))) == 6
    wrong = [o for o in overrides if not o.startswith("sampler.drafter=")] + ["sampler.drafter=gpt"]
    with pytest.raises(ValueError, match="sampler.drafter=eagle"):
        sample_run(compose_config(wrong, config_name="sample"))


def sample_cfg_overrides(root, out: str) -> list[str]:
    return [
        f"generator_path={root / 'gpt' / 'export'}",
        f"tokenizer_path={root / 'titok' / 'export'}",
        f"out={root / out}",
    ]


def test_generator_config_must_match_the_codes(pipeline):
    root, _ = pipeline
    cfg = compose_config(
        TINY_GPT
        + [f"data.codes_dir={root / 'codes'}", "generator.vocab_size=32", f"paths.run_dir={root / 'x'}"]
        + [f"module.tokenizer_path={root / 'titok' / 'export'}"]
    )
    with pytest.raises(ConfigError, match="generator.vocab_size=64"):
        train.run(cfg)


def test_missing_codes_is_a_one_line_error(tmp_path):
    cfg = compose_config(
        TINY_GPT + [f"data.codes_dir={tmp_path / 'none'}", f"paths.run_dir={tmp_path / 'r'}"]
    )
    with pytest.raises(ConfigError, match="extract_codes.py"):
        train.run(cfg)


def test_sample_ranks_split_the_indices_disjointly():
    ranges = [index_range(10, rank, 3) for rank in range(3)]
    assert [list(r) for r in ranges] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_extracting_a_class_folder_leaves_unreadable_images_out_and_counts_them(pipeline, tmp_path):
    root, _ = pipeline
    rng = np.random.default_rng(0)
    folder = tmp_path / "folder"
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                folder / name / f"{i}.png"
            )
    (folder / "dog" / "broken.jpg").write_bytes(rng.bytes(100))
    cfg = compose_config(
        [
            f"tokenizer_path={root / 'titok' / 'export'}",
            f"out={tmp_path / 'codes'}",
            "data=imagenet_folder",
            f"data.root={folder}",
            f"data.val_root={folder}",
            "data.num_workers=0",
            "batch_size=4",
            "data.flip=false",
        ],
        config_name="extract_codes",
    )
    with pytest.warns(UserWarning, match="broken.jpg"):
        extract(cfg)
    meta = json.loads((tmp_path / "codes" / "meta.json").read_text())
    assert meta["skipped_images"] == 1 and meta["flips"] is False
    shard = load_file(str(tmp_path / "codes" / meta["shards"][0]))
    assert len(shard["labels"]) == 10 and "tokens_flip" not in shard  # 11 files, the broken one left out


def test_your_own_dataset_from_a_class_folder_to_gfid(tmp_path):
    """README "Your own dataset": folder -> tokenizer -> codes -> GPT -> samples -> gFID, IS and conditional
    accuracy against that folder (not the embedded photos), with a classifier of its own classes."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "mine"
    for c, name in enumerate(("red", "green", "blue")):
        (folder / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 80, (24, 24, 3), dtype=np.uint8)
            pixels[..., c] += 150  # a colour per class: learnable in a few steps
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    data = ["data=imagenet_folder", f"data.root={folder}", "data.val_root=null", "data.num_workers=0"]
    data += ["data.resolution=16", "data.batch_size=8"]
    sizes = [o for o in TINY_RUN if not o.startswith(("data.", "+experiment"))]
    train.run(
        compose_config(["+experiment=titok_quickstart", *sizes, *data, f"paths.run_dir={tmp_path / 'tok'}"])
    )
    tokenizer = tmp_path / "tok" / "export"
    assert json.loads((tokenizer / "data.json").read_text())["root"] == str(folder)
    extract(
        compose_config(
            [f"tokenizer_path={tokenizer}", f"out={tmp_path / 'codes'}", *data[:4], "num_samples=96"],
            config_name="extract_codes",
        )
    )
    gpt = [o for o in TINY_GPT if not o.startswith("module.grid_classes")] + ["generator.num_classes=3"]
    gpt += [f"data.codes_dir={tmp_path / 'codes'}", f"module.tokenizer_path={tokenizer}"]
    train.run(compose_config([*gpt, "module.grid_classes=3", f"paths.run_dir={tmp_path / 'gpt'}"]))
    samples = tmp_path / "samples"
    sample_run(
        compose_config(
            [
                f"generator_path={tmp_path / 'gpt' / 'export'}",
                f"tokenizer_path={tokenizer}",
                f"out={samples}",
                "num_samples=12",
                "batch_size=6",
            ],
            config_name="sample",
        )
    )
    result = evaluate_run(
        compose_config(
            [
                "mode=gfid",
                f"samples={samples / 'samples.npz'}",
                "reference_samples=24",
                "force=true",  # 12 samples of 16 px: far below a meaningful FID, on purpose
                f"feature_net.root={tmp_path / 'nets'}",
                "feature_net.resolution=16",
                f"cache_root={tmp_path / 'cache'}",
            ],
            "evaluate",
        )
    )
    assert result["reference"].startswith("ClassFolderDataModule training crops")
    assert "classfolder" in result["feature_extractor_weights"] and "cond_accuracy" in result
    assert result["fid[photos-net]"] > 0 and 0 <= result["cond_accuracy"] <= 1
