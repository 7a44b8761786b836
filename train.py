"""Train a model: `python train.py +experiment=NAME [key=value ...]`.

The experiment file picks the data, the model and the trainer; every object is built here, once, from its
config's `_target_`. The run folder (`paths.run_dir`, default `runs/<experiment>`) receives the resolved
config, checkpoints (`checkpoints/last.ckpt`), sample grids, the exported model (`export/`) and
`metrics.json`. Running the same command again resumes from `last.ckpt` (this is what a requeued SLURM job
does) exactly where the run stopped: its random states and data position are in the checkpoint, so a killed
and resumed run ends with the weights of an uninterrupted one (training/checkpoints.py). A different config
in the same folder is refused instead of silently mixed in.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from training.callbacks import ImageGrids, SkippedImages, Throughput
from training.checkpoints import AtomicCheckpointIO, RandomStates
from training.config import CONFIG_DIR, ConfigError, check_run_dir, compose_config, save_run_config
from training.data import DataError
from training.fsdp import strategy_for
from training.validation import check_train

# Lightning warns that manual-optimisation checkpoints hold the post-step weights: that is what we want.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# Lightning only knows stateful DataLoaders; the data modules resume their own position (ResumableData).
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")


def run(cfg: DictConfig) -> dict:
    """Fit, validate the final (EMA) weights, export, and write metrics.json. Returns the metrics."""
    run_dir = Path(cfg.paths.run_dir)
    check_train(cfg)  # every setting, before anything is built
    checkpoint = check_run_dir(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    try:
        datamodule = instantiate(cfg.data)
        module = instantiate(cfg.module)
    except InstantiationException as error:  # a missing weights file, a bad argument: say it in one line
        cause = error.__cause__ or error
        raise ConfigError(f"{type(cause).__name__}: {cause}") from error
    if hasattr(module, "check_data"):  # e.g. a generator's vocabulary against the extracted codes
        try:
            module.check_data(datamodule)
        except ValueError as error:
            raise ConfigError(str(error)) from error
    # Exact resume is not optional: every run saves its random states and writes checkpoints atomically.
    skipped = SkippedImages()
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + [RandomStates(), skipped]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    plugins = [instantiate(p) for p in cfg.trainer.get("plugins") or []] + [AtomicCheckpointIO()]
    # FSDP wraps the blocks of the models being trained (training/fsdp.py); other strategies as configured
    strategy = strategy_for(cfg.trainer.get("strategy"), module)
    built = {"plugins": plugins, "default_root_dir": str(run_dir)}
    built |= {"strategy": strategy} if strategy is not None else {}
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, **built)
    if trainer.is_global_zero:  # only once everything was built: a failed start leaves no config behind
        save_run_config(cfg, run_dir)

    trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
    # The last periodic validation may predate the final step: measure the weights that get exported.
    results = trainer.validate(module, datamodule=datamodule, verbose=False)

    throughput = next((c for c in callbacks if isinstance(c, Throughput)), None)
    metrics = {k.removeprefix("val/"): float(v) for k, v in results[0].items()}
    metrics["steps"] = trainer.global_step
    metrics["skipped_images"] = skipped.total(trainer)
    if throughput is not None and throughput.images:  # a resumed, already finished run trains no batch
        metrics["train_images_per_second"] = throughput.images_per_second
    if trainer.is_global_zero:
        export_dir = module.export_model().save_pretrained(run_dir / "export")
        # the dataset it was trained on: evaluate.py measures against it (reference_data=recorded)
        (export_dir / "data.json").write_text(
            json.dumps(OmegaConf.to_container(cfg.data, resolve=True)) + "\n"
        )
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"\nexported model: {export_dir}")
        for grid in next((c.latest.values() for c in callbacks if isinstance(c, ImageGrids)), []):
            print(f"image grid:     {grid}")
        print(f"metrics:        {run_dir / 'metrics.json'}")
        if metrics["skipped_images"]:
            print(
                f"skipped:        {metrics['skipped_images']} unreadable images (named in the warnings above)"
            )
        print("  " + "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if HydraConfig.get().mode == RunMode.MULTIRUN:  # each job of a sweep gets its own stable folder
        cfg.paths.run_dir = HydraConfig.get().runtime.output_dir
    try:
        run(cfg)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    except DataError as error:
        sys.exit(f"error: {DataError.one_line(error)}")


def precheck(argv: list[str]) -> None:
    """Fail in one line, before Hydra starts anything, on an unknown experiment, group option or key."""
    if any(a in ("-m", "--multirun") for a in argv) or any(a.startswith("--") for a in argv):
        return  # sweeps and Hydra's own flags (--help, --cfg, ...) are Hydra's to parse
    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra")]
    try:
        compose_config(overrides)
    except ConfigError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    precheck(sys.argv[1:])
    main()
