"""scripts/bench_token_shuffle.py end to end on tiny random exports: rows, noise, table, plot, replot."""

import json

import pytest
import torch
from torch import nn

from generators import GPT
from scripts.bench_token_shuffle import main
from tokenizers_vis import VQGAN
from training.feature_net import ensure_feature_net

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny VQGAN (16 px, 4 x 4 grid, 32 codes), GPTs with s = 1 and 2 on its grid, a tiny photos-net."""
    root = tmp_path_factory.mktemp("bench_token_shuffle")
    torch.manual_seed(0)
    tokenizer = VQGAN(
        image_size=16,
        size="tiny",
        ch_mult=[1, 2, 2],
        width=8,
        num_res_blocks=1,
        z_channels=16,
        norm_groups=4,
        codebook_size=32,
        code_dim=4,
    )
    tokenizer.save_pretrained(root / "tokenizer")
    for s in (1, 2):
        gpt = GPT(32, 16, 17, grid=(4, 4), size="tiny", width=32, depth=1, heads=2, shuffle=s)
        for module in gpt.modules():  # peaked, context-dependent distributions
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.3)
        gpt.save_pretrained(root / f"gpt_s{s}" / "export")
    ensure_feature_net(16, root / "nets", steps=60, pool_size=512, val_per_class=4, progress=False)
    return root


def test_bench_rows_noise_table_and_replot(workspace, tmp_path):
    out = tmp_path / "out"
    arguments = [
        f"--tokenizer={workspace / 'tokenizer'}",
        f"--generator-pattern={workspace}/gpt_s{{s}}/export",
        "--shuffles",
        "1",
        "2",
        "--sjd-window=2",
        "--batch-sizes",
        "1",
        "4",
        "--timing-rows=4",
        "--repeats=1",
        "--num-samples=51",
        "--seeds",
        "0",
        "1",
        f"--out={out}",
        f"--results={tmp_path / 'results.json'}",
        "--eval",
        f"feature_net.root={workspace / 'nets'}",
        "feature_net.resolution=16",
        "reference_samples=51",
        f"cache_root={workspace / 'cache'}",
        "force=true",
    ]
    report = main(arguments)
    rows = report["rows"]
    assert {(r["shuffle"], r["sampler"], r["batch"]) for r in rows} == {
        (s, m, b) for s in (1, 2) for m in ("ar", "sjd_L2") for b in (1, 4)
    }
    by_key = {(r["shuffle"], r["sampler"], r["batch"]): r for r in rows}
    assert by_key[(1, "ar", 1)]["speedup_wall"] == 1.0 and by_key[(2, "ar", 1)]["positions"] == 4
    assert by_key[(1, "ar", 4)]["passes_per_image"] == 16 and by_key[(2, "ar", 4)]["passes_per_image"] == 4
    assert by_key[(2, "sjd_L2", 4)]["passes_per_image"] <= 4  # SJD never needs more passes than plain
    assert all(r["gfid"] > 0 and 0 <= r["cond_accuracy"] <= 1 for r in rows)
    assert len(report["noise"]["1"]["gfid"]) == 2 and report["noise"]["1"]["spread"] >= 0
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(
        (out / "token_shuffle.json").read_text()
    )
    assert (out / "token_shuffle.png").stat().st_size > 0
    replotted = main(["--replot", str(tmp_path / "results.json"), f"--out={tmp_path / 'again'}"])
    assert (tmp_path / "again" / "token_shuffle.md").read_text() == (out / "token_shuffle.md").read_text()
    assert replotted == report
    with pytest.raises(SystemExit, match="shuffle=1 and 16 tokens; expected shuffle=2"):
        main([*arguments[:2], f"--generator-pattern={workspace}/gpt_s1/export", "--shuffles", "2"])
