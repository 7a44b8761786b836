"""FSDP wraps the blocks each model declares (`fsdp_blocks`), built from the module a run trains."""

import copy
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import TINY_RUN
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import OmegaConf
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn
from torch.distributed.fsdp import ShardingStrategy

import train
from generators import GPT
from generators import gpt as gpt_file
from tokenizers_vis import TiTok
from tokenizers_vis import flextok as flextok_file
from tokenizers_vis.flextok import FlexTok
from tokenizers_vis.losses import ReconstructionLoss
from training.config import ConfigError, compose_config
from training.eagle_module import EagleModule
from training.fsdp import FROM_MODELS, block_classes, strategy_for, wrap_policy
from training.generator_module import GeneratorModule
from training.tokenizer_module import TokenizerModule


def tiny_gpt() -> GPT:
    return GPT(vocab_size=64, num_tokens=8, num_classes=3, size="tiny", width=32, depth=2, heads=2)


def no_loss() -> ReconstructionLoss:
    return ReconstructionLoss(perceptual_weight=0.0, gan_weight=0.0)


@pytest.fixture(scope="module")
def gpt_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports") / "gpt"
    tiny_gpt().save_pretrained(folder)
    return folder


def tiny_modules(gpt_export) -> dict:
    """name -> (LightningModule, the trained model, the block class FSDP must wrap)."""
    titok = TiTok(16, 4, "tiny", width=32, depth=2, heads=2, num_tokens=8, codebook_size=64, code_dim=8)
    flextok = FlexTok(16, first_stage="pixels", patch_size=4, size="tiny", width=32, depth=2, heads=2)
    modules = {
        "gpt": GeneratorModule(tiny_gpt()),
        "titok": TokenizerModule(titok, no_loss()),
        "flextok": TokenizerModule(flextok, no_loss()),
        "eagle": EagleModule(str(gpt_export)),
    }
    models = {"gpt": "generator", "titok": "tokenizer", "flextok": "tokenizer", "eagle": "drafter"}
    gpt_block, flextok_block = gpt_file.Block, flextok_file.Block
    blocks = {"gpt": gpt_block, "titok": TimmBlock, "flextok": flextok_block, "eagle": gpt_block}
    return {name: (module, getattr(module, models[name]), blocks[name]) for name, module in modules.items()}


@pytest.mark.parametrize("name", ["gpt", "titok", "flextok", "eagle"])
def test_policy_wraps_every_block_of_the_trained_models(name, gpt_export):
    module, model, block = tiny_modules(gpt_export)[name]
    assert block in model.fsdp_blocks
    policy = wrap_policy(module)
    assert policy._module_classes == block_classes(module) == {block}  # GPT/FlexTok blocks are not timm's
    units = set(policy._run_policy(module, set(), {}))
    blocks = [m for m in model.modules() if isinstance(m, block)]
    assert len(blocks) >= 1 and set(blocks) <= units  # every block of the model is an FSDP unit ...
    assert units == {m for m in module.modules() if isinstance(m, block)}  # ... and of its EMA copy; no more


def test_a_module_without_blocks_is_a_one_line_error():
    with pytest.raises(ConfigError, match="holds no model with `fsdp_blocks`"):
        wrap_policy(nn.Sequential(nn.Linear(2, 2)))


EXPERIMENTS = {  # experiment -> (the block class FSDP wraps, overrides that keep the model small)
    "titok_quickstart": (TimmBlock, []),
    "flextok_quickstart": (flextok_file.Block, []),
    "gpt_quickstart": (gpt_file.Block, []),
    "eagle_quickstart": (gpt_file.Block, []),
}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_fsdp_config_builds_the_strategy_from_the_module(experiment, checkpointing, gpt_export):
    block, overrides = EXPERIMENTS[experiment]
    overrides = [f"+experiment={experiment}", "trainer=fsdp", *overrides]
    overrides += [f"module.target_path={gpt_export}"] if experiment.startswith("eagle") else []
    overrides += ["trainer.strategy.activation_checkpointing=true"] if checkpointing else []
    cfg = compose_config(overrides)
    assert cfg.trainer.strategy.auto_wrap_policy == FROM_MODELS  # nothing hard-coded in fsdp.yaml
    if "generator" in cfg:  # stage 2: no codes here; the generator is all the module needs
        module = GeneratorModule(instantiate(cfg.generator))
    else:
        module = instantiate(cfg.module)
    strategy = strategy_for(cfg.trainer.strategy, module)  # no process group is needed to build it
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {block}
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD and strategy._state_dict_type == "full"
    checkpointed = strategy._activation_checkpointing_kwargs  # Lightning's activation_checkpointing_policy
    if checkpointing:
        assert checkpointed["auto_wrap_policy"]._module_classes == {block}
    else:
        assert not checkpointed


