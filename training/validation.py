"""Settings checked before anything is built or computed: one ConfigError naming the key, its value and what
is valid, instead of a traceback minutes (or a whole training run) later.

Each script has a table of rules, `key -> what is valid`; a key the composed config does not have is not
checked (an experiment without a GAN has no module.loss.gan_weight). Cross-checks between keys (a patch size
that divides the resolution, heads that divide the width) and checks of the model folders a run reads
(an exported tokenizer whose tokens match the codes) follow the tables.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from core import read_export
from training.config import ConfigError


@dataclass(frozen=True)
class Rule:
    expected: str  # what is valid, in words
    ok: Callable[[object], bool]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def integer(minimum: int = 0, optional: bool = False) -> Rule:
    expected = f"an integer >= {minimum}" + (" or null" if optional else "")
    return Rule(expected, lambda v: (optional and v is None) or (_is_int(v) and v >= minimum))


def number(low: float, high: float | None = None, low_open=False, high_open=False, optional=False) -> Rule:
    left, right = ("(" if low_open else "["), (")" if high_open or high is None else "]")
    expected = f"a number in {left}{low:g}, {'inf' if high is None else f'{high:g}'}{right}"

    def ok(v):
        if optional and v is None:
            return True
        if not _is_number(v):
            return False
        above = v > low if low_open else v >= low
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    return Rule(expected + (" or null" if optional else ""), ok)


def choice(*options) -> Rule:
    return Rule(f"one of {list(options)}", lambda v: v in options)


def either(first: Rule, second: Rule) -> Rule:
    return Rule(f"{first.expected}, or {second.expected}", lambda v: first.ok(v) or second.ok(v))


POSITIVE, COUNT = integer(1), integer(0)
SEED = integer(0)
PROBABILITY = number(0, 1)
LEARNING_RATE = number(0, low_open=True)
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")

TRAIN_RULES: dict[str, Rule] = {
    "seed": SEED,
    "data.batch_size": POSITIVE,
    "data.num_workers": COUNT,
    "data.resolution": integer(8),
    "data.samples_per_epoch": POSITIVE,
    "data.val_per_class": POSITIVE,
    "data.val_fraction": number(0, 1, low_open=True, high_open=True),
    "data.min_scale": number(0, 1, low_open=True),
    "data.batches_per_epoch": POSITIVE,
    "data.shuffle_buffer": POSITIVE,
    "data.num_classes": POSITIVE,
    "data.flip": choice(True, False),
    "trainer.max_steps": POSITIVE,
    "trainer.val_check_interval": either(POSITIVE, number(0, 1, low_open=True)),
    "trainer.log_every_n_steps": POSITIVE,
    "trainer.devices": either(POSITIVE, choice("auto")),
    "trainer.num_nodes": POSITIVE,
    "trainer.precision": choice(*PRECISIONS),
    "trainer.gradient_clip_val": number(0, low_open=True, optional=True),
    "callbacks.checkpoint.every_n_train_steps": POSITIVE,
    "module.lr": LEARNING_RATE,
    "module.disc_lr": number(0, low_open=True, optional=True),
    "module.warmup_steps": COUNT,
    "module.weight_decay": number(0),
    "module.min_lr_ratio": PROBABILITY,
    "module.ema_decay": number(0, 1, high_open=True),
    "module.grad_clip": number(0, low_open=True, optional=True),
    "module.grid_images": POSITIVE,
    "module.grid_classes": POSITIVE,
    "module.grid_samples_per_class": POSITIVE,
    "module.grid_cfg_scale": number(0),
    "module.guidance_scale": number(0),
    "module.truncate": choice("none", "uniform", "pow2"),
    "module.loss.pixel_weight": number(0),
    "module.loss.perceptual_weight": number(0),
    "module.loss.gan_weight": number(0),
    "module.loss.gan_start_step": COUNT,
    "module.loss.lecam_weight": number(0),
    "module.loss.disc_channels": POSITIVE,
    "module.loss.disc_layers": POSITIVE,
    "tokenizer.patch_size": POSITIVE,
    "tokenizer.width": integer(1, optional=True),
    "tokenizer.depth": integer(1, optional=True),
    "tokenizer.heads": integer(1, optional=True),
    "tokenizer.num_tokens": POSITIVE,
    "tokenizer.codebook_size": integer(2),
    "tokenizer.code_dim": POSITIVE,
    "tokenizer.commitment_weight": number(0),
    "generator.vocab_size": integer(2),
    "generator.num_tokens": POSITIVE,
    "generator.num_classes": POSITIVE,
    "generator.width": integer(1, optional=True),
    "generator.depth": integer(1, optional=True),
    "generator.heads": integer(1, optional=True),
    "generator.label_dropout": number(0, 1, high_open=True),
    "generator.shuffle": integer(1, optional=True),
}

SAMPLER_RULES: dict[str, Rule] = {
    "sampler.cfg_scale": number(0),
    "sampler.cfg_schedule": choice("constant", "linear"),
    "sampler.cfg_ramp": number(0, 1, low_open=True),
    "sampler.temperature": number(0, low_open=True),
    "sampler.top_k": COUNT,
    "sampler.top_p": number(0, 1, low_open=True),
    "sampler.gamma": POSITIVE,
    "sampler.window": POSITIVE,
    "sampler.group_size": POSITIVE,
    "sampler.lantern_delta": number(0),
    "sampler.lantern_lambda": number(1, optional=True),
    "sampler.lantern_k": POSITIVE,
    "sampler.drafter": choice("gpt", "eagle"),
    "sampler.acceptance": choice("exact", "lantern"),
    "sampler.init": choice("uniform", "copy_left"),
    "sampler.compile": choice(True, False),
    "sampler.reuse_drafts": choice(True, False),
}

SAMPLE_RULES: dict[str, Rule] = {
    "num_samples": POSITIVE,
    "num_classes": integer(1, optional=True),
    "num_tokens": integer(1, optional=True),
    "batch_size": POSITIVE,
    "seed": SEED,
    "grid_per_class": POSITIVE,
    **SAMPLER_RULES,
}

EXTRACT_RULES: dict[str, Rule] = {
    "num_samples": integer(1, optional=True),
    "shard_size": POSITIVE,
    "batch_size": POSITIVE,
    "seed": SEED,
    "flips": choice(True, False),
    **{key: rule for key, rule in TRAIN_RULES.items() if key.startswith("data.")},
}

EVALUATE_RULES: dict[str, Rule] = {
    "mode": choice("rfid", "pfid", "gfid", "floor", "folders"),
    "extractor": choice("auto", "inception", "photos-net"),
    "reference_data": choice("recorded", "config"),
    "target_psnr": number(0, optional=True),
    "pfid_alpha": PROBABILITY,
    "pfid_delta": POSITIVE,
    "reference_samples": integer(2),
    "floor_samples": integer(2),
    "batch_size": POSITIVE,
    "device": Rule(
        "auto, cpu, cuda or cuda:<index>",
        lambda v: isinstance(v, str) and v.split(":")[0] in ("auto", "cpu", "cuda"),
    ),
    "seed": SEED,
    "feature_net.resolution": integer(8),
    "min_samples": integer(2),
    "min_resolution": integer(1),
    "force": choice(True, False),
    **{key: rule for key, rule in TRAIN_RULES.items() if key.startswith("data.")},
}


def _lookup(cfg: DictConfig, key: str):
    """(present, value) of a dotted key; interpolations resolved."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    return True, OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def check_rules(cfg: DictConfig, rules: dict[str, Rule]) -> None:
    for key, rule in rules.items():
        present, value = _lookup(cfg, key)
        if present and value != "???" and not rule.ok(value):
            raise ConfigError(f"{key}={value!r}: expected {rule.expected}")


