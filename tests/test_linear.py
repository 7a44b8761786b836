"""PackedLinear (generators/linear.py): oneDNN on a prepacked weight at CPU inference, F.linear otherwise."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from generators.linear import PACK_MIN_ELEMENTS, PackedLinear

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this build")


@needs_onednn
def test_packed_inference_equals_f_linear_and_follows_weight_updates():
    torch.manual_seed(0)
    layer = PackedLinear(512, 1024, bias=False)  # 512k weights >= PACK_MIN_ELEMENTS: packed
    assert layer.weight.numel() >= PACK_MIN_ELEMENTS
    x = torch.randn(2, 3, 512)
    with torch.no_grad():
        assert torch.allclose(layer(x), F.linear(x, layer.weight), atol=1e-5)
        assert layer.packed.tensor is not None  # the oneDNN path ran
        layer.weight.mul_(-2.0)  # an optimiser step or EMA update: the packed copy must not go stale
        assert torch.allclose(layer(x), F.linear(x, layer.weight), atol=1e-5)
    out = layer(x)  # with autograd: plain F.linear, gradients reach the weight
    out.sum().backward()
    assert layer.weight.grad is not None and torch.allclose(out, F.linear(x, layer.weight), atol=1e-5)


def test_small_layers_copies_and_state_dicts_are_plain():
    layer = PackedLinear(64, 64)
    with torch.no_grad():
        layer(torch.randn(4, 64))
    assert layer.packed.tensor is None  # cache-resident weights stay on F.linear
    big = PackedLinear(512, 1024, bias=False)
    with torch.no_grad():
        big(torch.randn(2, 512))
    for clone in (copy.deepcopy(big), pickle.loads(pickle.dumps(big))):  # an opaque oneDNN tensor cannot be
        assert clone.packed.tensor is None and torch.equal(clone.weight, big.weight)  # copied: rebuilt
    assert list(big.state_dict()) == ["weight"]
