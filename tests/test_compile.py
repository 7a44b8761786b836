"""`compile=True` (torch.compile of the decode steps on static KV caches) gives the same tokens as eager
decoding under the same seed: ar, SJD, and speculative decoding with an EAGLE drafter (the three kinds of
compiled step: one-token decode, window decode, drafter on target features)."""

import pytest
import torch
from test_speculative import seeded, tiny_gpt

from generators import EagleDrafter
from sampling import sample_ar, sample_jacobi, sample_speculative

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return tiny_gpt(0, 3.0, vocab=16, num_tokens=12, grid=(3, 4))


@pytest.mark.parametrize("method", ["ar", "sjd", "speculative_eagle"])
def test_compiled_decoding_gives_the_eager_tokens(target, method):
    labels = torch.tensor([0, 1, 1])  # rows finish at different passes: the batch shrinks while compiled
    torch.manual_seed(0)
    drafter = EagleDrafter.for_target(target)

    def sample(compile):
        settings = dict(cfg_scale=2.0, generator=seeded(1), compile=compile)
        if method == "ar":
            return sample_ar(target, labels, **settings)
        if method == "sjd":
            return sample_jacobi(target, labels, window=3, **settings)
        return sample_speculative(target, drafter, labels, gamma=3, **settings)

    eager, compiled = sample(False), sample(True)
    assert torch.equal(eager.tokens, compiled.tokens)
    assert eager.stats["forward_passes"] == compiled.stats["forward_passes"]
    assert target.cache is None and drafter.cache is None
