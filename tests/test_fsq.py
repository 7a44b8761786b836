import math

import pytest
import torch

from tokenizers_vis.quantizers import FSQuantizer, QuantizerOutput

LEVELS = [(8, 8, 8, 5, 5, 5), (8, 5, 5, 5), (2, 3, 4)]


@pytest.mark.parametrize("levels", LEVELS)
def test_code_count_and_grid(levels):
    fsq = FSQuantizer(levels)
    vectors = fsq.code_vectors()
    assert fsq.codebook_size == math.prod(levels) and fsq.code_dim == len(levels)
    assert vectors.shape == (math.prod(levels), len(levels)) and vectors.dtype == torch.float32
    assert torch.unique(vectors, dim=0).shape[0] == math.prod(levels)  # every code its own grid point
    assert vectors.min() >= -1 and vectors.max() <= 1
    for channel, level in enumerate(levels):  # channel i takes exactly L_i values, -1 among them
        values = torch.unique(vectors[:, channel])
        assert len(values) == level and values[0] == -1


@pytest.mark.parametrize("levels", LEVELS)
def test_every_index_round_trips(levels):
    fsq = FSQuantizer(levels)
    indices = torch.arange(fsq.codebook_size)
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(indices)), indices)
    assert torch.equal(fsq.lookup(indices), fsq.code_vectors())


def test_forward_codes_in_range_and_consistent():
    torch.manual_seed(0)
    fsq = FSQuantizer((8, 8, 8, 5, 5, 5))
    z = torch.randn(4, 7, 6) * 5  # large inputs saturate the tanh: extreme levels must stay in range
    out = fsq(z)
    assert isinstance(out, QuantizerOutput) and out.losses == {}
    assert out.codes.shape == (4, 7) and out.codes.dtype == torch.long
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < fsq.codebook_size
    assert torch.allclose(fsq.lookup(out.codes), out.quantized, atol=1e-6)
    assert set(out.stats) == {"usage", "perplexity"}
    # Saturated inputs reach both ends of every channel, even with even level counts.
    extremes = fsq(torch.tensor([[-100.0] * 6, [100.0] * 6])).quantized
    assert torch.allclose(extremes[0], torch.full((6,), -1.0))
    assert torch.allclose(extremes[1], torch.tensor([0.75, 0.75, 0.75, 1.0, 1.0, 1.0]))


def test_straight_through_gradient_reaches_the_input():
    fsq = FSQuantizer((8, 5, 5, 5))
    z = torch.randn(3, 5, 4, requires_grad=True)
    out = fsq(z)
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # The gradient is that of the tanh bound (rounding is the identity backward): nonzero everywhere.
    assert (z.grad != 0).float().mean() > 0.9


def test_fp32_under_autocast():
    fsq = FSQuantizer((8, 5, 5, 5))
    z = torch.randn(2, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fsq(z.bfloat16())
    assert out.quantized.dtype == torch.float32
    assert torch.equal(out.codes, fsq(z.bfloat16().float()).codes)


def test_invalid_levels():
    with pytest.raises(ValueError, match="levels"):
        FSQuantizer((8, 1))
    assert FSQuantizer((8, 5)).state_dict() == {}  # nothing learned, nothing saved
