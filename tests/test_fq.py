import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file

from generators import GPT
from generators.factorized_head import FactorizedEmbedding, FactorizedHead
from generators.heads import DEFAULT_HEADS
from sampling.ar import sample_ar
from tokenizers_vis import Tokens, from_pretrained
from tokenizers_vis.fq import FactorizedQuantizer, FQTiTok, disentanglement_loss, info_nce
from training.config import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")  # shared CPUs: one thread is much faster

N, G, V = 6, 2, 32
TINY = dict(
    image_size=16,
    patch_size=4,
    size="tiny",
    width=32,
    depth=1,
    heads=2,
    num_tokens=N,
    num_codebooks=G,
    codebook_size=V,
    code_dim=4,
    align_hidden=16,
)


@pytest.fixture(scope="module")
def photos_net(tmp_path_factory):
    """A tiny random photos-net folder (config.json + model.safetensors), as paths.fq_teacher expects."""
    from training.feature_net import PhotosNet

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher") / "photos-net"
    PhotosNet([f"photo{i}" for i in range(5)], resolution=16, widths=(4, 8)).save_pretrained(folder)
    return folder


def tiny(teacher="none", teacher_weights=None, **kwargs) -> FQTiTok:
    torch.manual_seed(0)
    return FQTiTok(teacher=teacher, teacher_weights=teacher_weights, **{**TINY, **kwargs})


def images(batch=4, seed=1):
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- tokenizer ---------------------------------------------------------------------------------------------
def test_disentanglement_loss_is_zero_for_orthogonal_and_weight_for_identical_sub_codes():
    e = torch.eye(4)
    orthogonal = torch.stack([e[0], e[1], e[2]]).expand(5, 7, 3, 4)  # (B, N, G, d)
    assert disentanglement_loss(orthogonal, 0.1).item() == pytest.approx(0.0, abs=1e-7)
    same = torch.randn(5, 7, 1, 4).expand(5, 7, 3, 4)
    assert disentanglement_loss(same, 0.1).item() == pytest.approx(0.1, abs=1e-6)
    assert disentanglement_loss(-same[..., :2, :] * torch.tensor([1.0, -1.0])[:, None], 0.1).item() == (
        pytest.approx(0.1, abs=1e-6)
    )
    assert disentanglement_loss(same[..., :1, :], 0.1).item() == 0.0  # one sub-codebook: no pairs
    quantizer = FactorizedQuantizer(8, num_codebooks=3, codebook_size=16, code_dim=4, disentangle_weight=0.1)
    losses = quantizer(torch.randn(2, 5, 8)).losses
    assert set(losses) == {"commitment", "codebook", "disentangle"} and 0 <= losses["disentangle"] <= 0.1


def test_info_nce_prefers_matching_pairs():
    target = torch.randn(6, 10)
    assert info_nce(target * 3, target, 0.1) < info_nce(target.roll(1, 0), target, 0.1)


def test_encode_decode_round_trip_equals_the_quantised_path():
    model = tiny().eval()
    x = images()
    tokens = model.encode(x)
    assert tokens.kind == "factorized" and tokens.data.shape == (4, N, G) and tokens.data.dtype == torch.long
    assert int(tokens.data.min()) >= 0 and int(tokens.data.max()) < V
    with torch.no_grad():
        reconstructions, _, stats = model(x)
        quantized = model.quantizer(model.encoder(x))
        assert torch.equal(stats["codes"], tokens.data)
        assert torch.allclose(model.quantizer.lookup(tokens.data), quantized.quantized, atol=1e-6)
        assert torch.allclose(model.decode(tokens), reconstructions, atol=1e-5)
        prefix = model.decode(tokens, num_tokens=2)
    assert prefix.shape == x.shape and not torch.allclose(prefix, reconstructions)
    spec = model.token_spec
    assert (spec.kind, spec.num_tokens, spec.vocab_size, spec.token_dim) == ("factorized", N, V, G)
    assert spec.code_dim == 4


