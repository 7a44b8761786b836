"""A root config (configs/<name>.yaml) composed with OmegaConf alone, for callers that are not Hydra apps.

    load_config("evaluate", {"mode": "gfid", "samples": "runs/x/samples.npz", "data": {"val_per_class": 2}})

gives the config that `python scripts/evaluate.py mode=gfid samples=runs/x/samples.npz data.val_per_class=2`
composes, without Hydra's runtime (no @hydra.main, no global state, so it also works inside a running Hydra
app or a notebook). It reads what the project's root configs use of Hydra's defaults list: one `group:
option` entry per group (null: none unless chosen), `_self_`, and `# @package _global_` group files; the
`hydra/...` entries only configure Hydra's runtime and are skipped.

`settings` maps top-level keys to values. A config group's key (`data`, `paths`, `sampler`, `protocol`...)
takes an option name (`sampler="sjd"`, as `sampler=sjd` does) or a dict of settings, merged onto the option
its `name` names when the group has one (`sampler={"name": "sjd", "window": 4}`, as `sampler=sjd
sampler.window=4` does), else onto the default option. As with Hydra, the composed config is struct: an
unknown key is a ConfigError, not a silent new setting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from training.config import CONFIG_DIR, ConfigError, group_options

GLOBAL_PACKAGE = "# @package _global_"


def plain_settings(value):
    """Mappings -> dicts, tuples -> lists, paths -> strings, recursively: what a config may hold."""
    if isinstance(value, Mapping):
        return {str(key): plain_settings(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain_settings(item) for item in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def group_config(group: str, option: str) -> DictConfig:
    """configs/<group>/<option>.yaml placed at its package: under `group`, or at the root for _global_."""
    file = CONFIG_DIR / group / f"{option}.yaml"
    if not file.is_file():
        raise ConfigError(f"unknown {group} '{option}'; choose one of: {', '.join(group_options(group))}")
    node = OmegaConf.load(file)
    return node if file.read_text().lstrip().startswith(GLOBAL_PACKAGE) else OmegaConf.create({group: node})


def load_config(name: str, settings: Mapping | None = None) -> DictConfig:
    """configs/<name>.yaml with its defaults list and `settings` applied (see the module docstring)."""
    settings = plain_settings(settings or {})
    root = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    defaults = root.pop("defaults", [])
    root.pop("hydra", None)
    parts, group_settings = [], {}
    for entry in defaults:
        if entry == "_self_":
            parts.append(root)
            continue
        ((group, option),) = entry.items()
        if group.startswith(("override ", "hydra/")):
            continue
        chosen = settings.pop(group, option)
        if isinstance(chosen, dict):  # settings of an option: the one its `name` names, else the default
            group_settings[group] = chosen
            named = chosen.get("name")
            chosen = named if named and (CONFIG_DIR / group / f"{named}.yaml").is_file() else option
        if chosen is not None:
            parts.append(group_config(group, chosen))
    cfg = OmegaConf.merge(*parts)
    OmegaConf.set_struct(cfg, True)
    try:
        return OmegaConf.merge(cfg, group_settings, settings)
    except ConfigKeyError as error:
        raise ConfigError(f"unknown config key '{error.full_key}' (configs/{name}.yaml has none)") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{name} settings: {str(error).splitlines()[0]}") from None
