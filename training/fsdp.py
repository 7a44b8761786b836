"""FSDP whose wrap units are the repeated blocks of the models a run actually trains.

Every model class names its repeated block classes in `fsdp_blocks` (core/hub.py `Exportable`: GPT and the
EAGLE drafter their decoder Block, TiTok-family tokenizers timm's ViT Block, FlexTok its own Block,
TokenBridge its ResBlock). configs/trainer/fsdp.yaml says `auto_wrap_policy: fsdp_blocks`, and train.py
builds the strategy with `strategy_for(cfg.trainer.strategy, module)`, which replaces that word by a
`ModuleWrapPolicy` over the union of the `fsdp_blocks` of every submodule of the LightningModule (the
trained model, its EMA copy, ...): each block instance becomes one FSDP unit, so GPT and FlexTok blocks are
sharded one by one instead of the whole model as one unit.

`activation_checkpointing: true` (the project's switch, in the same strategy node) also recomputes those
blocks' activations in the backward pass: Lightning's `activation_checkpointing_policy` over the same
classes. Frozen networks held outside the module tree (teachers, FlexTok's VAE, EAGLE's target) are not
wrapped: they are not trained and each rank keeps its own copy.
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from training.config import ConfigError

FROM_MODELS = "fsdp_blocks"  # the auto_wrap_policy value that asks for the models' own blocks
FSDP_STRATEGY = "lightning.pytorch.strategies.FSDPStrategy"


def block_classes(module: nn.Module) -> set[type[nn.Module]]:
    """The union of `fsdp_blocks` over `module` and all its submodules that declare it."""
    return {cls for child in module.modules() for cls in getattr(child, "fsdp_blocks", ())}


def wrap_policy(module: nn.Module) -> ModuleWrapPolicy:
    """A ModuleWrapPolicy that makes every instance of the models' block classes its own FSDP unit."""
    classes = block_classes(module)
    if not classes:
        raise ConfigError(
            f"{type(module).__name__} holds no model with `fsdp_blocks`: FSDP would shard it as a single "
            "unit (use trainer=ddp, or declare the model's repeated block classes in `fsdp_blocks`)"
        )
    return ModuleWrapPolicy(classes)


def strategy_for(strategy: DictConfig | str | None, module: nn.Module):
    """trainer.strategy built for `module`: an FSDPStrategy, or None for any other strategy ("auto", DDP),
    which the trainer config builds as it stands.

    With `auto_wrap_policy: fsdp_blocks` the policy is `wrap_policy(module)`, and `activation_checkpointing:
    true` checkpoints the same block classes; an explicit policy (a `_target_` node) is kept as configured.
    """
    if not isinstance(strategy, DictConfig) or strategy.get("_target_") != FSDP_STRATEGY:
        return None
    settings = OmegaConf.to_container(strategy, resolve=True)
    checkpointing = settings.pop("activation_checkpointing", False)
    if not isinstance(checkpointing, bool):
        setting = "trainer.strategy.activation_checkpointing"
        raise ConfigError(f"{setting}={checkpointing!r}; expected true or false")
    derived = {}
    if settings.get("auto_wrap_policy") == FROM_MODELS:
        del settings["auto_wrap_policy"]
        derived["auto_wrap_policy"] = wrap_policy(module)
        if checkpointing:
            derived["activation_checkpointing_policy"] = ModuleWrapPolicy(block_classes(module))
    elif checkpointing:
        raise ConfigError(
            "trainer.strategy.activation_checkpointing=true checkpoints the models' fsdp_blocks and needs "
            "auto_wrap_policy: fsdp_blocks; with another policy set activation_checkpointing_policy instead"
        )
    return instantiate(settings, **derived)