def _divides(cfg, small: str, large: str) -> None:
    (has_small, a), (has_large, b) = _lookup(cfg, small), _lookup(cfg, large)
    if has_small and has_large and _is_int(a) and _is_int(b) and b % a:
        raise ConfigError(f"{small}={a} must divide {large}={b}")


def export_config(key: str, folder) -> dict:
    """config.json of an exported model folder, or a ConfigError naming the setting."""
    file = Path(str(folder)) / "config.json"
    if not file.is_file() or not (file.parent / "model.safetensors").is_file():
        raise ConfigError(
            f"{key}={folder} is not an exported model folder (needs config.json and model.safetensors; "
            "train.py writes them to runs/<experiment>/export)"
        )
    try:
        meta = read_export(file.parent)  # either config.json layout (core/hub.py)
        return {"token_spec": {}, **meta, "class": meta["model_type"]}
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{key}={folder}: {file} is not an export config ({error})") from None


GENERATOR_CLASSES = ("gpt",)


def tokenizer_export(key: str, folder) -> dict:
    """export_config of a folder that must hold a tokenizer."""
    tokenizer = export_config(key, folder)
    if tokenizer["class"] in GENERATOR_CLASSES:
        raise ConfigError(f"{key}={folder} holds a generator ({tokenizer['class']}), not a tokenizer")
    return tokenizer