def test_codebook_stats_are_per_sub_codebook_and_code_vectors_explains_itself():
    model = tiny()
    codes = torch.stack([torch.tensor([0, 1, 0, 1]), torch.tensor([5, 5, 5, 5])], dim=-1)  # (4, G)
    stats = model.codebook_stats(codes.flatten())  # flattened, as the training module gathers them
    assert stats["usage"].item() == pytest.approx((2 / V + 1 / V) / 2)
    assert stats["perplexity"].item() == pytest.approx((2 + 1) / 2)
    with pytest.raises(NotImplementedError, match="sub_code_vectors"):
        model.code_vectors()
    vectors = model.sub_code_vectors()
    assert vectors.shape == (G, V, 4)
    expected = torch.cat([vectors[0, 3], vectors[1, 7]])
    assert torch.allclose(model.quantizer.lookup(torch.tensor([[3, 7]])), expected)


def test_alignment_loss_reaches_the_encoder_and_the_teacher_stays_outside(photos_net):
    model = tiny("photos-net", photos_net).train()
    teacher = model._teacher.module
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert not any("teacher" in k or k.startswith("net.") for k in model.state_dict())
    assert all(p is not q for p in model.parameters() for q in teacher.parameters())
    _, losses, _ = model(images(8))
    assert set(losses) == {"commitment", "codebook", "disentangle", "align"}
    losses["align"].backward()
    for name in ("encoder.patch_embed.weight", "encoder.latent_tokens", "encoder.to_code.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    semantic, other = model.quantizer.adapters
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in semantic.parameters())
    assert all(p.grad is None or not p.grad.any() for p in other.parameters())  # only the first is aligned
    assert all(p.grad is None for p in teacher.parameters())
    model.eval()
    assert "align" not in model(images(8))[1]  # validation skips the teacher


def test_timm_teacher_loads_a_local_file_or_folder_strictly(tmp_path):
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("test_vit", pretrained=False)  # with its classifier, as released files are
    file = tmp_path / "test_vit.safetensors"
    save_file(reference.state_dict(), str(file))
    (tmp_path / "repo").mkdir()
    save_file(reference.state_dict(), str(tmp_path / "repo" / "model.safetensors"))
    for weights in (file, tmp_path / "repo"):
        model = tiny("timm", weights, teacher_model="test_vit", teacher_image_size=32).train()
        loaded = model._teacher.module.model
        assert torch.equal(loaded.pos_embed, reference.pos_embed)
        assert model.align_head.out[-1].out_features == reference.num_features
        assert torch.isfinite(model(images(3))[1]["align"])
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": torch.zeros(2)}, str(wrong))
    with pytest.raises(ValueError, match="paths.fq_teacher"):
        tiny("timm", wrong, teacher_model="test_vit")


def test_missing_teacher_weights_name_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"paths\.fq_teacher.*does not exist.*train_feature_net\.py"):
        tiny("photos-net", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"paths\.fq_teacher=None is not set"):
        tiny("timm", None)
    cfg = compose_config(["+experiment=fq_quickstart", f"paths.fq_teacher={tmp_path / 'missing'}"])
    with pytest.raises(Exception, match=r"paths\.fq_teacher.*train_feature_net\.py"):
        instantiate(cfg.tokenizer)


def test_export_round_trip_drops_the_teacher(tmp_path, photos_net):
    model = tiny("photos-net", photos_net).eval()
    folder = model.save_pretrained(tmp_path / "export")
    assert model.align_head is not None and model.config["teacher"] == "photos-net"  # restored after saving
    loaded = from_pretrained(folder)
    assert loaded.config["teacher"] == "none" and loaded.align_head is None
    assert not any(k.startswith("align_head") for k in loaded.state_dict())
    x = images()
    tokens = model.encode(x)
    assert torch.equal(loaded.encode(x).data, tokens.data)
    with torch.no_grad():
        assert torch.allclose(loaded.decode(tokens), model.decode(tokens), atol=1e-6)


def test_tiny_tokenizer_overfits(photos_net):
    model = tiny("photos-net", photos_net).train()
    x = images(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    mse, align = [], []
    for _ in range(30):
        reconstructions, losses, _ = model(x)
        pixel = (reconstructions - x).pow(2).mean()
        optimizer.zero_grad()
        (pixel + sum(losses.values())).backward()
        optimizer.step()
        mse.append(pixel.item())
        align.append(losses["align"].item())
    assert mse[-1] < 0.8 * mse[0] and align[-1] < align[0]


# ---- FAR head ----------------------------------------------------------------------------------------------
def tiny_head(num_codebooks=3, vocab=11, width=16) -> FactorizedHead:
    torch.manual_seed(0)
    head = FactorizedHead(width, vocab, num_codebooks, depth=2)
    for module in head.modules():  # GPT's init; the default Linear init would give near-uniform logits
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=0.5)
    return head