def test_other_strategies_and_explicit_policies_are_left_as_configured():
    module = GeneratorModule(tiny_gpt())
    assert strategy_for(compose_config(["trainer=ddp"]).trainer.strategy, module) is None
    assert strategy_for("auto", module) is None
    explicit = compose_config(["trainer=fsdp"]).trainer.strategy
    explicit.auto_wrap_policy = OmegaConf.create(
        {"_target_": "torch.distributed.fsdp.wrap.ModuleWrapPolicy", "module_classes": []}
    )
    assert strategy_for(explicit, module).kwargs["auto_wrap_policy"]._module_classes == set()
    explicit.activation_checkpointing = True
    with pytest.raises(ConfigError, match="needs auto_wrap_policy: fsdp_blocks"):
        strategy_for(explicit, module)
    explicit.activation_checkpointing = "yes"
    with pytest.raises(ConfigError, match="activation_checkpointing='yes'"):
        strategy_for(explicit, module)


class CaptureTrainer:
    """Stands in for lightning.Trainer (no GPU here): records what train.py builds it with, then stops."""

    built: dict = {}

    def __init__(self, **kwargs):
        CaptureTrainer.built = kwargs
        raise RuntimeError("captured")


def test_train_builds_the_trainer_with_the_derived_strategy(tmp_path):
    overrides = ["trainer=fsdp", f"trainer._target_={__name__}.CaptureTrainer", f"paths.run_dir={tmp_path}"]
    cfg = compose_config(TINY_RUN + overrides)
    with pytest.raises(InstantiationException, match="captured"):
        train.run(cfg)
    strategy = CaptureTrainer.built["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {TimmBlock}
    assert not (tmp_path / "config.yaml").exists()  # a failed start leaves nothing behind


# ---- a real sharded training step: two gloo processes on the CPU -------------------------------------------
class GPTLoss(nn.Module):
    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, tokens, labels):
        return self.gpt.loss(tokens, labels)


def fsdp_worker(rank: int, world_size: int, port: int, fsdp_kwargs: dict, checkpointing_kwargs: dict):
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = GPTLoss(tiny_gpt())
        reference = copy.deepcopy(model)
        total = sum(p.numel() for p in model.parameters())
        # what Lightning's FSDPStrategy does with these kwargs: wrap, then checkpoint
        wrapped = FSDP(model, device_id=torch.device("cpu"), **fsdp_kwargs)
        if checkpointing_kwargs:
            wrapper = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            apply_activation_checkpointing(wrapped, checkpoint_wrapper_fn=wrapper, **checkpointing_kwargs)
        units = [m for m in wrapped.modules() if isinstance(m, FSDP)]
        assert all(isinstance(block, FSDP) for block in wrapped.gpt.blocks) and len(units) == 1 + 2
        assert sum(p.numel() for p in wrapped.parameters()) < 0.6 * total  # each rank holds about half
        tokens = torch.randint(64, (4, 8), generator=torch.Generator().manual_seed(1))
        labels = torch.tensor([0, 1, 2, 0])
        losses = []
        for net in (wrapped, reference):
            optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
            torch.manual_seed(2)  # the same label dropout on both ranks and in the reference
            loss = net(tokens, labels)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
            state = wrapped.state_dict()
        if rank == 0:  # one sharded step = one unsharded step on the same batch
            expected = reference.state_dict()
            assert state.keys() == expected.keys()
            for key, value in expected.items():
                torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)
        dist.barrier()  # no rank tears its connections down while another still uses them
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_two_process_fsdp_step_on_cpu_matches_an_unsharded_step(checkpointing):
    overrides = ["trainer=fsdp", f"trainer.strategy.activation_checkpointing={str(checkpointing).lower()}"]
    strategy = strategy_for(compose_config(overrides).trainer.strategy, GPTLoss(tiny_gpt()))
    kwargs = {**strategy.kwargs, "sharding_strategy": strategy.sharding_strategy}  # what FSDP gets
    args = (2, free_port(), kwargs, strategy._activation_checkpointing_kwargs)
    torch.multiprocessing.spawn(fsdp_worker, args=args, nprocs=2, join=True)