VQGAN_TARGET = "tokenizers_vis.vqgan.VQGAN"


def _check_downsampling(cfg) -> None:
    """A VQGAN downsamples by 2^(len(ch_mult) - 1) (ch_mult null: its size preset's)."""
    if _lookup(cfg, "tokenizer._target_")[1] != VQGAN_TARGET:
        return
    from tokenizers_vis.vqgan import VQGAN_SIZES

    size, ch_mult = _lookup(cfg, "tokenizer.size")[1], _lookup(cfg, "tokenizer.ch_mult")[1]
    if size not in VQGAN_SIZES:
        raise ConfigError(f"tokenizer.size={size!r}: expected one of {sorted(VQGAN_SIZES)}")
    ch_mult = ch_mult or VQGAN_SIZES[size]["ch_mult"]
    factor, (present, resolution) = 2 ** (len(ch_mult) - 1), _lookup(cfg, "data.resolution")
    if present and _is_int(resolution) and resolution % factor:
        raise ConfigError(
            f"data.resolution={resolution} must be a multiple of the VQGAN's downsampling factor {factor} "
            f"(2^(len(tokenizer.ch_mult) - 1), ch_mult={ch_mult})"
        )


def _check_generator_grid(cfg) -> None:
    """Codes of a 2D grid tokenizer record their grid; the GPT must take the same one (2D RoPE)."""
    (has_grid, grid), (has_codes, codes) = _lookup(cfg, "generator.grid"), _lookup(cfg, "data.codes_dir")
    meta_file = Path(str(codes)) / "meta.json"
    if not (has_grid and has_codes and meta_file.is_file()):
        return
    codes_grid = (json.loads(meta_file.read_text()).get("token_spec") or {}).get("grid")
    if codes_grid is not None and (grid is None or list(grid) != list(codes_grid)):
        raise ConfigError(
            f"generator.grid={grid} but the codes in data.codes_dir={codes} are a {codes_grid[0]}x"
            f"{codes_grid[1]} grid: set generator.grid=[{codes_grid[0]}, {codes_grid[1]}] (2D RoPE)"
        )


def check_train(cfg: DictConfig) -> None:
    """Every setting of `python train.py`, before the data and the model are built."""
    check_rules(cfg, TRAIN_RULES)
    _divides(cfg, "tokenizer.patch_size", "data.resolution")
    _divides(cfg, "tokenizer.heads", "tokenizer.width")
    _divides(cfg, "generator.heads", "generator.width")
    _check_downsampling(cfg)
    _check_generator_grid(cfg)
    check_shuffle(cfg)
    present, codes = _lookup(cfg, "data.codes_dir")
    if present and not (Path(str(codes)) / "meta.json").is_file():
        raise ConfigError(
            f"data.codes_dir={codes} holds no extracted codes (meta.json missing): run "
            "scripts/extract_codes.py tokenizer_path=<tokenizer export> out=<folder> first"
        )
    present, path = _lookup(cfg, "module.tokenizer_path")
    if present and path is not None:
        exported = tokenizer_export("module.tokenizer_path", path)["token_spec"]
        present, codes = _lookup(cfg, "data.codes_dir")
        meta_file = Path(str(codes)) / "meta.json"
        if present and meta_file.is_file():
            codes_spec = json.loads(meta_file.read_text()).get("token_spec")
            if codes_spec is not None and exported != codes_spec:
                raise ConfigError(
                    f"module.tokenizer_path={path} makes tokens {exported}, but the codes in "
                    f"data.codes_dir={codes} are {codes_spec}: give the tokenizer that extracted them"
                )


