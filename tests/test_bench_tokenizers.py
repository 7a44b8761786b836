import math
import sys
from pathlib import Path

import pytest
from scipy.stats import spearmanr

from tokenizers_vis.base import TokenSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_tokenizers as bench  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parent.parent / "configs" / "experiment"


def test_every_entry_names_existing_experiments_and_a_benched_base():
    for name, entry in bench.ENTRIES.items():
        assert (EXPERIMENTS / f"{entry.tokenizer}.yaml").is_file(), name
        assert (EXPERIMENTS / f"{entry.generator}.yaml").is_file(), name
        assert entry.posttrain_of is None or bench.ENTRIES[entry.posttrain_of].posttrain_of is None


@pytest.mark.parametrize(
    "x, y",
    [
        ([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]),
        ([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]),
        ([3.0, 1.0, 2.0, 2.0, 5.0], [1.0, 0.5, 7.0, 2.0, 3.0]),  # ties share their mean rank
    ],
)
def test_spearman_is_scipys_rank_correlation(x, y):
    assert bench.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)


def test_spearman_is_undefined_below_three_points_or_for_a_constant():
    assert bench.spearman([1.0, 2.0], [2.0, 1.0]) is None
    assert bench.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None


def test_pfid_correlation_uses_only_tokenizers_with_a_pfid():
    rows = [
        {"rfid": 10.0, "pfid": 12.0, "gfid": 20.0},
        {"rfid": 11.0, "pfid": 30.0, "gfid": 40.0},
        {"rfid": 12.0, "pfid": 20.0, "gfid": 30.0},
        {"rfid": 1.0, "pfid": None, "gfid": 50.0},
    ]
    corr = bench.correlations(rows)
    assert (corr["rfid_gfid_n"], corr["pfid_gfid_n"]) == (4, 3)
    assert corr["pfid_gfid"] == pytest.approx(1.0)
    assert corr["rfid_gfid_categorical"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "spec, bits",
    [
        (TokenSpec("categorical", 32, vocab_size=1024), 10),
        (TokenSpec("binary", 32, vocab_size=2, token_dim=16), 16),
        (TokenSpec("factorized", 32, vocab_size=1024, token_dim=2), 20),
        (TokenSpec("dimwise", 32, vocab_size=64, token_dim=8), 48),
        (TokenSpec("categorical", 32, vocab_size=1000), math.log2(1000)),
    ],
)
def test_bits_per_token_counts_every_element(spec, bits):
    assert spec.bits_per_token == pytest.approx(bits)
