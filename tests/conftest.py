import pytest
import torch

from training.config import compose_config

# Data and model sizes that make any TiTok-family quickstart train a few steps in seconds on a CPU.
TINY_SIZES = [
    "data.resolution=16",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.samples_per_epoch=64",
    "data.val_per_class=1",
    "tokenizer.width=32",
    "tokenizer.depth=1",
    "tokenizer.heads=2",
    "tokenizer.codebook_size=64",
    "module.warmup_steps=2",
]
# A TiTok small enough to train a few steps in seconds on a CPU, through the real configs.
TINY_RUN = [
    "+experiment=titok_quickstart",
    *TINY_SIZES,
    "tokenizer.num_tokens=8",
    "module.loss.gan_weight=0.1",  # the quickstart has no GAN; tests exercise it
    "module.loss.gan_start_step=2",
    "module.loss.disc_channels=8",
    "module.loss.disc_layers=1",
]
# Four steps, validation and a checkpoint every two, quiet: shared by the stage-1 and stage-2 tiny runs.
TINY_TRAINER = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.progress=null",
]
TINY_RUN += TINY_TRAINER


@pytest.fixture
def tiny_run_overrides():
    return list(TINY_RUN)


@pytest.fixture
def tiny_run_config(tmp_path):
    def make(*overrides):
        return compose_config(TINY_RUN + [f"paths.run_dir={tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture(scope="module")
def one_thread():
    """On CPUs shared with other jobs, OpenMP threads wait on each other: one thread is ~20x faster here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def vae_folder(tmp_path_factory):
    """A tiny random f8 diffusers AutoencoderKL saved to a folder, as paths.flextok_vae expects."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    )
    folder = tmp_path_factory.mktemp("weights") / "vae"
    vae.save_pretrained(folder)
    return folder
