"""The model registry and export: an exported model is a folder (or a Hugging Face Hub repo) holding
`config.json` and `model.safetensors`.

Built on huggingface_hub's `PyTorchModelHubMixin`. A model class is an `nn.Module` that also derives from
`Exportable` and registers a name:

    @register("titok")
    class TiTok(Exportable, nn.Module):
        def __init__(self, image_size: int = 256, ...): ...

The constructor's arguments are captured once, when the model is created (the mixin's `__new__`), and are
`model.config`: no constructor copies its arguments into a dict. `save_pretrained(folder)` writes them to
config.json beside `model_type` (the registered name) and informative metadata (a tokenizer's token_spec,
say), the weights to model.safetensors and a model card; `push_to_hub(repo_id)` uploads the same files.
`from_pretrained(folder_or_repo_id)` rebuilds any registered model from those two files alone, with a strict
key check and without unpickling anything; `TiTok.from_pretrained(...)` does the same and checks the class.

Exports written before this layout (`{"class": name, "config": {...}, ...}`) load unchanged.

This module imports no package of the project. Classes register when their package is imported; when
`from_pretrained` meets a name not registered yet it imports the packages in MODEL_PACKAGES by name, as
transformers' Auto classes import a model's module on first use, so the dependency stays one way.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath

import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_file, save_file

MODEL_PACKAGES = ("tokenizers_vis", "generators")  # where registered classes live
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
LEGACY_KEYS = ("class", "config")  # config.json before PyTorchModelHubMixin: {"class", "config", metadata}

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: make a model (tokenizer or generator) loadable by `from_pretrained` under `name`."""

    def wrap(cls):
        cls.registry_name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def model_class(name: str) -> type:
    """The class registered under `name` (importing the model packages on first use)."""
    if name not in _REGISTRY:
        for package in MODEL_PACKAGES:
            importlib.import_module(package)
    if name not in _REGISTRY:
        raise ValueError(f"unknown model_type {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def plain(value):
    """Mappings -> dicts, sequences -> lists, recursively: what a config given as an OmegaConf container
    (Hydra's `instantiate`) becomes in config.json; paths become strings."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [plain(item) for item in value]
    return value


def read_export(folder: str | Path) -> dict:
    """config.json of an export folder as {"model_type", constructor arguments..., metadata...}; the layout
    written before PyTorchModelHubMixin ({"class", "config", metadata}) is converted to it."""
    file = Path(folder) / CONFIG_NAME
    meta = json.loads(file.read_text())
    if "model_type" not in meta and "class" in meta and isinstance(meta.get("config"), dict):
        metadata = {key: value for key, value in meta.items() if key not in LEGACY_KEYS}
        meta = {"model_type": meta["class"], **meta["config"], **metadata}
    if "model_type" not in meta:
        raise ValueError(f"{file} has no model_type: not an export of this project")
    return meta


def init_parameters(cls: type) -> set[str]:
    """Names a class's constructor accepts, following `**kwargs` into the constructors of its bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is Exportable or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        names |= {
            n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return names


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_folder(name_or_path: str | Path, **hub_options) -> Path:
    """A local export folder, or a Hub repo id ("owner/name") downloaded into the Hub cache."""
    path = Path(name_or_path)
    if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
        return path
    text = str(name_or_path)
    if not path.exists() and REPO_ID.match(text) and not Path(text.split("/")[0]).exists():
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=["*.json", WEIGHTS_NAME], **hub_options))
    missing = path / (CONFIG_NAME if not (path / CONFIG_NAME).is_file() else WEIGHTS_NAME)
    raise FileNotFoundError(f"not an exported model: {missing} is missing")


class Exportable(PyTorchModelHubMixin):
    """Save/load as config.json + model.safetensors (module docstring); mix into an nn.Module."""

    registry_name: str = ""
    # The model's repeated block classes: the units FSDP shards one by one and activation checkpointing
    # recomputes (training/fsdp.py reads them from every model of a run).
    fsdp_blocks: tuple[type, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        params = cls._hub_mixin_init_parameters.values()
        if any(p.kind == p.VAR_KEYWORD for p in params):
            # A constructor forwarding **kwargs to its base's (OneDPiece -> TiTok): the base's defaults are
            # part of the config as well, so `config` holds every argument the model was built with.
            inherited: dict = {}
            for base in reversed(cls.__mro__[1:]):
                inherited.update(vars(base).get("_hub_mixin_jsonable_default_values", {}))
            cls._hub_mixin_jsonable_default_values = {**inherited, **cls._hub_mixin_jsonable_default_values}

    def __new__(cls, *args, **kwargs):
        args, kwargs = plain(list(args)), plain(kwargs)
        instance = super().__new__(cls, *args, **kwargs)
        if instance._hub_mixin_config is None:
            instance._hub_mixin_config = {}
        passed = {**dict(zip(list(cls._hub_mixin_init_parameters)[1:], args, strict=False)), **kwargs}
        dropped = [name for name, value in passed.items() if not cls._is_jsonable(value)]
        if dropped:  # the mixin silently leaves out values JSON cannot hold; an export would lose them
            raise TypeError(
                f"{cls.__name__}: argument {dropped[0]!r} is not JSON-serialisable, so the model could not "
                "be exported; pass numbers, strings, lists or dicts"
            )
        return instance

    @property
    def config(self) -> dict:
        """The constructor's arguments (defaults included): what config.json records, loading passes back."""
        return self._hub_mixin_config

    @config.setter
    def config(self, value: dict) -> None:
        self._hub_mixin_config = value

    def export_metadata(self) -> dict:
        """Extra, informative entries for config.json (not passed back to the constructor)."""
        return {}

    def save_pretrained(self, save_directory: str | Path, *, config: dict | None = None, **kwargs) -> Path:
        """Write config.json, model.safetensors and a model card to `save_directory`; with
        `push_to_hub=True, repo_id=...` also upload them. Returns the folder."""
        if config is None:
            config = {"model_type": self.registry_name, **self.config}
            for key, value in self.export_metadata().items():
                if key in config:
                    raise ValueError(
                        f"{type(self).__name__}: metadata {key!r} shadows a constructor argument"
                    )
                config[key] = value
        super().save_pretrained(save_directory, config=config, **kwargs)
        return Path(save_directory)

    def _save_pretrained(self, save_directory: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(Path(save_directory) / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, *, device: str | torch.device = "cpu", **hub_options
    ) -> torch.nn.Module:
        """Rebuild an exported model from a folder or Hub repo id (strict key check, no unpickling).
        `hub_options` (revision, cache_dir, token, local_files_only) go to huggingface_hub's download."""
        folder = resolve_folder(name_or_path, **hub_options)
        meta = read_export(folder)
        target = model_class(meta["model_type"])
        if cls is not Exportable and not issubclass(target, cls):
            raise ValueError(f"{folder} holds a {meta['model_type']!r} model, not a {cls.__name__}")
        accepted = init_parameters(target)
        model = target(**{key: value for key, value in meta.items() if key in accepted})
        metadata = {key: value for key, value in meta.items() if key not in accepted and key != "model_type"}
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME), device=str(device)), strict=True)
        model.load_metadata(metadata)
        return model.to(device).eval()

    def load_metadata(self, metadata: dict) -> None:
        """Receives the export's metadata entries on loading (PhotosNet keeps its training report)."""


def from_pretrained(name_or_path: str | Path, device: str | torch.device = "cpu", **hub_options):
    """Any registered model from an export folder or Hub repo id (see `Exportable.from_pretrained`)."""
    return Exportable.from_pretrained(name_or_path, device=device, **hub_options)
