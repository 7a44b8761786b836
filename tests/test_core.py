"""core/: the registry and export every model shares, and the one-way dependencies between the packages."""

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import Exportable, from_pretrained, read_export, register
from generators import GPT, EagleDrafter
from tokenizers_vis import OneDPiece, TiTok

ROOT = Path(__file__).resolve().parent.parent
LEGACY = Path(__file__).parent / "data" / "exports_v0_1"  # written by release 0.1 ({"class", "config"})

# Which project packages each package may import: core below everything, models on core, samplers on
# models, training on all (DESIGN.md "Dependencies point one way"). Scripts and train.py sit on top.
ALLOWED = {
    "core": set(),
    "tokenizers_vis": {"core"},
    "generators": {"core"},
    "sampling": {"core", "generators", "tokenizers_vis"},
    "training": {"core", "generators", "tokenizers_vis", "sampling"},
}
FRAMEWORKS = {"lightning", "pytorch_lightning", "hydra", "omegaconf"}  # models and samplers never import them


def imports_of(package: str) -> dict[str, set[str]]:
    """file -> top-level names it imports, counting imports inside functions (lazy ones) too."""
    found = {}
    for file in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(file.relative_to(ROOT))] = names
    return found


def test_packages_import_one_way_and_models_no_frameworks():
    graph = {}
    for package, allowed in ALLOWED.items():
        uses = set()
        for file, names in imports_of(package).items():
            project = (names & set(ALLOWED)) - {package}
            extra = sorted(project - allowed)
            assert not extra, f"{file} imports {extra}; {package} may use {sorted(allowed)}"
            if package != "training":
                assert not names & FRAMEWORKS, f"{file} imports {sorted(names & FRAMEWORKS)}"
            uses |= project
        graph[package] = uses
    # No cycle: repeatedly remove packages that import nothing left.
    remaining = dict(graph)
    while remaining:
        leaves = [p for p, uses in remaining.items() if not uses & set(remaining)]
        assert leaves, f"import cycle among {sorted(remaining)}"
        for leaf in leaves:
            del remaining[leaf]


def test_every_package_says_what_it_is_for():
    for package in ALLOWED:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 8, f"{package}/__init__.py needs a docstring naming its job"


def test_exports_of_release_0_1_still_load_and_compute_the_same():
    expected = load_file(str(LEGACY / "expected.safetensors"))
    tokenizer = from_pretrained(LEGACY / "onedpiece")
    assert type(tokenizer) is OneDPiece and tokenizer.tail_drop == "sample"
    codes = tokenizer.encode(expected["images"]).data
    assert torch.equal(codes, expected["codes"])
    assert torch.allclose(tokenizer.decode(tokenizer.encode(expected["images"])), expected["reconstructions"])
    generator = from_pretrained(LEGACY / "gpt")
    assert type(generator) is GPT and generator.width == 16
    logits = generator(codes, torch.tensor([0, 1]))
    assert torch.allclose(logits, expected["logits"], atol=1e-6)
    drafter = from_pretrained(LEGACY / "eagle").bind(generator)  # its recorded target matches the GPT
    assert type(drafter) is EagleDrafter
    assert read_export(LEGACY / "gpt")["model_type"] == "gpt"


def test_save_pretrained_writes_the_hub_layout_and_round_trips(tmp_path):
    model = TiTok(16, 8, "tiny", width=16, depth=1, heads=2, num_tokens=4, codebook_size=16).eval()
    folder = model.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["model_type"] == "titok" and meta["num_tokens"] == 4 and meta["width"] == 16
    assert meta["token_spec"]["vocab_size"] == 16  # metadata beside the arguments, ignored on loading
    loaded = TiTok.from_pretrained(folder)
    assert loaded.config == model.config
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(images).data, model.encode(images).data)
    with pytest.raises(ValueError, match="holds a 'titok' model, not a GPT"):
        GPT.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        (folder / "model.safetensors").unlink()
        from_pretrained(folder)


def test_config_is_captured_once_and_must_be_json():
    model = OneDPiece(image_size=16, patch_size=8, size="tiny", width=16, depth=1, heads=2, num_tokens=4)
    assert model.config["tail_drop"] == "batch"  # its own default
    assert model.config["codebook_size"] == 4096  # the default of TiTok, which it forwards **kwargs to

    @register("test-widget")
    class Widget(Exportable, torch.nn.Module):
        def __init__(self, scale=1.0):
            super().__init__()
            self.scale = scale

    assert Widget(scale=[1, 2]).config == {"scale": [1, 2]}
    with pytest.raises(TypeError, match="argument 'scale' is not JSON-serialisable"):
        Widget(scale=torch.ones(1))
