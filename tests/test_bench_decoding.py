"""scripts/bench_decoding.py end to end on tiny random exports: every method, its numbers, table and plot."""

import json

import pytest
import torch
from torch import nn

from generators import GPT, EagleDrafter
from scripts.bench_decoding import main
from tokenizers_vis.titok import TiTok
from training.feature_net import ensure_feature_net

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_TOKENS = 8
METHODS = {
    "ar",
    "speculative_gpt",
    "speculative_eagle",
    "lantern_gpt_d0.2",
    "lantern_eagle_d0.2",
    "lantern++_eagle_k4_l5",
    "sjd_L4",
    "sjd_reuse_L4",
    "sjd_copy_left_L4",
    "gsd_G3_L4",
}


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
    eagle = EagleDrafter.for_target(generator)
    for p in eagle.parameters():
        nn.init.normal_(p, std=0.3)
    eagle.save_pretrained(root / "eagle")
    ensure_feature_net(16, root / "nets", steps=60, pool_size=512, val_per_class=4, progress=False)
    return root


def arguments(workspace, out, draft, *extra):
    return [
        f"--generator={workspace / 'generator'}",
        f"--draft={draft}",
        f"--eagle={workspace / 'eagle'}",
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
        "--seeds",
        "0",
        "1",
        f"--out={out}",
        f"--results={out / 'results.json'}",
        *extra,
        "--eval",
        f"feature_net.root={workspace / 'nets'}",
        "feature_net.resolution=16",
        f"cache_root={workspace / 'cache'}",
        "reference_samples=64",
        "force=true",
    ]


def test_every_method_is_measured_and_reported(workspace, tmp_path):
    # The target drafts for itself (a second copy of the same export): every draft should pass.
    out = tmp_path / "bench"
    extra = ["--pass-cost-k", "1", "2", "--pass-cost-repeats=1"]
    report = main(arguments(workspace, out, workspace / "generator", *extra))
    written = json.loads((out / "decoding.json").read_text())
    assert written["methods"].keys() == report["methods"].keys() == METHODS
    assert (out / "decoding.png").stat().st_size > 0
    table = (out / "decoding.md").read_text()
    assert all(f"| {name} |" in table for name in METHODS) and "within noise" in table

    for name, method in written["methods"].items():
        for key in ("gfid", "is", "cond_accuracy"):
            assert isinstance(method[key], float), (name, key)
        assert method["quality_samples"]["metrics"]["num_samples"] == 17
        assert method["batches"].keys() == {"1", "4"}
        for batch, timing in method["batches"].items():
            assert timing["rows"] == int(batch) * (1 if batch == "4" else 2)  # rounded up to whole batches
            assert (
                timing["speedup_wall"] > 0 and timing["images_per_s"] > 0 and len(timing["wall_times"]) == 2
            )
            assert timing["passes_per_image"] <= timing["batch_passes"] <= NUM_TOKENS
            assert timing["tokens_per_pass"] == pytest.approx(NUM_TOKENS / timing["passes_per_image"])
        assert method["within_noise"] in (("baseline",) if name == "ar" else ("yes", "no"))
    methods = written["methods"]
    assert methods["ar"]["batches"]["1"]["speedup_wall"] == 1.0
    ar, spec = methods["ar"]["batches"]["1"], methods["speculative_gpt"]["batches"]["1"]
    assert ar["passes_per_image"] == NUM_TOKENS and ar["tokens_per_pass"] == 1.0
    assert spec["passes_per_image"] < ar["passes_per_image"] and spec["acceptance"] > 0.9
    assert spec["draft_passes_per_image"] > 0
    assert methods["speculative_eagle"]["batches"]["1"]["draft_passes_per_image"] > 0
    for name in ("sjd_L4", "sjd_reuse_L4", "sjd_copy_left_L4", "gsd_G3_L4"):
        assert "draft_passes_per_image" not in methods[name]["batches"]["1"]
        assert methods[name]["window"] == 5

    floor = written["noise_floor"]
    assert floor["seeds"] == [0, 1] and floor["gfid"][0] == methods["ar"]["gfid"]
    assert floor["spread"] == pytest.approx(abs(floor["gfid"][0] - floor["gfid"][1]))
    env = written["environment"]
    assert env["torch_threads"] == 1 and env["torch"] == torch.__version__

    cost = written["pass_cost"]  # GPT-B, random weights
    assert 100e6 < cost["model"]["params"] < 120e6
    assert {(row["batch"], row["k"]) for row in cost["table"]} == {(1, 1), (1, 2), (4, 1), (4, 2)}
    assert all(row["seconds"] > 0 for row in cost["table"])
    step = written["step_cost"]["1"]
    assert step["target"]["1"]["ratio"] == 1.0 and {"drafter_gpt", "drafter_eagle"} <= step.keys()
    projected = {(p["method"], p["batch"]): p for p in written["projection"]}
    assert len(projected) == 2 * len(METHODS) and projected[("ar", 1)]["speedup"] == 1.0

    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 2 * len(METHODS)
    keys = {"method", "settings", "batch", "passes_per_image", "tokens_per_pass", "speedup_wall", "gfid"}
    assert all(keys | {"cond_accuracy", "exact"} <= row.keys() for row in results["rows"])
    assert {"pass_cost", "projection", "noise_floor"} <= results.keys()

    # the committed data alone redraws the same table and a plot
    main(["--replot", str(out / "results.json"), f"--out={tmp_path / 'replot'}"])
    assert (tmp_path / "replot" / "decoding.md").read_text() == table
    assert (tmp_path / "replot" / "decoding.png").stat().st_size > 0


def test_a_missing_export_is_a_one_line_error(workspace, tmp_path):
    with pytest.raises(SystemExit, match=r"--draft .*train.py \+experiment=gpt_draft_quickstart"):
        main(arguments(workspace, tmp_path / "bench", tmp_path / "no_draft"))


def test_compiled_timing_runs_every_sampler_compiled(workspace, monkeypatch):
    """--compile times each method with compile=True: checked on ar alone (compiling every method of the
    bench would take a minute of the suite)."""
    from scripts import bench_decoding

    seen = []
    method = bench_decoding.Method(
        "ar", "ar", {}, lambda labels, gen, compile=False: seen.append(compile) or RESULT, True
    )
    args = bench_decoding.parse_args(["--repeats=2", "--seeds", "0", "1", "--device=cpu"])
    timings = bench_decoding.time_methods([method], 2, 4, 17, NUM_TOKENS, args, compile=True)
    assert set(seen) == {True} and timings["ar"]["speedup_wall"] == 1.0 and timings["ar"]["rows"] == 4


class _Result:
    stats = {
        "wall_time": 0.01,
        "forward_passes": NUM_TOKENS,
        "passes_per_row": NUM_TOKENS,
        "tokens_per_pass": 1.0,
    }


RESULT = _Result()
