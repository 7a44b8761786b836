"""Malformed inputs to train.py, extract_codes.py, sample.py and evaluate.py: each is refused before any
compute, in one line that names the key (training/validation.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.config import ConfigError, compose_config
from training.validation import check_evaluate, check_extract, check_sample, check_train

REPO = Path(__file__).resolve().parent.parent
TITOK = ["+experiment=titok_quickstart"]
GPT = ["+experiment=gpt_quickstart"]
SPEC = {"kind": "categorical", "vocab_size": 1024, "num_tokens": 32}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Stand-ins for what the scripts read: exports (only their config.json is read before compute),
    extracted codes, and sample files good and bad."""
    root = tmp_path_factory.mktemp("inputs")

    def export(name, cls, token_spec=None):
        folder = root / name
        folder.mkdir()
        meta = {"class": cls, "config": {}, **({"token_spec": token_spec} if token_spec else {})}
        (folder / "config.json").write_text(json.dumps(meta))
        (folder / "model.safetensors").write_bytes(b"")
        return folder

    export("tokenizer", "titok", SPEC)
    export("other_tokenizer", "titok", {**SPEC, "vocab_size": 4096})
    export("generator", "gpt")
    (root / "generator" / "config.json").write_text(
        json.dumps(
            {"class": "gpt", "config": {"vocab_size": 1024, "num_tokens": 32, "token_kind": "categorical"}}
        )
    )
    (root / "codes").mkdir()
    (root / "codes" / "meta.json").write_text(json.dumps({"token_spec": SPEC, "num_classes": 17}))
    np.savez(root / "no_images.npz", labels=np.zeros(4))
    np.savez(root / "float_images.npz", images=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(root / "bad_labels.npz", images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.zeros(3))
    (root / "text.npz").write_text("not an archive")
    np.savez(root / "few.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    np.savez(root / "tiny.npz", images=np.zeros((64, 8, 8, 3), np.uint8))
    return root


def paths(folders, text: str) -> str:
    return text.replace("<root>", str(folders))


TRAIN_CASES = [
    (TITOK, "data.batch_size=0", "data.batch_size"),
    (TITOK, "data.batch_size=-3", "data.batch_size"),
    (TITOK, "data.batch_size=2.5", "data.batch_size"),
    (TITOK, "data.batch_size=many", "data.batch_size"),
    (TITOK, "data.num_workers=-1", "data.num_workers"),
    (TITOK, "data.resolution=4", "data.resolution"),
    (TITOK, "data.samples_per_epoch=0", "data.samples_per_epoch"),
    (TITOK, "data.val_per_class=0", "data.val_per_class"),
    (TITOK, "module.grad_clip=-1", "module.grad_clip"),
    (TITOK, "trainer.max_steps=0", "trainer.max_steps"),
    (TITOK, "trainer.max_steps=-5", "trainer.max_steps"),
    (TITOK, "trainer.val_check_interval=0", "trainer.val_check_interval"),
    (TITOK, "trainer.val_check_interval=1.5", "trainer.val_check_interval"),
    (TITOK, "trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    (TITOK, "trainer.precision=fp8", "trainer.precision"),
    (TITOK, "trainer.devices=0", "trainer.devices"),
    (TITOK, "callbacks.checkpoint.every_n_train_steps=0", "callbacks.checkpoint.every_n_train_steps"),
    (TITOK, "module.lr=0", "module.lr"),
    (TITOK, "module.lr=-1e-3", "module.lr"),
    (TITOK, "module.lr=nan", "module.lr"),
    (TITOK, "module.warmup_steps=-1", "module.warmup_steps"),
    (TITOK, "module.weight_decay=-0.1", "module.weight_decay"),
    (TITOK, "module.ema_decay=1.0", "module.ema_decay"),
    (TITOK, "module.min_lr_ratio=2", "module.min_lr_ratio"),
    (TITOK, "module.loss.gan_weight=-1", "module.loss.gan_weight"),
    (TITOK, "module.loss.gan_start_step=-1", "module.loss.gan_start_step"),
    (TITOK, "module.loss.disc_layers=0", "module.loss.disc_layers"),
    (TITOK, "seed=-1", "seed"),
    (TITOK, "seed=true", "seed"),
    (TITOK, "tokenizer.patch_size=5", "tokenizer.patch_size"),
    (TITOK, "tokenizer.heads=3", "tokenizer.heads"),
    (TITOK, "tokenizer.codebook_size=1", "tokenizer.codebook_size"),
    (TITOK, "tokenizer.num_tokens=0", "tokenizer.num_tokens"),
    (GPT, "generator.vocab_size=1", "generator.vocab_size"),
    (GPT, "generator.label_dropout=1.5", "generator.label_dropout"),
    (GPT, "generator.shuffle=0", "generator.shuffle"),
    (GPT, "generator.shuffle=2", "generator.shuffle"),  # no grid
    (GPT, "generator.shuffle=3 generator.grid=[4,8] generator.num_tokens=32", "generator.shuffle"),
    (GPT, "generator.shuffle=2 generator.grid=[4,8] module.truncate=uniform", "module.truncate"),
    (GPT, "data.codes_dir=<root>/nowhere", "data.codes_dir"),
    (GPT, "data.codes_dir=<root>/codes module.tokenizer_path=<root>/nowhere", "module.tokenizer_path"),
    (GPT, "data.codes_dir=<root>/codes module.tokenizer_path=<root>/generator", "module.tokenizer_path"),
    (
        GPT,
        "data.codes_dir=<root>/codes module.tokenizer_path=<root>/other_tokenizer",
        "module.tokenizer_path",
    ),
]
PAIR = "generator_path=<root>/generator tokenizer_path=<root>/tokenizer out=<root>/samples"
SAMPLE_CASES = [
    (f"{PAIR} num_samples=0", "num_samples"),
    (f"{PAIR} batch_size=0", "batch_size"),
    (f"{PAIR} seed=-1", "seed"),
    (f"{PAIR} num_tokens=0", "num_tokens"),
    (f"{PAIR} sampler.temperature=0", "sampler.temperature"),
    (f"{PAIR} sampler.top_p=0", "sampler.top_p"),
    (f"{PAIR} sampler.top_p=1.5", "sampler.top_p"),
    (f"{PAIR} sampler.top_k=-1", "sampler.top_k"),
    (f"{PAIR} sampler.cfg_scale=-2", "sampler.cfg_scale"),
    (f"{PAIR} sampler.cfg_schedule=cosine", "sampler.cfg_schedule"),
    (f"{PAIR} sampler.cfg_ramp=0", "sampler.cfg_ramp"),
    (f"{PAIR} sampler=speculative sampler.gamma=0", "sampler.gamma"),
    (f"{PAIR} sampler=speculative sampler.drafter=medusa", "sampler.drafter"),
    (f"{PAIR} sampler=sjd sampler.window=0", "sampler.window"),
    (f"{PAIR} sampler=sjd sampler.init=random", "sampler.init"),
    (f"{PAIR} sampler=lantern sampler.lantern_delta=-0.1", "sampler.lantern_delta"),
    (f"{PAIR} sampler=gsd sampler.group_size=0", "sampler.group_size"),
    ("generator_path=<root>/tokenizer tokenizer_path=<root>/generator out=<root>/s", "generator_path"),
    ("generator_path=<root>/nowhere tokenizer_path=<root>/tokenizer out=<root>/s", "generator_path"),
    ("generator_path=<root>/generator tokenizer_path=<root>/generator out=<root>/s", "tokenizer_path"),
    ("generator_path=<root>/generator tokenizer_path=<root>/other_tokenizer out=<root>/s", "generator_path"),
]
EXTRACT = "tokenizer_path=<root>/tokenizer out=<root>/codes_out"
EXTRACT_CASES = [
    ("tokenizer_path=<root>/nowhere out=<root>/c", "tokenizer_path"),
    ("tokenizer_path=<root>/generator out=<root>/c", "tokenizer_path"),
    (f"{EXTRACT} batch_size=0", "batch_size"),
    (f"{EXTRACT} shard_size=0", "shard_size"),
    (f"{EXTRACT} num_samples=0", "num_samples"),
    (f"{EXTRACT} data.resolution=2", "data.resolution"),
]
EVALUATE_CASES = [
    ("mode=gfid samples=<root>/absent.npz", "samples"),
    ("mode=gfid samples=<root>/no_images.npz", "samples"),
    ("mode=gfid samples=<root>/float_images.npz", "samples"),
    ("mode=gfid samples=<root>/bad_labels.npz", "samples"),
    ("mode=gfid samples=<root>/text.npz", "samples"),
    ("mode=gfid samples=<root>/float_images.npz extractor=resnet", "extractor"),
    ("mode=rfid tokenizer_path=<root>/tokenizer batch_size=0", "batch_size"),
    ("mode=rfid tokenizer_path=<root>/tokenizer device=tpu", "device"),
    ("mode=rfid tokenizer_path=<root>/nowhere", "tokenizer_path"),
    ("mode=gfid samples=<root>/float_images.npz reference_samples=1", "reference_samples"),
    ("mode=gfid samples=<root>/few.npz", "samples"),  # 4 images: below min_samples
    ("mode=gfid samples=<root>/tiny.npz", "samples"),  # 8 px: below min_resolution
    ("mode=gfid samples=<root>/float_images.npz reference_data=somewhere", "reference_data"),
    ("mode=pfid tokenizer_path=<root>/tokenizer pfid_alpha=1.5", "pfid_alpha"),
    ("mode=folders input1=<root>/nowhere input2=<root>/codes", "input1"),
]
CASES = (
    [("train", " ".join(base), change, key) for base, change, key in TRAIN_CASES]
    + [("sample", "", change, key) for change, key in SAMPLE_CASES]
    + [("extract_codes", "", change, key) for change, key in EXTRACT_CASES]
    + [("evaluate", "", change, key) for change, key in EVALUATE_CASES]
)
CHECKS = {
    "train": check_train,
    "sample": check_sample,
    "extract_codes": check_extract,
    "evaluate": check_evaluate,
}


def test_the_table_covers_every_script_with_at_least_40_inputs():
    assert len(CASES) >= 40 and {script for script, *_ in CASES} == set(CHECKS)


@pytest.mark.parametrize("script, base, change, key", CASES, ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_a_malformed_input_is_one_line_naming_the_key(folders, script, base, change, key):
    overrides = (base.split() if base else []) + paths(folders, change).split()
    cfg = compose_config(overrides, "train" if script == "train" else script)
    with pytest.raises(ConfigError) as error:
        CHECKS[script](cfg)
    message = str(error.value)
    assert message.startswith(key) or f" {key}=" in message or f"{key}=" in message.split(":")[0]
    assert "\n" not in message


def test_the_shipped_configs_pass_the_checks(folders):
    check_train(compose_config(TITOK))
    check_sample(compose_config(paths(folders, PAIR).split(), "sample"))
    check_extract(compose_config(paths(folders, EXTRACT).split(), "extract_codes"))
    good = paths(folders, "generator_path=<root>/generator tokenizer_path=<root>/tokenizer out=<root>/ok")
    check_sample(compose_config([*good.split(), "sampler=speculative", "sampler.drafter_path=x"], "sample"))


@pytest.mark.parametrize(
    "script, arguments, key",
    [
        ("train.py", ["+experiment=titok_quickstart", "data.batch_size=0"], "data.batch_size"),
        (
            "scripts/sample.py",
            ["generator_path=<root>/tokenizer", "tokenizer_path=<root>/generator"],
            "generator_path",
        ),
        ("scripts/extract_codes.py", ["tokenizer_path=<root>/nowhere"], "tokenizer_path"),
        ("scripts/evaluate.py", ["mode=gfid", "samples=<root>/float_images.npz"], "samples"),
    ],
)
def test_each_script_exits_with_one_line_and_writes_nothing(folders, tmp_path, script, arguments, key):
    arguments = [paths(folders, a) for a in arguments] + [f"out={tmp_path / 'out'}"]
    if script == "train.py":
        arguments[-1] = f"paths.run_dir={tmp_path / 'out'}"
    result = subprocess.run(
        [sys.executable, str(REPO / script), *arguments],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}="), result.stderr[-2000:]
    # nothing that blocks the corrected rerun: at most Hydra's (empty) job log
    written = [p.name for p in (tmp_path / "out").rglob("*")] if (tmp_path / "out").exists() else []
    assert all(name.endswith(".log") for name in written), written
