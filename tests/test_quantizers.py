import torch
import torch.nn.functional as F

from tokenizers_vis.quantizers import VectorQuantizer, code_histogram_stats


def test_nearest_code_assignment_and_lookup():
    vq = VectorQuantizer(codebook_size=8, code_dim=4, l2_normalize=False)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.randn(8, 4))
    picks = torch.tensor([3, 0, 7, 3, 5])
    z = vq.codebook.weight[picks] + 0.01 * torch.randn(5, 4)  # small noise: the nearest code is the source
    out = vq(z)
    assert torch.equal(out.codes, picks)
    assert torch.allclose(out.quantized, vq.codebook.weight[picks], atol=1e-6)
    assert torch.allclose(vq.lookup(picks), vq.codebook.weight[picks])


def test_l2_normalised_lookup_uses_cosine_similarity():
    vq = VectorQuantizer(codebook_size=16, code_dim=8, l2_normalize=True)
    z = torch.randn(2, 10, 8) * 50  # scale must not matter
    out = vq(z)
    cosine = F.normalize(z, dim=-1) @ F.normalize(vq.codebook.weight, dim=-1).t()
    assert torch.equal(out.codes, cosine.argmax(-1))
    assert torch.allclose(out.quantized.norm(dim=-1), torch.ones(2, 10), atol=1e-5)
    assert out.codes.shape == (2, 10)


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(6, 4)
    vq = VectorQuantizer(codebook_size=32, code_dim=4, l2_normalize=False)
    out = vq(encoder(torch.randn(16, 6)))
    (out.quantized.sum() + sum(out.losses.values())).backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    assert vq.codebook.weight.grad.abs().sum() > 0  # the codebook loss trains the codes


def test_losses_match_their_definitions():
    vq = VectorQuantizer(codebook_size=4, code_dim=2, l2_normalize=False, commitment_weight=0.25)
    z = torch.randn(5, 2)
    out = vq(z)
    q = vq.codebook.weight[out.codes]
    assert torch.allclose(out.losses["commitment"], 0.25 * (z - q).pow(2).mean())
    assert torch.allclose(out.losses["codebook"], (z - q).pow(2).mean())


def test_usage_and_perplexity():
    stats = code_histogram_stats(torch.tensor([0, 1, 2, 3]), codebook_size=8)
    assert stats["usage"] == 0.5
    assert torch.isclose(stats["perplexity"], torch.tensor(4.0))
    collapsed = code_histogram_stats(torch.zeros(100, dtype=torch.long), codebook_size=8)
    assert collapsed["usage"] == 1 / 8 and torch.isclose(collapsed["perplexity"], torch.tensor(1.0))


def test_dead_codes_are_restarted_onto_encoder_outputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(
        codebook_size=64, code_dim=4, l2_normalize=False, dead_code_threshold=0.5, usage_decay=0.5
    )
    with torch.no_grad():  # all codes far away except code 0: every input picks code 0
        vq.codebook.weight.fill_(100.0)
        vq.codebook.weight[0] = 0.0
    z = torch.randn(256, 4)
    before = vq(z).stats["usage"]
    for _ in range(5):
        vq(z)
    vq.eval()
    after = vq(z)
    assert before == 1 / 64
    assert after.stats["usage"] > 0.5  # restarted codes now sit on the data and get picked
    assert (vq.codebook.weight.abs() < 10).all()


def test_no_restart_in_eval_or_when_disabled():
    vq = VectorQuantizer(codebook_size=16, code_dim=4, dead_code_threshold=0.0)
    weight = vq.codebook.weight.detach().clone()
    vq(torch.randn(8, 4))
    assert torch.equal(weight, vq.codebook.weight)