def test_factorized_is_the_default_head_and_embeds_by_summing():
    assert DEFAULT_HEADS["factorized"] == "factorized"
    embedding = FactorizedEmbedding(7, 8, 3, depth=2)  # head options are accepted and ignored
    tokens = torch.randint(7, (2, 5, 3))
    expected = sum(embedding.tables[g](tokens[..., g]) for g in range(3))
    assert torch.equal(embedding(tokens), expected)
    with pytest.raises(ValueError, match="token_dim"):
        FactorizedHead(8, 7, None)


def test_teacher_forced_logits_equal_step_by_step_logits():
    head = tiny_head()
    hidden, targets = torch.randn(2, 5, 16), torch.randint(11, (2, 5, 3))
    logits = head.logits(hidden, targets)  # (B, T, G, V)
    assert logits.shape == (2, 5, 3, 11)
    for g in range(3):
        step = head.step_logits(hidden, head.prefix_context(targets[..., :g]), g)
        assert torch.allclose(step, logits[..., g, :], atol=1e-5), g
    changed = targets.clone()
    changed[..., 2] = (changed[..., 2] + 1) % 11  # the last sub-token conditions nothing
    assert torch.equal(head.logits(hidden, changed), logits)
    changed[..., 0] = (changed[..., 0] + 1) % 11  # the first conditions the later steps only
    other = head.logits(hidden, changed)
    assert torch.equal(other[..., 0, :], logits[..., 0, :])
    assert not torch.allclose(other[..., 1, :], logits[..., 1, :])


def test_guided_sampling_conditions_both_streams_on_the_drawn_sub_tokens():
    head = tiny_head()
    cond, uncond, scale = torch.randn(4, 16), torch.randn(4, 16), 2.5
    drawn = head.sample(cond, uncond, scale, top_k=1)  # greedy: the argmax of the guided logits
    expected, context = [], torch.zeros(4, 16)
    for g in range(3):
        lc, lu = head.step_logits(cond, context, g), head.step_logits(uncond, context, g)
        expected.append((lu + scale * (lc - lu)).argmax(-1))
        context = context + (head.prefix[g](expected[-1]) if g < 2 else 0)
    assert torch.equal(drawn, torch.stack(expected, -1))


def test_guidance_scale_one_equals_unguided_sampling():
    head = tiny_head()
    cond, uncond = torch.randn(64, 16), torch.randn(64, 16)
    unguided = head.sample(cond, None, generator=torch.Generator().manual_seed(3))
    scale_one = head.sample(cond, uncond, 1.0, generator=torch.Generator().manual_seed(3))
    guided = head.sample(cond, uncond, 4.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(unguided, scale_one) and not torch.equal(unguided, guided)


def test_head_loss_backward_reaches_every_parameter():
    head = tiny_head()
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    loss = head.loss(hidden, torch.randint(11, (2, 5, 3)))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and hidden.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(V, N, 3, size="tiny", width=32, depth=1, heads=2, token_kind="factorized", token_dim=G)


def test_gpt_samples_factorized_tokens_and_round_trips(tmp_path):
    model = tiny_gpt().eval()
    labels = torch.tensor([0, 1, 2, 1])
    result = sample_ar(model, labels, cfg_scale=2.0, top_k=8, generator=torch.Generator().manual_seed(0))
    assert result.tokens.shape == (4, N, G) and result.tokens.dtype == torch.long
    assert int(result.tokens.min()) >= 0 and int(result.tokens.max()) < V
    uncached = sample_ar(
        model, labels, cfg_scale=2.0, top_k=8, generator=torch.Generator().manual_seed(0), use_cache=False
    )
    assert torch.equal(uncached.tokens, result.tokens)
    loaded = from_pretrained(model.save_pretrained(tmp_path / "gpt"))
    assert isinstance(loaded.head, FactorizedHead) and loaded.head.token_shape == (G,)
    tokens = result.tokens
    assert torch.equal(loaded(tokens, labels), model(tokens, labels))
    tokenizer = tiny().eval()
    with torch.no_grad():
        assert tokenizer.decode(Tokens("factorized", tokens)).shape == (4, 3, 16, 16)


def test_tiny_gpt_overfits():
    model = tiny_gpt().train()
    tokens = torch.randint(V, (4, N, G), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4) % 3
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        loss = model.loss(tokens, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.7 * history[0]
