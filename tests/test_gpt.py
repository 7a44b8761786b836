import pytest
import torch
from torch import nn

from generators import GPT, GPT_SIZES, CategoricalHead, make_embedding, make_head
from generators.gpt import Rotary
from tokenizers_vis.base import from_pretrained

V, N, C = 32, 16, 5
GRIDS = {"1d": None, "2d": (4, 4)}


def tiny_gpt(grid=None, depth=2, num_tokens=N, **kwargs) -> GPT:
    """A tiny GPT with weights large enough that attention is far from uniform (position effects show)."""
    torch.manual_seed(0)
    model = GPT(V, num_tokens, C, grid=grid, size="tiny", width=32, depth=depth, heads=2, **kwargs)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.3)
    return model.eval()


def batch(rows=3, length=N):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (rows, length), generator=g), torch.tensor([0, 3, C][:rows])


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
@torch.no_grad()
def test_cached_one_token_decoding_matches_full_forward(grid):
    model = tiny_gpt(grid)
    tokens, labels = batch()  # includes the null class
    full = model(tokens, labels)  # (B, N, D)
    model.setup_cache(3)
    steps = [model.prefill(labels)] + [model.decode(tokens[:, i : i + 1]) for i in range(N - 1)]
    cached = torch.cat(steps, dim=1)
    assert model.cache_length == N
    assert torch.allclose(cached, full, atol=1e-5)
    assert torch.allclose(model.logits(cached), model.logits(full), atol=1e-5)


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
@torch.no_grad()
def test_multi_token_decode_matches_full_forward(grid):
    model = tiny_gpt(grid)
    tokens, labels = batch()
    full = model.forward_prefix(tokens, labels)  # (B, 1 + N, D): every position, the last token included
    model.setup_cache(3)
    first = model.prefill(labels)
    window = model.decode(tokens[:, :5])  # positions 1..5
    rest = model.decode(tokens[:, 5:])  # positions 6..N
    assert torch.allclose(torch.cat([first, window, rest], 1), full, atol=1e-5)


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
@torch.no_grad()
def test_truncate_then_decode_equals_fresh_decoding(grid):
    model = tiny_gpt(grid)
    tokens, labels = batch()
    other = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(2))
    model.setup_cache(3)
    model.prefill(labels)
    model.decode(tokens[:, :10])  # drafts, then 7 of them are "rejected"
    model.truncate_cache(4)
    assert model.cache_length == 4
    rolled_back = model.decode(other)  # (B, 6, D) at positions 4..9

    model.setup_cache(3)
    model.prefill(labels)
    model.decode(tokens[:, :3])
    fresh = model.decode(other)
    reference = model.forward_prefix(torch.cat([tokens[:, :3], other], 1), labels)[:, 4:]
    assert torch.allclose(rolled_back, fresh, atol=1e-6)
    assert torch.allclose(rolled_back, reference, atol=1e-5)
    with pytest.raises(ValueError):
        model.truncate_cache(model.cache_length + 1)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
@torch.no_grad()
def test_ragged_rows_match_each_row_decoded_alone(grid, static):
    """Rows at different cache lengths, each fed its own window, give the outputs of that row alone."""
    model = tiny_gpt(grid)
    tokens, labels = batch()  # labels include the null class (guidance's second half)
    full = model.forward_prefix(tokens, labels)  # (B, 1 + N, D): position p predicts token p
    model.setup_cache(3, max_len=N + 4, static=static)  # room for windows past the last token
    model.prefill(labels)
    model.decode(tokens[:, :6])
    lengths = torch.tensor([4, 1, 6])  # rows roll back to different lengths (rejected drafts)
    model.truncate_cache(lengths)
    for width in (3, 1, 5):
        window = torch.stack([tokens[r, lengths[r] - 1 : lengths[r] - 1 + width] for r in range(3)])
        hidden = model.decode(window)  # row r at its positions lengths[r] .. lengths[r] + width - 1
        for r in range(3):
            expected = full[r, lengths[r] : lengths[r] + width]
            assert torch.allclose(hidden[r], expected, atol=1e-5), (width, r)
        assert torch.equal(model.cache.lengths, lengths + width)
        lengths = lengths + torch.tensor([width - 1, width, 0])  # commit some of the window per row
        model.truncate_cache(lengths)
    # past the end: positions beyond the last token are padding (outputs ignored) and never fail
    model.prefill(labels)
    model.decode(tokens[:, : N - 1])
    model.truncate_cache(torch.tensor([N - 1, N, N]))
    window = torch.cat([tokens[:, N - 2 : N - 1], tokens[:, :3]], 1)  # the last token, then padding
    window[1:, 0] = tokens[1:, N - 1]
    hidden = model.decode(window)  # rows 1, 2 write up to position N + 3, past the table's N
    assert torch.allclose(hidden[0, 0], full[0, N - 1], atol=1e-5)
    assert torch.allclose(hidden[1:, 0], full[1:, N], atol=1e-5)


