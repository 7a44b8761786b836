"""training/first_stage.py: the small photos autoencoder FlexTok's CPU quickstart uses as its first stage."""

import json

import pytest
import torch

import training.first_stage as first_stage
from tokenizers_vis import FlexTok
from training.data import PhotosDataModule
from training.feature_net import stack_crops

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(batch_size=16, pool_size=128, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_stage")
    return first_stage.ensure_autoencoder(16, root, steps=120, lr=3e-3, **SMALL)


def test_training_improves_reconstruction_and_standardises_the_latents(trained):
    report = json.loads((trained / "report.json").read_text())
    _, untrained = first_stage.train_autoencoder(16, steps=2, **SMALL)
    assert report["val_psnr"] > untrained["val_psnr"] + 2

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(trained).eval()
    pool, _ = stack_crops(PhotosDataModule(16, 16).train_dataset, 128, "", progress=False)
    with torch.no_grad():
        latents = vae.encode(pool).latent_dist.mode()  # (128, 4, 4, 4): f4
    assert latents.shape == (128, 4, 4, 4)
    scaled = (latents - vae.config.shift_factor) * vae.config.scaling_factor  # what FlexTok's flow sees
    assert abs(scaled.mean().item()) < 1e-3 and scaled.std().item() == pytest.approx(1.0, abs=1e-3)


def test_flextok_reads_it_as_its_first_stage(trained):
    model = FlexTok(
        image_size=16,
        first_stage="vae",
        vae_path=str(trained),
        patch_size=2,
        size="tiny",
        num_registers=4,
        levels=[5, 4],
        num_steps=2,
    )
    assert (model.latent_channels, model.latent_size) == (4, 4)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert model.decode(model.encode(x)).shape == x.shape


def test_an_existing_autoencoder_is_reused(trained, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(first_stage, "train_autoencoder", no_training)
    assert first_stage.ensure_autoencoder(16, trained.parent) == trained