def check_shuffle(cfg: DictConfig) -> None:
    """Token-Shuffle needs grid tokens that s divides, and whole grids (no truncated training sequences)."""
    present, shuffle = _lookup(cfg, "generator.shuffle")
    if not present or shuffle in (None, 1):
        return
    grid = cfg.generator.get("grid")
    if grid is None or grid[0] % shuffle or grid[1] % shuffle:
        raise ConfigError(
            f"generator.shuffle={shuffle} needs a token grid it divides; generator.grid={grid} "
            "(set generator.grid=[h, w] of a 2D tokenizer, or generator.shuffle=1)"
        )
    present, truncate = _lookup(cfg, "module.truncate")
    if present and truncate not in (None, "none"):
        raise ConfigError(
            f"module.truncate={truncate} with generator.shuffle={shuffle}: Token-Shuffle needs whole grids"
        )


def check_sample(cfg: DictConfig) -> None:
    check_rules(cfg, SAMPLE_RULES)
    generator = export_config("generator_path", cfg.generator_path)
    if generator["class"] not in GENERATOR_CLASSES:
        swapped = export_config("tokenizer_path", cfg.tokenizer_path)["class"] in GENERATOR_CLASSES
        raise ConfigError(
            f"generator_path={cfg.generator_path} holds a {generator['class']}, not a generator"
            + (" (generator_path and tokenizer_path swapped?)" if swapped else "")
        )
    spec = tokenizer_export("tokenizer_path", cfg.tokenizer_path)["token_spec"]
    # the generator must have been trained on this tokenizer's tokens: generator key -> token spec key
    for key, spec_key in (("vocab_size", "vocab_size"), ("num_tokens", "num_tokens"), ("token_kind", "kind")):
        made, decoded = generator.get(key), spec.get(spec_key)
        if key == "token_kind":
            made, decoded = made or "categorical", decoded or "categorical"
        if made is not None and decoded is not None and made != decoded:
            raise ConfigError(
                f"generator_path={cfg.generator_path} makes tokens with {key}={made}, but tokenizer_path="
                f"{cfg.tokenizer_path} decodes {spec_key}={decoded}: pass the tokenizer of its training codes"
            )


def check_extract(cfg: DictConfig) -> None:
    check_rules(cfg, EXTRACT_RULES)
    tokenizer_export("tokenizer_path", cfg.tokenizer_path)


