"""RobustTok / RobusTok: latent perturbation (tokenizers_vis/perturb.py), pFID (scripts/evaluate.py mode=pfid)
and decoder post-training (training/posttrain_module.py), on tiny models."""

import json

import pytest
import torch
from conftest import TINY_SIZES, TINY_TRAINER

import train
from generators.gpt import GPT
from tokenizers_vis import FlexTok, OneDPiece, TiTok, from_pretrained
from tokenizers_vis.perturb import LatentPerturbation, schedule_factor
from tokenizers_vis.quantizers import nearest_codes
from training.config import ConfigError, compose_config
from training.evaluation import run as evaluate_run
from training.feature_net import ensure_feature_net
from training.posttrain_module import DecoderPosttrainModule, teacher_forced_mix

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TITOK = dict(image_size=16, patch_size=4, size="tiny", width=32, depth=1, heads=2, num_tokens=8)
TINY_GPT = dict(vocab_size=64, num_tokens=8, num_classes=17, size="tiny", width=32, depth=1, heads=2)
TINY_DATA = [o for o in TINY_SIZES if not o.startswith("tokenizer.")]


def tiny_titok(seed: int = 0, **overrides) -> TiTok:
    torch.manual_seed(seed)
    return TiTok(**{**TINY_TITOK, "codebook_size": 64, "code_dim": 8, **overrides})


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny exported TiTok (16 px, 8 tokens, 64 codes) and a tiny GPT on its codes (17 photo classes)."""
    root = tmp_path_factory.mktemp("exports")
    # Quick dead-code restarts: in train mode its quantiser would move codes within a few steps.
    tiny_titok(dead_code_threshold=0.5, usage_decay=0.5).save_pretrained(root / "tokenizer")
    torch.manual_seed(1)
    GPT(**TINY_GPT).save_pretrained(root / "generator")
    return root


# ---- latent perturbation -----------------------------------------------------------------------------------
def test_replacement_rate_matches_alpha_beta_delta():
    vectors = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    codes = torch.randint(0, 64, (20000, 64), generator=torch.Generator().manual_seed(1))
    perturbation = LatentPerturbation(alpha=0.3, beta=0.5, delta=10)
    result = perturbation.perturb_codes(codes, vectors, generator=torch.Generator().manual_seed(2))
    expected = 0.3 * 0.5 * 9 / 10
    assert result.replaced.float().mean().item() == pytest.approx(expected, rel=0.02)
    assert torch.equal(result.replaced, result.codes != codes)
    per_image = result.replaced.any(1).float().mean().item()
    assert per_image == pytest.approx(0.5, abs=0.02)  # only a share beta of the images is touched


def test_replaced_codes_are_among_the_delta_nearest():
    vectors = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    codes = torch.randint(0, 50, (400, 16), generator=torch.Generator().manual_seed(1))
    result = LatentPerturbation(alpha=1.0, beta=1.0, delta=5).perturb_codes(codes, vectors)
    distances = torch.cdist(vectors, vectors)  # (V, V)
    nearest = distances.argsort(dim=1)[:, :5]  # itself first: distinct random vectors
    assert result.replaced.float().mean() > 0.7  # (delta - 1) / delta = 0.8 of the tokens move
    for old, new in zip(codes[result.replaced].tolist(), result.codes[result.replaced].tolist(), strict=True):
        assert new in nearest[old].tolist()
    assert torch.equal(nearest_codes(vectors, 5, torch.arange(50), dtype=torch.float32), nearest)
    capped = LatentPerturbation(alpha=1.0, beta=1.0, delta=1000).perturb_codes(codes, vectors)
    assert int(capped.codes.max()) < 50  # delta beyond the codebook means "any code"


def test_schedule_full_then_linear_decay_to_half_then_constant():
    perturbation = LatentPerturbation(alpha=0.4, beta=0.1, delta=100)
    expected = {0.0: (0.4, 100), 0.2: (0.4, 100), 0.4: (0.3, 75), 0.6: (0.2, 50), 1.0: (0.2, 50)}
    for progress, (alpha, delta) in expected.items():
        got_alpha, got_delta = perturbation.strength(progress)
        assert got_alpha == pytest.approx(alpha) and got_delta == delta, progress
    assert schedule_factor(0.9, "constant") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        LatentPerturbation(0.1, schedule="cosine")


@pytest.mark.parametrize("cls", [TiTok, OneDPiece])
def test_quantizer_losses_unchanged_and_encoder_still_gets_gradient(cls):
    perturbation = LatentPerturbation(alpha=1.0, beta=1.0, delta=8)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    torch.manual_seed(0)
    model = cls(**TINY_TITOK, codebook_size=64, code_dim=8)
    outputs = {}
    for name, hook in (("off", None), ("on", perturbation.hook(model.code_vectors, record=(record := {})))):
        model.zero_grad()
        torch.manual_seed(1)
        reconstructions, losses, stats = model(images, perturb=hook)
        (reconstructions.pow(2).mean() + sum(losses.values())).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outputs[name] = (reconstructions.detach(), losses, stats, grads)
    (rec_off, losses_off, stats_off, _), (rec_on, losses_on, stats_on, grads) = outputs["off"], outputs["on"]
    assert record["perturbed"].replaced.any() and torch.equal(record["codes"], stats_on["codes"])
    assert torch.equal(stats_off["codes"], stats_on["codes"])  # stats report the encoder's own codes
    for key in losses_off:  # the quantiser ran before the perturbation
        assert torch.equal(losses_off[key], losses_on[key]), key
    assert not torch.allclose(rec_off, rec_on)  # the decoder saw other codes
    encoder_grads = [g for n, g in grads.items() if n.startswith("encoder.")]
    assert encoder_grads and all(g.abs().sum() > 0 for g in encoder_grads[-2:])  # straight-through


def test_perturbed_latents_are_the_new_code_vectors():
    model = tiny_titok()
    perturbation = LatentPerturbation(alpha=0.5, beta=1.0, delta=4)
    z = torch.randn(3, 8, 8, requires_grad=True)
    quantized = model.quantizer(z)
    latents, result = perturbation(quantized.quantized, quantized.codes, model.code_vectors())
    assert torch.allclose(latents, model.quantizer.lookup(result.codes), atol=1e-6)
    kept = ~result.replaced
    assert torch.equal(latents[kept], quantized.quantized[kept])  # untouched positions: bit-identical
    latents.sum().backward()
    assert torch.allclose(z.grad.abs().sum(-1) > 0, torch.ones(3, 8, dtype=torch.bool))


def test_flextok_takes_the_hook():
    torch.manual_seed(0)
    model = FlexTok(
        image_size=16, first_stage="pixels", patch_size=4, size="tiny", num_registers=4, levels=[3, 3]
    )
    record = {}
    hook = LatentPerturbation(alpha=1.0, beta=1.0, delta=9).hook(model.code_vectors, record=record)
    _, losses, stats = model(torch.rand(2, 3, 16, 16) * 2 - 1, perturb=hook)
    assert "flow" in losses and record["perturbed"].replaced.any()
    assert record["perturbed"].codes.shape == stats["codes"].shape


def test_training_with_perturbation_logs_the_measured_rate(tmp_path):
    overrides = ["+experiment=titok_perturb_quickstart", *TINY_SIZES, "tokenizer.num_tokens=8", *TINY_TRAINER]
    assert compose_config(overrides).module.perturb.delta == 100  # the quickstart's, pFID's neighbourhood
    overrides += ["module.perturb.alpha=0.5", "module.perturb.beta=1.0", "module.perturb.delta=25"]
    overrides += [f"paths.run_dir={tmp_path / 'run'}"]
    cfg = compose_config(overrides)
    assert cfg.module.perturb.delta == 25 and cfg.tokenizer.codebook_size == 64
    metrics = train.run(cfg)
    assert metrics["steps"] == 4
    log = next((tmp_path / "run" / "logs").glob("version_*/metrics.csv")).read_text()
    header = log.splitlines()[0].split(",")
    assert {"train/perturb_rate", "train/perturb_alpha", "train/perturb_delta"} <= set(header)
    column = header.index("train/perturb_rate")
    rates = [float(row.split(",")[column]) for row in log.splitlines()[1:] if row.split(",")[column]]
    assert rates and 0.2 < sum(rates) / len(rates) < 0.8  # alpha 0.5 * (25 - 1) / 25 = 0.48
    with pytest.raises(ConfigError, match="module.perturb"):
        train.run(
            compose_config([*overrides[:-1], f"paths.run_dir={tmp_path / 'bad'}", "+module.perturb.x=1"])
        )


# ---- pFID ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluate(exports):
    ensure_feature_net(16, exports / "nets", steps=30, pool_size=256, val_per_class=2, progress=False)

    def run(*overrides):
        settings = [
            f"feature_net.root={exports / 'nets'}",
            "feature_net.resolution=16",
            "data.val_per_class=1",
        ]
        settings += [f"cache_root={exports / 'cache'}", f"tokenizer_path={exports / 'tokenizer'}"]
        settings += ["reference_data=config"]  # exports written by save_pretrained, without data.json
        settings += ["force=true"]  # tiny sets, on purpose
        return evaluate_run(compose_config([*settings, *overrides], "evaluate"))

    return run


def test_pfid_runs_and_stores_its_settings(evaluate, exports):
    result = evaluate("mode=pfid", "pfid_alpha=0.5", "pfid_delta=8")
    assert result["mode"] == "pfid" and result["pfid_alpha"] == 0.5 and result["pfid_delta"] == 8
    assert result["pfid[photos-net]"] > 0 and "fid[photos-net]" not in result
    assert 0.3 < result["pfid_replaced"] < 0.6  # 0.5 * 7 / 8
    assert json.loads((exports / "tokenizer-pfid.json").read_text()) == result
    again = evaluate("mode=pfid", "pfid_alpha=0.5", "pfid_delta=8")
    assert again["pfid[photos-net]"] == result["pfid[photos-net]"]  # deterministic under the seed


def test_pfid_with_alpha_zero_is_rfid(evaluate):
    rfid = evaluate("mode=rfid")
    pfid = evaluate("mode=pfid", "pfid_alpha=0")
    assert pfid["pfid_replaced"] == 0 and pfid["psnr"] == rfid["psnr"]
    assert pfid["pfid[photos-net]"] == pytest.approx(rfid["fid[photos-net]"], abs=1e-9)


# ---- decoder post-training ---------------------------------------------------------------------------
def test_teacher_forced_mix_keeps_about_seventy_percent():
    torch.manual_seed(0)
    generator = GPT(**TINY_GPT).eval()
    codes = torch.randint(0, 64, (512, 8))
    labels = torch.randint(0, 17, (512,))
    mixed, kept = teacher_forced_mix(generator, codes, labels, 0.7, rng=torch.Generator().manual_seed(0))
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.02)
    assert torch.equal(mixed[kept], codes[kept])
    agreement = (mixed == codes).float().mean().item()
    assert 0.7 <= agreement < 0.75  # a random 64-way generator rarely samples the true code
    assert torch.equal(teacher_forced_mix(generator, codes, labels, 1.0)[0], codes)


def posttrain_overrides(exports, run_dir, *extra):
    return [
        "+experiment=titok_posttrain_quickstart",
        *TINY_DATA,
        *TINY_TRAINER,
        f"module.tokenizer_path={exports / 'tokenizer'}",
        f"module.generator_path={exports / 'generator'}",
        f"paths.run_dir={run_dir}",
        *extra,
    ]


def test_posttraining_changes_the_decoder_only_and_exports_a_full_tokenizer(exports, tmp_path):
    metrics = train.run(compose_config(posttrain_overrides(exports, tmp_path / "run")))
    assert metrics["steps"] == 4 and "psnr" in metrics
    before, after = from_pretrained(exports / "tokenizer"), from_pretrained(tmp_path / "run" / "export")
    assert type(after) is TiTok and after.config == before.config
    state_before, state_after = before.state_dict(), after.state_dict()
    frozen = [k for k in state_before if not k.startswith("decoder.")]
    assert frozen and all(torch.equal(state_before[k], state_after[k]) for k in frozen)
    assert any(
        not torch.equal(state_before[k], state_after[k]) for k in state_before if k.startswith("decoder.")
    )
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("generator" in k for k in checkpoint["state_dict"])  # the frozen GPT is not saved
    log = next((tmp_path / "run" / "logs").glob("version_*/metrics.csv")).read_text()
    assert "train/kept_true" in log and "train/token_agreement" in log


def test_missing_exports_name_the_setting(exports, tmp_path):
    loss = object()  # never reached
    with pytest.raises(FileNotFoundError, match="module.tokenizer_path='.*absent' does not exist"):
        DecoderPosttrainModule(str(tmp_path / "absent"), str(exports / "generator"), loss)
    with pytest.raises(FileNotFoundError, match="module.generator_path=None is not set"):
        DecoderPosttrainModule(str(exports / "tokenizer"), None, loss)
    overrides = posttrain_overrides(exports, tmp_path / "run", f"module.generator_path={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match="module.generator_path"):
        train.run(compose_config(overrides))
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_generator_of_another_tokenizer_is_refused(exports, tmp_path):
    torch.manual_seed(0)
    GPT(**{**TINY_GPT, "vocab_size": 32}).save_pretrained(tmp_path / "gpt32")
    with pytest.raises(ValueError, match="vocab_size=32"):
        DecoderPosttrainModule(str(exports / "tokenizer"), str(tmp_path / "gpt32"), object())
