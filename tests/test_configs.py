import inspect
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate

from training.config import ConfigError, check_run_dir, compose_config, group_options, save_run_config

EXPERIMENTS = group_options("experiment")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A randomly initialised torchvision VGG16 state dict: recipes with a perceptual loss need the file."""
    import torchvision

    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save(torchvision.models.vgg16(weights=None).features.state_dict(prefix="features."), path)
    return path


@pytest.fixture(scope="module")
def posttrain_exports(tmp_path_factory):
    """Tiny stand-ins (32 px, 32 tokens, 1024 codes, 17 classes) for the exports post-training loads."""
    from generators.gpt import GPT
    from tokenizers_vis import TiTok

    root = tmp_path_factory.mktemp("exports")
    TiTok(
        32, 8, "tiny", width=32, depth=1, heads=2, num_tokens=32, codebook_size=1024, code_dim=16
    ).save_pretrained(root / "tokenizer")
    GPT(1024, 32, 17, size="tiny", width=32, depth=1, heads=2).save_pretrained(root / "generator")
    return [
        f"module.tokenizer_path={root / 'tokenizer'}",
        f"module.generator_path={root / 'generator'}",
        f"module.target_path={root / 'generator'}",  # the EAGLE drafter's target
    ]


@pytest.fixture(scope="module")
def fq_teacher(tmp_path_factory):
    """A tiny random photos-net folder for paths.fq_teacher. On the meta device no teacher weights are read:
    fq_quickstart builds photos-net from its config.json, fqgan_dual_imagenet's timm teacher only checks that
    the folder holds model.safetensors (tokenizers_vis/fq.py)."""
    from training.feature_net import PhotosNet

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights") / "photos-net"
    PhotosNet([f"photo{i}" for i in range(17)], resolution=32, widths=(4, 8)).save_pretrained(folder)
    return folder


def test_there_are_experiments():
    stage1 = {"titok_quickstart", "titok_l32_imagenet", "titok_b64_imagenet", "titok_s128_imagenet"}
    stage1 |= {"titok_perturb_quickstart", "titok_posttrain_quickstart"}
    stage1 |= {"onedpiece_quickstart", "onedpiece_s256_imagenet", "onedpiece_b256_imagenet"}
    stage1 |= {"onedpiece_l256_imagenet", "flextok_quickstart", "flextok_d18_d18_imagenet"}
    stage1 |= {"fq_quickstart", "fqgan_dual_imagenet"}
    stage2 = {
        "gpt_quickstart",
        "gpt_b_titok_l32_imagenet",
        "gpt_l_titok_l32_imagenet",
        "gpt_draft_quickstart",
        "eagle_quickstart",
    }
    stage2 |= {"gpt_fq_quickstart"}
    assert stage1 | stage2 <= set(EXPERIMENTS)


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(name, vgg_file, vae_folder, fq_teacher, posttrain_exports):
    overrides = [f"+experiment={name}", f"paths.vgg_weights={vgg_file}", f"paths.flextok_vae={vae_folder}"]
    overrides.append(f"paths.fq_teacher={fq_teacher}")
    cfg = compose_config(overrides)
    posttrain = "generator_path" in cfg.module or "target_path" in cfg.module  # loads exports: tiny stand-ins
    if posttrain:
        keys = [k for k in ("tokenizer_path", "generator_path", "target_path") if k in cfg.module]
        cfg = compose_config(overrides + [o for o in posttrain_exports if o.split("=")[0][7:] in keys])
    assert cfg.name == name, "an experiment's `name` must equal its file name (it names the run folder)"
    assert cfg.paths.run_dir == f"runs/{name}"
    if "train_shards" in cfg.data and not Path(cfg.data.train_shards.split("{")[0]).parent.is_dir():
        # ImageNet shards are not on this machine: the data module says so before any training
        with pytest.raises(InstantiationException, match=r"data.train_shards=.* matches no file"):
            instantiate(cfg.data)
    elif "codes_dir" not in cfg.data:  # stage 2 reads codes that a stage-1 run extracts (test_pipeline.py)
        assert instantiate(cfg.data).num_classes > 0
    with torch.device("cpu" if posttrain else "meta"):  # the published sizes, without allocating weights
        module = instantiate(cfg.module)
    if "target_path" in cfg.module:
        assert module.drafter.target_architecture["width"] == module.target.width
    elif "tokenizer" in cfg or posttrain:
        assert module.tokenizer.config["image_size"] == cfg.data.resolution
    else:
        assert module.generator.config["vocab_size"] == cfg.generator.vocab_size
    trainer_class = get_class(cfg.trainer._target_)
    unknown = set(cfg.trainer) - set(inspect.signature(trainer_class).parameters) - {"_target_"}
    assert not unknown, f"trainer keys that lightning.Trainer does not take: {unknown}"
    if cfg.trainer.accelerator == "cpu":
        assert isinstance(instantiate(cfg.trainer, logger=False), L.Trainer)


@pytest.mark.parametrize("trainer", group_options("trainer"))
def test_trainer_groups_compose(trainer):
    cfg = compose_config(["+experiment=titok_quickstart", f"trainer={trainer}"])
    unknown = set(cfg.trainer) - set(inspect.signature(L.Trainer).parameters) - {"_target_"}
    assert not unknown
    if trainer == "slurm":
        assert cfg.trainer.plugins[0].auto_requeue is True
        assert get_class(cfg.trainer.plugins[0]._target_).__name__ == "SLURMEnvironment"


def test_imagenet_recipes_follow_the_published_sizes():
    sizes = {
        "titok_l32_imagenet": ("L", 32),
        "titok_b64_imagenet": ("B", 64),
        "titok_s128_imagenet": ("S", 128),
    }
    for name, (size, tokens) in sizes.items():
        cfg = compose_config([f"+experiment={name}"])
        assert (cfg.tokenizer.size, cfg.tokenizer.num_tokens) == (size, tokens)
        assert (cfg.tokenizer.codebook_size, cfg.tokenizer.code_dim, cfg.data.resolution) == (4096, 12, 256)
        assert cfg.trainer.precision == "bf16-mixed" and cfg.module.lr == 1e-4


def test_unknown_experiment_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown experiment 'nope'; choose one of: .*titok_quickstart"):
        compose_config(["+experiment=nope"])


def test_unknown_key_is_one_line_with_valid_keys():
    with pytest.raises(ConfigError) as error:
        compose_config(["+experiment=titok_quickstart", "trainer.max_stepz=3"])
    message = str(error.value)
    assert "\n" not in message and "trainer.max_stepz" in message and "max_steps" in message


def test_train_py_fails_in_one_line_before_any_work():
    result = subprocess.run(
        [sys.executable, "train.py", "+experiment=titok_quikstart"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: unknown experiment 'titok_quikstart'; choose one of: {', '.join(EXPERIMENTS)}"
    ]


def test_run_folder_refuses_a_different_config(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config(["+experiment=titok_quickstart"])
    assert check_run_dir(cfg, run_dir) is None  # new folder: nothing to resume
    save_run_config(cfg, run_dir)
    longer = compose_config(["+experiment=titok_quickstart", "trainer.max_steps=5000"])
    assert check_run_dir(longer, run_dir) is None  # a longer schedule is a resumable change
    with pytest.raises(ConfigError, match=r"module\.lr"):
        check_run_dir(compose_config(["+experiment=titok_quickstart", "module.lr=0.1"]), run_dir)


def test_resume_picks_the_newest_checkpoint(tmp_path):
    cfg = compose_config(["+experiment=titok_quickstart"])
    (tmp_path / "checkpoints").mkdir()
    last, hpc = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    torch.save({"global_step": 1}, last)
    assert check_run_dir(cfg, tmp_path) == last
    torch.save({"global_step": 2}, hpc)  # a SLURM pre-emption checkpoint written after last.ckpt
    os.utime(last, (1, 1))
    assert check_run_dir(cfg, tmp_path) == hpc


def test_missing_weights_file_fails_in_one_line_naming_the_setting(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "+experiment=titok_quickstart",
            "module.loss.perceptual_weight=1.0",
            f"paths.run_dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "paths.vgg_weights" in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "run" / "config.yaml").exists()  # a failed start leaves nothing to trip over


def test_slurm_launcher_matches_the_trainer():
    from hydra import compose, initialize_config_dir

    from training.config import CONFIG_DIR

    overrides = [
        "+experiment=titok_l32_imagenet",
        "trainer=slurm",
        "trainer.num_nodes=4",
        "hydra/launcher=slurm",
    ]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (4, 8, 8)
    assert launcher.signal_delay_s > 0  # SIGUSR1 ahead of the limit, for Lightning's requeue


def test_sbatch_template_runs_one_task_per_gpu():
    script = (REPO / "scripts" / "slurm" / "train.sbatch").read_text()
    assert "srun python train.py trainer=slurm" in script
    sbatch_lines = [line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH")]
    options = dict(option.partition("=")[::2] for option in sbatch_lines)
    tasks, gpus = options["--ntasks-per-node"], options["--gpus-per-node"]
    assert tasks == gpus
    assert 'trainer.devices="${SLURM_NTASKS_PER_NODE}"' in script
    assert "--signal=SIGUSR1" in script and "--requeue" in script
