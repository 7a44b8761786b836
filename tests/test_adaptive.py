import math

import pytest
import torch

from tokenizers_vis import OneDPiece, Tokens, TokenSpec, shortest_prefix
from tokenizers_vis.adaptive import max_decoder_calls, psnr
from training.metrics import psnr as training_psnr

pytestmark = pytest.mark.usefixtures("one_thread")  # shared CPUs: one thread is much faster


class StubTokenizer:
    """Reconstruction from the first k of N tokens: mean + r_i(k) * (image - mean), r_i increasing to 1.

    mean: per image and channel. r_i(k) is a random increasing curve per image, or one shared by all images
    (same_curve), so quality is monotone in k in a known way; a flat image is exact from k = 1 on.
    `data` (B, N, 3*H*W) holds every prefix's reconstruction; decode picks a row.
    """

    def __init__(self, num_tokens: int, decodes_row_lengths: bool, seed: int = 0, same_curve: bool = False):
        self.token_spec = TokenSpec("continuous", num_tokens)
        self.decodes_row_lengths = decodes_row_lengths
        self.generator = torch.Generator().manual_seed(seed)
        self.calls, self.same_curve = 0, same_curve

    def encode(self, images):
        batch, n = len(images), self.token_spec.num_tokens
        steps = torch.rand(1 if self.same_curve else batch, n, generator=self.generator) + 0.05
        r = steps.cumsum(1) / steps.sum(1, keepdim=True)  # (B, N), increasing, r(N) = 1
        mean = images.mean((2, 3), keepdim=True)  # (B, 3, 1, 1)
        prefixes = mean[:, None] + r[:, :, None, None, None] * (images - mean)[:, None]  # (B, N, 3, H, W)
        self.shape = images.shape[1:]
        return Tokens("continuous", prefixes.flatten(2))

    def decode(self, tokens, num_tokens=None):
        self.calls += 1
        batch = len(tokens)
        if tokens.lengths is not None:
            assert self.decodes_row_lengths, "per-row lengths sent to a tokenizer that does not decode them"
            k = tokens.lengths.clamp(max=num_tokens or self.token_spec.num_tokens)
        else:
            k = torch.full((batch,), num_tokens or self.token_spec.num_tokens)
        return tokens.data[torch.arange(batch), k - 1].view(batch, *self.shape)


def exhaustive_shortest(tokenizer, tokens, images, target, quality_fn=psnr):
    """Decode every prefix length of every image; the first reaching the target, else N."""
    n = tokenizer.token_spec.num_tokens
    quality = torch.stack(
        [
            quality_fn(tokenizer.decode(Tokens(tokens.kind, tokens.data), num_tokens=k), images)
            for k in range(1, n + 1)
        ],
        dim=1,
    )  # (B, N)
    reached = quality >= torch.as_tensor(target).reshape(-1, 1)
    return torch.where(
        reached.any(1), reached.float().argmax(1) + 1, torch.full_like(reached[:, 0], n, dtype=torch.long)
    ), quality


