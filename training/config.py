"""Hydra helpers: compose configs with one-line errors, and guard run folders against mixed-up resumes."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

import configs
from training.checkpoints import resume_checkpoint

CONFIG_DIR = Path(configs.__file__).resolve().parent  # the configs package: a clone's or an installed copy

# Settings that may change between a run and its resumption: a longer schedule, other hardware, workers.
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.devices", "trainer.num_nodes", "data.num_workers")


class ConfigError(ValueError):
    """A bad command line or config, explained in one line."""


def group_options(group: str) -> list[str]:
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def compose_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """Compose `configs/<config_name>.yaml` with overrides; any error becomes a one-line ConfigError."""
    primary = yaml.safe_load((CONFIG_DIR / f"{config_name}.yaml").read_text()) or {}
    groups = {next(iter(d)) for d in primary.get("defaults", []) if isinstance(d, dict)} | {"experiment"}
    for override in overrides:
        match = re.match(r"^\+?\+?([\w/]+)=(.*)$", override)
        if match and match.group(1) in groups:
            group, choice = match.groups()
            options = group_options(group)
            if choice not in options and choice != "null":
                raise ConfigError(f"unknown {group} '{choice}'; choose one of: {', '.join(options)}")
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name, overrides=overrides)
    except HydraException as error:
        raise ConfigError(explain(error, overrides)) from None


def explain(error: Exception, overrides: list[str]) -> str:
    text = " ".join(str(error).split())
    match = re.search(r"Could not override '([^']+)'", text) or re.search(
        r"Key '([^']+)' is not in struct", text
    )
    if match:
        key = match.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        return f"unknown config key '{key}'" + _valid_keys_hint(parent, overrides)
    return text


def _valid_keys_hint(parent: str, overrides: list[str]) -> str:
    """'; valid keys under trainer: a, b, c' from the config composed without the offending overrides."""
    group_choices = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0]]
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            node = compose("train", overrides=group_choices)
        node = OmegaConf.select(node, parent) if parent else node
        keys = ", ".join(str(k) for k in node.keys()) if isinstance(node, DictConfig) else ""
    except Exception:  # the hint is a courtesy; never hide the real error behind a second one
        return ""
    return f"; valid keys under {parent or 'the top level'}: {keys}" if keys else ""


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, path + ".")
        elif a != b:
            keys.append(path)
    return keys


def check_run_dir(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from in `run_dir`, or None for a new run.

    A run folder whose saved config differs (beyond RESUMABLE_CHANGES) is an error: resuming it would
    silently train another model. The newest readable of `checkpoints/last.ckpt`, the one it replaced and
    Lightning's SLURM checkpoints (`hpc_ckpt_N.ckpt`, written on SIGUSR1 before a requeue) wins
    (training/checkpoints.py).
    """
    saved_file = run_dir / "config.yaml"
    if saved_file.is_file():
        saved = yaml.safe_load(saved_file.read_text()) or {}
        resolved = OmegaConf.to_container(cfg, resolve=True)
        changed = [k for k in config_differences(saved, resolved) if not k.startswith(RESUMABLE_CHANGES)]
        if changed:
            shown = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
            raise ConfigError(
                f"{run_dir} holds a run with a different config ({shown} changed); to start fresh delete "
                f"{run_dir} or pass paths.run_dir=<new folder>, to resume drop those overrides"
            )
    return resume_checkpoint(run_dir)


def save_run_config(cfg: DictConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
