"""Lightning orchestration for stage 2: a GPT trained on pre-extracted tokens (LlamaGen recipe).

Teacher-forced cross-entropy with label dropout for classifier-free guidance; AdamW with weight decay on
matrices only; warm-up + cosine; gradient clipping (the trainer's `gradient_clip_val`); EMA weights used
for validation, sample grids and export. Every validation draws a grid with one row per class, decoded
through the frozen tokenizer that produced the codes.

Variable-length tokenizers (One-D-Piece, FlexTok), whose every prefix decodes to an image, train the GPT on
sequences truncated to a length drawn per batch (`truncate`: "uniform" over 1..N or "pow2", powers of two
up to N). A causal model's targets are the same either way (position i always predicts token i from the
tokens before it), so truncation changes two things only: the loss weighs early positions more, as every
prefix length the sampler may be asked for contains them, and short batches cost less. Sampling k tokens
(`scripts/sample.py num_tokens=k`) then decodes the k-token prefix.
"""

from __future__ import annotations

import copy

import lightning as L
import torch

from sampling.ar import sample_ar
from tokenizers_vis.base import Tokens, from_pretrained

from .callbacks import FlopsPerBatch, measure_training_flops, training_sequences
from .optim import ema_update, param_groups, warmup_cosine

TRUNCATE_RULES = ("none", "uniform", "pow2")


def draw_length(rule: str, num_tokens: int, generator: torch.Generator | None = None) -> int:
    """A training sequence length: N ("none"), uniform over 1..N, or a power of two <= N (and N itself)."""
    if rule == "none":
        return num_tokens
    if rule == "uniform":
        return int(torch.randint(1, num_tokens + 1, (), generator=generator))
    lengths = sorted({2**i for i in range(num_tokens.bit_length()) if 2**i <= num_tokens} | {num_tokens})
    return lengths[int(torch.randint(len(lengths), (), generator=generator))]


class GeneratorModule(FlopsPerBatch, L.LightningModule):
    def __init__(
        self,
        generator: torch.nn.Module,
        tokenizer_path: str | None = None,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.05,
        warmup_steps: int = 1000,
        min_lr_ratio: float = 0.1,
        ema_decay: float = 0.9999,
        grid_classes: int = 8,
        grid_samples_per_class: int = 8,
        grid_cfg_scale: float = 2.0,
        truncate: str = "none",
    ):
        super().__init__()
        self.generator = generator
        self.ema = copy.deepcopy(generator).requires_grad_(False)
        self.tokenizer_path = tokenizer_path
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_steps, self.min_lr_ratio, self.ema_decay = warmup_steps, min_lr_ratio, ema_decay
        self.grid_classes, self.grid_samples_per_class = grid_classes, grid_samples_per_class
        self.grid_cfg_scale = grid_cfg_scale
        if truncate not in TRUNCATE_RULES:
            raise ValueError(f"module.truncate={truncate!r}; expected one of {TRUNCATE_RULES}")
        self.truncate = truncate
        # Loaded on first use and kept in a plain dict: as a submodule it would enter every checkpoint.
        self._frozen: dict[str, torch.nn.Module] = {}

    def check_data(self, datamodule) -> None:
        """The codes must be what the generator was configured for; say which setting to fix if not."""
        spec, config = datamodule.token_spec, self.generator.config
        expected = {
            "vocab_size": spec["vocab_size"],
            "num_tokens": spec["num_tokens"],
            "num_classes": datamodule.num_classes,
            "token_kind": spec.get("kind", "categorical"),
            "token_dim": spec.get("token_dim"),
        }
        for key, value in expected.items():
            if config.get(key) != value:
                raise ValueError(
                    f"generator.{key}={config.get(key)} but the codes in {datamodule.codes_dir} "
                    f"have {key}={value}: set generator.{key}={value}"
                )

    def measure_flops_per_batch(self) -> int | None:
        """FLOPs of one training batch through the GPT (teacher-forced loss, forward + backward), on two of
        the training sequences at full length (`truncate` trains shorter ones: an upper bound then)."""
        sequences = training_sequences(self.trainer.datamodule, self.device)
        if sequences is None:
            return None
        tokens, labels, batch_size = sequences
        return measure_training_flops(
            lambda: self.generator.loss(tokens, labels), [self.generator], len(tokens), batch_size
        )

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            param_groups(self.generator, self.weight_decay), lr=self.lr, betas=self.betas
        )
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 100_000
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(self.warmup_steps, total, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        tokens = batch["tokens"]  # (B, N)
        length = draw_length(self.truncate, tokens.shape[1])  # the same on every rank: torch's global seed
        # The GPT itself swaps labels for the null class (p = label_dropout) in training mode.
        loss = self.generator.loss(tokens[:, :length], batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.global_step
        ema_update(self.ema, self.generator, min(self.ema_decay, (1 + step) / (10 + step)))

    def validation_step(self, batch, batch_idx):
        loss = self.ema.loss(batch["tokens"], batch["label"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["label"]))

    def on_validation_epoch_end(self):
        self.log("val/perplexity", self.trainer.callback_metrics["val/loss"].exp(), sync_dist=True)

    @torch.no_grad()
    def val_grids(self) -> dict[str, tuple[torch.Tensor, int]]:
        """One row per class (the first `grid_classes`), sampled from the EMA model with guidance."""
        if self.tokenizer_path is None:
            return {}
        if "tokenizer" not in self._frozen:
            self._frozen["tokenizer"] = from_pretrained(self.tokenizer_path, device=self.device)
        num_classes = min(self.grid_classes, self.ema.config["num_classes"])
        labels = torch.arange(num_classes, device=self.device).repeat_interleave(self.grid_samples_per_class)
        generator = torch.Generator(device=self.device).manual_seed(0)  # same noise every validation
        result = sample_ar(self.ema, labels, cfg_scale=self.grid_cfg_scale, generator=generator)
        images = (
            self._frozen["tokenizer"]
            .decode(Tokens(self.ema.config["token_kind"], result.tokens))
            .clamp(-1, 1)
        )
        return {"samples": (images.cpu(), self.grid_samples_per_class)}

    def export_model(self) -> torch.nn.Module:
        return self.ema
