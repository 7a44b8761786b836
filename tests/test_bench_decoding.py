"""scripts/bench_decoding.py end to end on tiny random exports: every method, its numbers, table and plot."""

import json

import pytest
import torch
from torch import nn

from generators import GPT
from scripts.bench_decoding import main
from tokenizers_vis.titok import TiTok
from training.feature_net import ensure_feature_net

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_TOKENS = 8
METHODS = {"ar", "speculative", "lantern_d0.2", "lantern++_k4_l5", "sjd_L4", "sjd_copy_left_L4", "gsd_G3_L4"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Untrained tiny tokenizer (16 codes, 8 tokens, 16x16 images) and GPT (17 classes), and a tiny
    photos-net (16 px) to measure them with."""
    root = tmp_path_factory.mktemp("bench_decoding")
    torch.manual_seed(0)
    tokenizer = TiTok(
        16, 8, size="tiny", width=32, depth=1, heads=2, num_tokens=NUM_TOKENS, codebook_size=16, code_dim=4
    )
    tokenizer.save_pretrained(root / "tokenizer")
    generator = GPT(16, NUM_TOKENS, 17, size="tiny", width=32, depth=1, heads=2)
    for module in generator.modules():  # peaked, context-dependent distributions
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.3)
    generator.save_pretrained(root / "generator")
    ensure_feature_net(16, root / "nets", steps=60, pool_size=512, val_per_class=4, progress=False)
    return root


def arguments(workspace, out, draft):
    return [
        f"--generator={workspace / 'generator'}",
        f"--draft={draft}",
        f"--tokenizer={workspace / 'tokenizer'}",
        "--num-samples=17",
        "--sample-batch-size=9",
        "--batch-sizes",
        "1",
        "4",
        "--timing-rows=2",
        "--repeats=2",
        "--lantern-deltas=0.2",
        "--lantern-pp",
        "4",
        "5",
        "--sjd-windows=4",
        "--jacobi-window=4",
        "--gsd-group-size=3",
        f"--out={out}",
        "--eval",
        f"feature_net.root={workspace / 'nets'}",
        "feature_net.resolution=16",
        f"cache_root={workspace / 'cache'}",
        "reference_samples=64",
    ]


def test_every_method_is_measured_and_reported(workspace, tmp_path):
    # The target drafts for itself (a second copy of the same export): every draft should pass.
    out = tmp_path / "bench"
    report = main(arguments(workspace, out, draft=workspace / "generator"))
    written = json.loads((out / "decoding.json").read_text())
    assert written["methods"].keys() == report["methods"].keys() == METHODS
    assert (out / "decoding.png").stat().st_size > 0
    table = (out / "decoding.md").read_text()
    assert all(f"| {name} |" in table for name in METHODS) and "within noise" in table

    for name, method in written["methods"].items():
        quality = method["quality"]
        for key in ("forward_passes", "tokens_per_pass", "gfid", "is", "cond_accuracy"):
            assert isinstance(quality[key], float | int), (name, key)
        assert quality["metrics"]["num_samples"] == 17
        assert method["timing"].keys() == {"1", "4"}
        for batch, timing in method["timing"].items():
            assert timing["rows"] == int(batch) * (1 if batch == "4" else 2)  # rounded up to whole batches
            assert timing["speedup"] > 0 and timing["images_per_s"] > 0 and len(timing["wall_times"]) == 2
        assert method["within_noise"] in (("baseline",) if name == "ar" else ("yes", "no"))
    assert written["methods"]["ar"]["timing"]["1"]["speedup"] == 1.0

    ar, spec = written["methods"]["ar"]["quality"], written["methods"]["speculative"]["quality"]
    assert ar["forward_passes"] == NUM_TOKENS and ar["tokens_per_pass"] == 1.0
    assert spec["forward_passes"] <= ar["forward_passes"] and spec["tokens_per_pass"] > 1
    assert spec["acceptance_rate"] > 0.9 and spec["draft_forward_passes"] > 0
    for name in ("sjd_L4", "sjd_copy_left_L4", "gsd_G3_L4"):
        assert "draft_forward_passes" not in written["methods"][name]["quality"]

    floor = written["noise_floor"]
    assert floor["seeds"] == [0, 1] and floor["gfid"][0] == ar["gfid"]
    assert floor["spread"] == pytest.approx(abs(floor["gfid"][0] - floor["gfid"][1]))
    assert (
        written["environment"]["torch_threads"] == 1 and written["environment"]["torch"] == torch.__version__
    )
    assert written["draft_param_ratio"] == 1.0


def test_a_missing_export_is_a_one_line_error(workspace, tmp_path):
    with pytest.raises(SystemExit, match=r"--draft .*train.py \+experiment=gpt_draft_quickstart"):
        main(arguments(workspace, tmp_path / "bench", draft=tmp_path / "no_draft"))
