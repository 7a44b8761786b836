import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizers_vis import OneDPiece
from training.feature_net import ensure_feature_net

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_rate_distortion as bench  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prefix_lengths_are_powers_of_two_and_n():
    assert bench.prefix_lengths(64) == [1, 2, 4, 8, 16, 32, 64]
    assert bench.prefix_lengths(24) == [1, 2, 4, 8, 16, 24]


@pytest.mark.parametrize("codec", bench.CODECS)
def test_payload_is_the_coded_data_without_headers(codec):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    sizes = {}
    for quality in (5, 90):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, quality=quality, **bench.CODECS[codec])
        sizes[quality] = (len(buffer.getvalue()), bench.payload_bytes(codec, buffer.getvalue()))
    for size, payload in sizes.values():
        assert 0 < payload < size
    # Headers and tables are fixed costs, so the payload carries the whole difference in quality... almost:
    # JPEG's tables do not depend on the image but their values change with the quality setting.
    assert sizes[90][1] - sizes[5][1] >= 0.8 * (sizes[90][0] - sizes[5][0])


def test_codec_at_interpolates_and_refuses_to_extrapolate():
    curve = [{"bytes": 10.0, "psnr": 20.0}, {"bytes": 30.0, "psnr": 30.0}]
    assert bench.codec_at(curve, 20.0, "psnr") == pytest.approx(25.0)
    assert bench.codec_at(curve, 5.0, "psnr") is None and bench.codec_at(curve, 31.0, "psnr") is None


def test_bench_writes_curves_table_plot_and_prefix_grid(tmp_path):
    torch.manual_seed(0)
    tiny = dict(image_size=16, patch_size=8, size="tiny", width=32, depth=1, heads=2, num_tokens=4)
    OneDPiece(codebook_size=64, code_dim=8, **tiny).save_pretrained(tmp_path / "odp")
    ensure_feature_net(16, tmp_path / "nets", steps=30, pool_size=256, val_per_class=2, progress=False)
    out = tmp_path / "bench"
    results = bench.main(
        [
            f"--tokenizer=odp={tmp_path / 'odp'}",
            "--val-per-class=2",
            f"--feature-net-root={tmp_path / 'nets'}",
            "--feature-net-resolution=16",
            f"--out={out}",
        ]
    )
    rows = results["tokenizers"]["odp"]["rows"]
    assert [r["tokens"] for r in rows] == [1, 2, 4]
    assert [r["bytes"] for r in rows] == [0.75, 1.5, 3.0]  # k * log2(64) / 8
    assert set(results["codecs"]) == {"JPEG", "JPEG payload", "WebP", "WebP payload"}
    assert json.loads((out / "rate_distortion.json").read_text())["num_images"] == 34
    table = (out / "rate_distortion.md").read_text()
    assert "| odp | 4 | 3.0 |" in table and "cannot go below" in table
    for name in ("rate_distortion.png", "prefixes_odp.png"):
        assert Image.open(out / name).size[0] > 100
