import pytest
import torch

from tokenizers_vis import TiTok, Tokens, from_pretrained
from tokenizers_vis.titok import TITOK_SIZES

TINY = dict(image_size=16, patch_size=4, codebook_size=32, code_dim=8)


@pytest.mark.parametrize("size", sorted(TITOK_SIZES))
def test_presets_shapes_and_gradients(size):
    # Each preset's depth and head count, at a tiny width so the test runs on a CPU.
    model = TiTok(size=size, width=32, heads=4 if size != "tiny" else None, num_tokens=8, **TINY)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    reconstructions, losses, stats = model(images)
    assert reconstructions.shape == images.shape
    assert stats["codes"].shape == (3, 8)
    assert model.encoder.trunk.blocks.__len__() == TITOK_SIZES[size]["depth"]
    (reconstructions.pow(2).mean() + sum(losses.values())).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"


def test_from_preset_parses_size_and_tokens():
    model = TiTok.from_preset("L-32", width=32, heads=4, depth=1, **TINY)
    assert model.config["size"] == "L" and model.token_spec.num_tokens == 32
    assert TiTok.from_preset("S-128", width=32, depth=1, **TINY).encoder.trunk.blocks[0].attn.num_heads == 8


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_encode_decode_round_trip_matches_forward(batch):
    torch.manual_seed(0)
    model = TiTok(size="tiny", width=32, depth=1, heads=2, num_tokens=6, **TINY).eval()
    images = torch.rand(batch, 3, 16, 16) * 2 - 1
    tokens = model.encode(images)
    assert isinstance(tokens, Tokens) and tokens.kind == "categorical"
    assert tokens.data.shape == (batch, 6) and tokens.data.dtype == torch.long
    assert int(tokens.data.max()) < 32
    with torch.no_grad():
        reconstructions, _, stats = model(images)
        decoded = model.decode(tokens)
    assert torch.equal(stats["codes"], tokens.data)
    assert torch.allclose(decoded, reconstructions, atol=1e-5)
    assert model.decode(tokens, num_tokens=3).shape == images.shape  # any prefix decodes


def test_batch_elements_are_independent():
    torch.manual_seed(0)
    model = TiTok(size="tiny", width=32, depth=1, heads=2, num_tokens=4, **TINY).eval()
    images = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        together = model.decode(model.encode(images))
        alone = model.decode(model.encode(images[2:3]))
    assert torch.allclose(together[2:3], alone, atol=1e-5)


def test_latent_tokens_carry_the_image():
    # The decoder's only view of the image is the token sequence: changing a code changes the output.
    model = TiTok(size="tiny", width=32, depth=1, heads=2, num_tokens=4, **TINY).eval()
    tokens = model.encode(torch.rand(1, 3, 16, 16))
    other = Tokens("categorical", (tokens.data + 1) % 32)
    with torch.no_grad():
        assert not torch.allclose(model.decode(tokens), model.decode(other))


def test_save_and_from_pretrained_reproduce_outputs(tmp_path):
    model = TiTok(size="tiny", width=32, depth=1, heads=2, num_tokens=4, **TINY).eval()
    model.save_pretrained(tmp_path / "export")
    loaded = from_pretrained(tmp_path / "export")
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.reconstruct(images), loaded.reconstruct(images))
    assert loaded.token_spec == model.token_spec


def test_from_pretrained_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    model = TiTok(size="tiny", width=32, depth=1, heads=2, num_tokens=4, **TINY)
    folder = model.save_pretrained(tmp_path / "export")
    state = load_file(str(folder / "model.safetensors"))
    state.pop("decoder.conv_out.bias")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(RuntimeError, match="conv_out.bias"):
        from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "nowhere")