@torch.no_grad()
def test_selected_rows_keep_their_cache():
    model = tiny_gpt()
    tokens, labels = batch()
    full = model.forward_prefix(tokens, labels)
    model.setup_cache(3)
    model.prefill(labels)
    model.decode(tokens[:, :4])
    model.truncate_cache(torch.tensor([5, 2, 3]))
    model.select_cache_rows(torch.tensor([2, 0]))  # row 1 finished; the others keep their order
    assert model.cache.batch_size == 2 and model.cache.lengths.tolist() == [3, 5]
    hidden = model.decode(torch.stack([tokens[2, 2:4], tokens[0, 4:6]]))
    assert torch.allclose(hidden[0], full[2, 3:5], atol=1e-5)
    assert torch.allclose(hidden[1], full[0, 5:7], atol=1e-5)


@torch.no_grad()
def test_cache_misuse_is_an_error():
    model = tiny_gpt()
    tokens, labels = batch()
    with pytest.raises(RuntimeError):
        model.prefill(labels)
    model.setup_cache(3, max_len=4)
    with pytest.raises(RuntimeError):
        model.decode(tokens[:, :1])  # before prefill
    model.prefill(labels)
    with pytest.raises(ValueError):
        model.decode(tokens[:, :4])  # 1 + 4 > max_len
    with pytest.raises(ValueError):
        model.decode(tokens[:2, :1])  # wrong batch size
    model.clear_cache()
    assert model.cache_length == 0


def test_label_dropout_rate_and_eval():
    model = tiny_gpt().train()
    labels = torch.arange(200_000) % C
    dropped = model.drop_labels(labels, generator=torch.Generator().manual_seed(0))
    is_null = dropped == model.null_class
    assert abs(is_null.float().mean().item() - 0.1) < 0.005
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert torch.equal(model.eval().drop_labels(labels), labels)

    # forward applies it in training mode only
    tokens, labels = batch(2)
    always = tiny_gpt(label_dropout=1.0)
    null = torch.full_like(labels, C)
    with torch.no_grad():
        assert torch.equal(always.train()(tokens, labels), always(tokens, null))
        assert not torch.allclose(always.eval()(tokens, labels), always(tokens, null))


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
@torch.no_grad()
def test_rope_makes_outputs_depend_on_position(grid):
    # One layer without positions would be blind to the order of earlier tokens at the last position.
    model = tiny_gpt(grid, depth=1)
    tokens, labels = batch(length=6)
    swapped = tokens[:, [1, 0, 2, 3, 4, 5]]
    assert not torch.allclose(model(tokens, labels)[:, -1], model(swapped, labels)[:, -1], atol=1e-3)


def _rotate(rope, x, position):
    """x (1, 1, 1, 1, Dh) (one row, step, vector, head) turned to `position`."""
    return Rotary.rotate(x, rope.tables(position, 1))


def _score(rope, q, k, p_q, p_k):
    return (_rotate(rope, q, p_q) * _rotate(rope, k, p_k)).sum().item()


def test_rope_1d_is_relative_and_class_position_is_unrotated():
    rope = tiny_gpt().rope
    q, k = torch.randn(2, 1, 1, 1, 1, 16).unbind(0)
    assert torch.equal(_rotate(rope, q, 0), q)
    assert _score(rope, q, k, 5, 2) == pytest.approx(_score(rope, q, k, 9, 6), abs=1e-5)
    assert _score(rope, q, k, 5, 2) != pytest.approx(_score(rope, q, k, 6, 2), abs=1e-3)