def photos(batch=6, size=16, seed=0):
    """Images from flat (std 0) to very textured, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, 1, 1, generator=g) - 0.5
    texture = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    amplitude = torch.linspace(0, 0.5, batch).view(-1, 1, 1, 1)
    return (base + amplitude * texture).clamp(-1, 1)


def test_psnr_in_db_on_the_unit_scale_with_clamping():
    images = torch.zeros(2, 3, 4, 4)  # mid-grey: 0.5 on the unit scale
    shifted = images + torch.tensor([0.2, 4.0]).view(2, 1, 1, 1)  # +0.1 on the unit scale; overshoot
    expected = torch.tensor([20.0, 10 * math.log10(1 / 0.25)])  # mse 0.01; clamped to 1.0 -> mse 0.25
    assert torch.allclose(psnr(shifted, images), expected, atol=1e-4)
    assert training_psnr is psnr  # validation and evaluation report the same number


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 2, 5, 13, 64])
def test_stub_result_is_the_exhaustive_shortest_prefix_within_the_call_bound(num_tokens, per_row):
    images = photos()
    for seed, target in enumerate([15.0, 25.0, 32.0, 45.0, 200.0]):
        stub = StubTokenizer(num_tokens, per_row, seed)
        tokens = stub.encode(images)
        stats = {}
        result = shortest_prefix(stub, images, target, tokens=tokens, stats=stats)
        expected, quality = exhaustive_shortest(stub, tokens, images, target)
        assert result.lengths.dtype == torch.long and torch.equal(result.lengths, expected)
        assert result.data is tokens.data  # all N codes kept; lengths say how many each image uses
        assert stats["decoder_calls"] == stub.calls - num_tokens  # the search's calls, counted right
        assert stats["decoder_calls"] <= max_decoder_calls(num_tokens, len(images), per_row)
        assert stats["rounds"] <= math.ceil(math.log2(num_tokens))
        if per_row:
            assert stats["decoder_calls"] == stats["rounds"]
        # Quality at the chosen length: known wherever it was decoded, and then it reaches the target.
        chosen = quality.gather(1, result.lengths[:, None] - 1).squeeze(1)
        known = ~stats["quality"].isnan()
        assert torch.allclose(stats["quality"][known], chosen[known])
        assert (stats["quality"][known] >= target).all()
        assert known[result.lengths < num_tokens].all()


def test_flat_image_needs_fewer_tokens_than_a_textured_one():
    images = photos()  # row 0 flat ... row 5 most textured
    stub = StubTokenizer(32, True, same_curve=True)  # the same detail-vs-k curve for every image
    lengths = shortest_prefix(stub, images, 30.0).lengths
    assert lengths[0] == 1 and lengths[-1] > 1
    assert (lengths.diff() >= 0).all() and len(set(lengths.tolist())) >= 3  # more texture, more tokens


def test_the_bound_is_ceil_log2_n_calls_with_row_lengths():
    assert [max_decoder_calls(n, 8, True) for n in (1, 2, 3, 4, 5, 64, 256)] == [0, 1, 2, 2, 3, 6, 8]
    assert max_decoder_calls(256, 8, False) == 1 + 2 + 4 + 8 * 5
    assert max_decoder_calls(5, 100, False) == 4  # no midpoint is tested twice: at most N - 1 calls


def test_generic_quality_fn_and_per_image_targets():
    images = photos()
    stub = StubTokenizer(16, True)
    tokens = stub.encode(images)
    neg_l1 = lambda r, x: -(r - x).abs().flatten(1).mean(1)  # a distance, negated: higher is better
    targets = torch.linspace(-0.2, -0.01, len(images))
    result = shortest_prefix(stub, images, tokens=tokens, quality_fn=neg_l1, target=targets)
    expected, _ = exhaustive_shortest(stub, tokens, images, targets, quality_fn=neg_l1)
    assert torch.equal(result.lengths, expected)
    with pytest.raises(ValueError, match="needs `target`"):
        shortest_prefix(stub, images, tokens=tokens, quality_fn=neg_l1)
    with pytest.raises(ValueError, match="give target_psnr"):
        shortest_prefix(stub, images, tokens=tokens)


def test_onedpiece_encode_with_a_target_finds_a_boundary_prefix():
    torch.manual_seed(0)
    model = OneDPiece(
        image_size=16,
        patch_size=4,
        size="tiny",
        width=32,
        depth=1,
        heads=2,
        num_tokens=8,
        codebook_size=32,
        code_dim=8,
    ).eval()
    images = photos(4)
    assert model.encode(images).lengths is None  # no target: all N tokens, as TiTok
    tokens = model.encode(images)
    with torch.no_grad():
        quality = torch.stack([psnr(model.decode(tokens, num_tokens=k), images) for k in range(1, 9)], dim=1)
    target = float(quality.median())  # an untrained decoder: quality is not monotone in k
    stats = {}
    result = shortest_prefix(model, images, target, stats=stats)
    assert torch.equal(result.lengths, model.encode(images, target_psnr=target).lengths)
    assert stats["decoder_calls"] == stats["rounds"] <= 3  # one masked decoder call per round, log2(8)
    # Whatever the curve, binary search ends on a boundary: k reaches the target (or k = N) and k - 1
    # misses it (or k = 1); with quality monotone in k that is the shortest prefix (the stub tests above).
    for row, k in enumerate(result.lengths.tolist()):
        assert k == 8 or quality[row, k - 1] >= target - 1e-3
        assert k == 1 or quality[row, k - 2] < target + 1e-3
    assert (model.encode(images, target_psnr=-1.0).lengths == 1).all()
    assert (model.encode(images, target_psnr=1000.0).lengths == 8).all()