def check_evaluate(cfg: DictConfig) -> None:
    check_rules(cfg, EVALUATE_RULES)
    mode = cfg.mode
    if mode in ("rfid", "pfid", "floor"):
        if cfg.tokenizer_path is None:
            raise ConfigError(f"mode={mode} needs tokenizer_path=<an exported tokenizer folder>")
        export_config("tokenizer_path", cfg.tokenizer_path)
    if mode == "gfid":
        if cfg.samples is None:
            raise ConfigError("mode=gfid needs samples=<a samples.npz or a folder of PNGs>")
        samples = Path(str(cfg.samples))
        if not samples.exists():
            raise ConfigError(f"samples={samples} does not exist")
        if samples.is_file():
            count, size = check_samples_npz(samples)
            check_enough(cfg, f"samples={samples}", count, size)
        if not cfg.reference_stats:  # else the reference is those statistics, not training crops
            check_enough(cfg, f"reference_samples={cfg.reference_samples}", cfg.reference_samples, None)
    if cfg.reference_stats:
        if mode != "gfid":
            raise ConfigError(f"reference_stats is the reference of mode=gfid; mode={mode} has its own")
        if not Path(str(cfg.reference_stats)).is_file():
            raise ConfigError(
                f"reference_stats={cfg.reference_stats} does not exist (an .npz with mu and sigma, such as "
                "ADM's reference batches; never downloaded)"
            )
        from training.metrics import reference_statistics  # torch-fidelity: imported only when needed

        try:
            reference_statistics(cfg.reference_stats)  # mu, sigma; their size is checked with the extractor
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if mode in ("rfid", "pfid"):  # the lpips column: local weights, or no column
        vgg, linear = cfg.paths.get("vgg_weights"), cfg.paths.get("lpips_weights")
        for key, path in (("vgg_weights", vgg), ("lpips_weights", linear)):
            if path is not None and not Path(str(path)).is_file():
                raise ConfigError(f"paths.{key}={path} does not exist (unset, there is no lpips column)")
        if linear is not None and vgg is None:
            raise ConfigError("paths.lpips_weights are LPIPS's layers on VGG16: set paths.vgg_weights too")
    if mode == "folders":
        for key in ("input1", "input2"):
            if cfg[key] is None or not Path(str(cfg[key])).is_dir():
                raise ConfigError(f"mode=folders needs {key}=<a folder of images>; got {cfg[key]}")


def check_enough(cfg: DictConfig, what: str, count: int, size: int | None) -> None:
    """FID from a handful of samples is mostly bias, and tiny images are upsampled by the feature network:
    both are refused unless force=true."""
    if cfg.get("force"):
        return
    if count < cfg.min_samples:
        raise ConfigError(
            f"{what} holds {count} images; FID needs at least min_samples={cfg.min_samples} to mean anything "
            "(force=true measures anyway)"
        )
    if size is not None and size < cfg.min_resolution:
        raise ConfigError(
            f"{what} holds {size}px images, below min_resolution={cfg.min_resolution} "
            "(force=true measures anyway)"
        )


SAMPLE_IMAGE_KEYS = ("arr_0", "images")  # ADM's sample batches and scripts/sample.py; `images`: older files
SAMPLE_LABEL_KEYS = ("labels", "arr_1")  # scripts/sample.py; ADM's image_sample.py writes labels as arr_1


def samples_npz_keys(names) -> tuple[str | None, str | None]:
    """(images key, labels key) among an npz's array names, each None when absent."""
    images = next((key for key in SAMPLE_IMAGE_KEYS if key in names), None)
    return images, next((key for key in SAMPLE_LABEL_KEYS if key in names), None)


def npz_headers(path: Path) -> dict[str, tuple[tuple, object]]:
    """name -> (shape, dtype) of every array of an npz, from the .npy headers alone: no array is read, so
    checking 50,000 samples costs nothing, and nothing is unpickled."""
    from numpy.lib import format as npy

    headers = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            with archive.open(member) as file:
                version = npy.read_magic(file)
                read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                shape, _, dtype = read(file)
            headers[member.removesuffix(".npy")] = (shape, dtype)
    return headers


def check_samples_npz(path: Path) -> tuple[int, int]:
    """uint8 images (N, H, W, 3) at `arr_0` (or `images`) and optional labels (N,) -> (N, min(H, W))."""
    try:
        headers = npz_headers(path)
    except Exception as error:  # not a zip, truncated, not .npy members
        raise ConfigError(f"samples={path} is not a readable .npz of arrays ({error})") from None
    image_key, label_key = samples_npz_keys(headers)
    if image_key is None:
        raise ConfigError(f"samples={path} has no `arr_0` or `images` array (keys: {sorted(headers)})")
    (shape, dtype), labels = headers[image_key], headers[label_key][0] if label_key else None
    if dtype != "uint8" or len(shape) != 4 or shape[-1] != 3:
        raise ConfigError(f"samples={path}: images are {dtype} {shape}; expected uint8 (N, H, W, 3)")
    if labels is not None and labels != (shape[0],):
        raise ConfigError(f"samples={path}: labels {labels} do not match {shape[0]} images")
    return shape[0], min(shape[1:3])