def test_rope_2d_distinguishes_rows_from_columns():
    rope = tiny_gpt(grid=(4, 4)).rope  # position p holds token p - 1 at (row, col) = divmod(p - 1, 4)
    q, k = torch.randn(2, 1, 1, 1, 1, 16).unbind(0)

    def pos(row, col):
        return 1 + 4 * row + col

    assert torch.equal(_rotate(rope, q, 0), q)
    one_row_down = _score(rope, q, k, pos(1, 1), pos(0, 1))
    one_col_right = _score(rope, q, k, pos(1, 1), pos(1, 0))
    assert one_row_down != pytest.approx(one_col_right, abs=1e-3)
    # 2D-relative: the same (row, col) offset elsewhere on the grid gives the same score
    assert one_row_down == pytest.approx(_score(rope, q, k, pos(3, 2), pos(2, 2)), abs=1e-5)
    assert one_col_right == pytest.approx(_score(rope, q, k, pos(2, 3), pos(2, 2)), abs=1e-5)
    # and it is not the 1D table: token 4 (row 1, col 0) is one row below token 0, not four steps away
    rope_1d = tiny_gpt().rope
    assert _score(rope, q, k, pos(1, 0), pos(0, 0)) != pytest.approx(
        _score(rope_1d, q, k, pos(1, 0), pos(0, 0)), abs=1e-3
    )


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_gradients_reach_every_parameter_and_shorter_sequences(grid):
    model = tiny_gpt(grid).train()
    tokens, labels = batch()
    loss = model.loss(tokens, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
    assert model(tokens[:, :5], labels).shape == (3, 5, 32)  # truncated prefixes train too
    assert model.loss(tokens[:, :5], labels).ndim == 0
    with pytest.raises(ValueError):
        model(torch.zeros(3, N + 1, dtype=torch.long), labels)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_gpt(grid=(4, 4))
    model.save_pretrained(tmp_path / "gpt")
    loaded = from_pretrained(tmp_path / "gpt")
    assert isinstance(loaded, GPT) and loaded.config == model.config and loaded.config["grid"] == [4, 4]
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    tokens, labels = batch()
    with torch.no_grad():
        assert torch.equal(model(tokens, labels), loaded(tokens, labels))


@pytest.mark.parametrize("size, millions", [("B", 111), ("L", 343), ("XL", 775), ("XXL", 1400)])
def test_preset_sizes_match_llamagen(size, millions):
    with torch.device("meta"):
        model = GPT(16384, 256, 1000, grid=(16, 16), size=size)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.02, f"GPT-{size}: {count:.1f}M parameters"
    assert len(model.blocks) == GPT_SIZES[size]["depth"]


def test_bad_configurations_are_errors():
    with pytest.raises(ValueError, match="grid"):
        GPT(V, N, C, grid=(3, 4), size="tiny")
    with pytest.raises(ValueError, match="size"):
        GPT(V, N, C, size="huge")
    with pytest.raises(ValueError, match="multiple of 4"):
        GPT(V, N, C, grid=(4, 4), size="tiny", width=12, heads=2)  # head dim 6


def test_heads_and_factories():
    head = make_head("categorical", 8, V)
    assert isinstance(head, CategoricalHead) and head(torch.randn(2, 3, 8)).shape == (2, 3, V)
    hidden, targets = torch.randn(2, 3, 8), torch.randint(0, V, (2, 3))
    expected = nn.functional.cross_entropy(head(hidden).reshape(6, V), targets.reshape(6))
    assert torch.allclose(head.loss(hidden, targets), expected)
    assert make_embedding("categorical", V, 8)(targets).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="no generator head yet"):
        make_head("continuous", 8, V)
    with pytest.raises(ValueError, match="models binary tokens, not categorical"):
        make_head("categorical", 8, V, head="bernoulli")
    with pytest.raises(ValueError, match="unknown"):
        make_embedding("pixels", V, 8)
