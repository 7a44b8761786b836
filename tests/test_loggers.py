"""Loggers (csv, tensorboard, wandb), image grids sent to them, and throughput with FLOPs per batch."""

import random
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN
from hydra.utils import instantiate
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import ThroughputMonitor
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.nn.attention import SDPBackend, sdpa_kernel

import train
from generators import GPT
from tokenizers_vis import TiTok
from tokenizers_vis.losses import ReconstructionLoss
from training.callbacks import FlopsPerBatch, samples_in, wandb_run_id
from training.config import compose_config
from training.eagle_module import EagleModule
from training.generator_module import GeneratorModule
from training.tokenizer_module import TokenizerModule

pytestmark = pytest.mark.usefixtures("one_thread")  # shared CPUs: one thread is much faster

TENSORBOARD = ["logger=tensorboard", "callbacks.throughput_monitor.window_size=2"]  # rates from batch 2 on


def read_events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_tensorboard_gets_scalars_throughput_flops_and_grids(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config(TINY_RUN + TENSORBOARD + [f"paths.run_dir={run_dir}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train.run(cfg)
    # On a CPU the monitor knows no peak FLOPs: no MFU, and not a single warning about it or about FLOPs.
    assert not [w for w in caught if "flop" in str(w.message).lower()], [str(w.message) for w in caught]

    log_dir = run_dir / "tensorboard"  # no version_N: every attempt of the run writes here
    events = read_events(log_dir)
    scalars = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/images_per_second", "train/device/samples_per_sec"}
    assert expected | {"train/device/flops_per_sec", "val/psnr", "lr"} <= scalars
    assert "train/device/mfu" not in scalars
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3]
    assert events.Scalars("train/images_per_second")[-1].value == pytest.approx(
        metrics["train_images_per_second"]
    )
    rates = {e.step: e.value for e in events.Scalars("train/device/samples_per_sec")}
    flops = {e.step: e.value for e in events.Scalars("train/device/flops_per_sec")}
    assert all(v > 0 for v in rates.values()) and rates.keys() == flops.keys()
    # FLOP/s = FLOPs per batch x batches per second, batch = 8 images
    per_batch = [flops[s] / rates[s] * 8 for s in rates]
    assert max(per_batch) == pytest.approx(min(per_batch), rel=1e-5) and min(per_batch) > 1e6

    # The grid of every validation (steps 2 and 4) once, as the PNG shows it.
    grids = events.Images("grids/reconstructions")
    assert [g.step for g in grids] == [2, 4]
    png = Image.open(run_dir / "grids" / "reconstructions.png")
    assert (grids[-1].width, grids[-1].height) == png.size


def test_tensorboard_run_resumes_into_the_same_folder(tmp_path):
    run_dir = tmp_path / "run"
    overrides = TINY_RUN + TENSORBOARD + [f"paths.run_dir={run_dir}"]
    train.run(compose_config(overrides))
    train.run(compose_config(overrides + ["trainer.max_steps=6"]))
    assert sorted(p.name for p in (run_dir / "tensorboard").iterdir() if p.is_dir()) == []
    events = read_events(run_dir / "tensorboard")
    assert [e.step for e in events.Scalars("train/loss")][-2:] == [4, 5]
    assert [g.step for g in events.Images("grids/reconstructions")][-1] == 6


def test_csv_logger_stays_the_default_and_gets_no_images(tiny_run_config):
    cfg = tiny_run_config()
    assert cfg.logger._target_.endswith("CSVLogger")
    train.run(cfg)
    run_dir = Path(cfg.paths.run_dir)
    (metrics_csv,) = (run_dir / "logs").glob("version_*/metrics.csv")
    header = metrics_csv.read_text().splitlines()[0].split(",")
    assert "train/images_per_second" in header and "train/device/flops_per_sec" not in header  # window 20
    assert not list(run_dir.glob("tensorboard"))


def test_wandb_config_is_offline_with_a_stable_run_id(tmp_path):
    cfg = compose_config(["+experiment=titok_quickstart", "logger=wandb", f"paths.run_dir={tmp_path / 'a'}"])
    assert cfg.logger.offline is True and cfg.logger.log_model is False
    assert cfg.logger.save_dir == str(tmp_path / "a") and cfg.logger.name == "titok_quickstart"
    # one id per run folder, the same for every attempt; W&B ids take letters, digits, - _ . only
    first, again = wandb_run_id(tmp_path / "a"), wandb_run_id(str(tmp_path / "a"))
    assert first == again != wandb_run_id(tmp_path) and first.startswith("a-")
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", wandb_run_id(tmp_path / "x=1,y=a b"))


def test_wandb_logger_logs_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # an optional extra: pip install -e ".[wandb]"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train.run(compose_config(TINY_RUN + ["logger=wandb", f"paths.run_dir={run_dir}"]))
    import wandb

    wandb.finish()
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert offline_run.name.endswith(wandb_run_id(run_dir))
    assert list(offline_run.glob("files/media/images/grids/reconstructions_*.png"))


# ---- FLOPs per batch --------------------------------------------------------------------------------------
def attach(module, **datamodule):
    """A stand-in for the trainer and data module that `measure_flops_per_batch` reads."""
    from types import SimpleNamespace

    data = SimpleNamespace(**datamodule)
    module._trainer = SimpleNamespace(datamodule=data, max_steps=10, global_step=0, training=True)
    return module


def tiny_titok() -> TiTok:
    sizes = dict(image_size=16, patch_size=4, size="tiny", width=32, depth=1, heads=2, num_tokens=8)
    return TiTok(**sizes, codebook_size=64, code_dim=8, dead_code_threshold=0.5)  # restarts in every step


def tiny_gpt() -> GPT:
    return GPT(vocab_size=64, num_tokens=8, num_classes=3, size="tiny", width=32, depth=2, heads=2)


def modules(tmp_path):
    torch.manual_seed(0)
    codes = {"batch_size": 16, "train_dataset": type("Codes", (), {"tokens": torch.randint(64, (20, 8))})}
    tiny_gpt().save_pretrained(tmp_path / "gpt")
    loss = ReconstructionLoss(perceptual_weight=0.0, gan_weight=0.0)
    return {
        "tokenizer": attach(TokenizerModule(tiny_titok(), loss), batch_size=8),
        "generator": attach(GeneratorModule(tiny_gpt()), **codes),
        "eagle": attach(EagleModule(str(tmp_path / "gpt"), guidance_scale=2.0), **codes),
    }


def test_every_module_measures_its_batch_without_touching_weights_or_random_states(tmp_path):
    for name, module in modules(tmp_path).items():
        assert isinstance(module, FlopsPerBatch)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        random.seed(1), np.random.seed(1), torch.manual_seed(1)
        module.setup("fit")
        assert module.flops_per_batch > 0, name
        after = module.state_dict()
        assert all(torch.equal(state[k], after[k]) for k in state), name  # codebook restarts included
        assert all(p.grad is None for p in module.parameters()), name
        expected = (random.random(), np.random.rand(), torch.rand(1))
        random.seed(1), np.random.seed(1), torch.manual_seed(1)
        assert (random.random(), np.random.rand(), torch.rand(1)) == expected, name
        module._trainer.training = False  # a validation batch: ThroughputMonitor gets no training FLOPs
        assert module.flops_per_batch is None


def test_flops_per_batch_is_a_full_batch_forward_and_backward(tmp_path):
    module = modules(tmp_path)["generator"]
    module.setup("fit")
    gpt, tokens = module.generator, module.trainer.datamodule.train_dataset.tokens[:16]
    labels = torch.zeros(16, dtype=torch.long)
    with sdpa_kernel(SDPBackend.MATH):
        full = measure_flops(gpt, lambda: gpt.loss(tokens, labels), loss_fn=lambda loss: loss)
    assert module.flops_per_batch == full
    # 6 x parameters x tokens is the usual estimate: attention and the head make the count a little larger
    matrices = sum(p.numel() for n, p in gpt.named_parameters() if p.dim() == 2 and "embed" not in n)
    assert 6 * matrices * 16 * 8 <= full < 2 * 6 * matrices * 16 * 8


def test_unmeasurable_flops_warn_once_and_training_goes_on(tmp_path):
    module = attach(GeneratorModule(tiny_gpt()), batch_size=16, train_dataset=None)
    module.measure_flops_per_batch = lambda: 1 / 0
    with pytest.warns(UserWarning, match="FLOPs per batch not measured .*ZeroDivisionError"):
        module.setup("fit")
    assert module.flops_per_batch is None


def test_throughput_monitor_is_configured(tiny_run_config):
    cfg = tiny_run_config()
    monitor = instantiate(cfg.callbacks.throughput_monitor)
    assert isinstance(monitor, ThroughputMonitor) and monitor.batch_size_fn is samples_in
    assert samples_in({"image": torch.zeros(5, 3, 4, 4), "label": torch.zeros(5)}) == 5
    assert samples_in({"tokens": torch.zeros(3, 8), "label": torch.zeros(3)}) == 3
