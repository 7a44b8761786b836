"""Lightning orchestration for stage 1: a tokenizer trained with reconstruction, perceptual and GAN losses.

Manual optimisation, because the tokenizer and the discriminator alternate every step:
  1. tokenizer step on pixel (+ perceptual) (+ hinge GAN) + quantiser losses, gradient clipping, EMA update;
  2. discriminator step on hinge + LeCam, once the GAN has started.
`trainer.max_steps` counts tokenizer steps only (see `step_without_counting`). Validation and export use
the EMA weights. Models stay plain nn.Modules: nothing here is needed to use a trained tokenizer.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from tokenizers_vis.base import Tokenizer
from tokenizers_vis.losses import ReconstructionLoss
from tokenizers_vis.perturb import perturbation_for, perturbation_logs
from tokenizers_vis.quantizers import code_histogram_stats

from .callbacks import FlopsPerBatch, measure_training_flops
from .metrics import psnr, ssim
from .optim import ema_update, param_groups, step_without_counting, warmup_cosine


class TokenizerModule(FlopsPerBatch, L.LightningModule):
    def __init__(
        self,
        tokenizer: Tokenizer,
        loss: ReconstructionLoss,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 1e-4,
        warmup_steps: int = 1000,
        min_lr_ratio: float = 0.1,
        disc_lr: float | None = None,
        grad_clip: float = 1.0,
        ema_decay: float = 0.999,
        grid_images: int = 16,
        perturb: dict | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.tokenizer, self.loss = tokenizer, loss
        self.ema = copy.deepcopy(tokenizer).requires_grad_(False)
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.disc_lr = disc_lr if disc_lr is not None else lr
        self.grad_clip, self.ema_decay, self.grid_images = grad_clip, ema_decay, grid_images
        # RobustTok latent perturbation of the decoder's input (tokenizers_vis/perturb.py), or None.
        self.perturbation = perturbation_for(tokenizer, perturb)

    # ---- optimisation -------------------------------------------------------------------------------------
    def on_fit_start(self):
        if not self.loss.perceptual_on:
            rank_zero_info("perceptual loss is off (module.loss.perceptual_weight=0)")

    def measure_flops_per_batch(self) -> int | None:
        """FLOPs of one training batch through the tokenizer (`reconstruct_batch`, forward + backward, with
        the frozen networks it runs); the discriminator and the perceptual network are not counted."""
        size = self.tokenizer.config.get("image_size")
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if size is None or batch_size is None:
            return None

        def step():
            images = torch.rand(2, 3, size, size, device=self.device) * 2 - 1  # (2, 3, H, W)
            batch = {"image": images, "label": torch.zeros(2, dtype=torch.long, device=self.device)}
            reconstructions, quantizer_losses, _, _ = self.reconstruct_batch(batch, self.global_step)
            return reconstructions.float().square().mean() + sum(quantizer_losses.values())

        return measure_training_flops(step, [self.tokenizer], samples=2, batch_size=batch_size)

    def configure_optimizers(self):
        optimizers = [
            torch.optim.AdamW(param_groups(self.tokenizer, self.weight_decay), lr=self.lr, betas=self.betas)
        ]
        if self.loss.discriminator is not None:
            optimizers.append(
                torch.optim.AdamW(
                    param_groups(self.loss.discriminator, self.weight_decay),
                    lr=self.disc_lr,
                    betas=self.betas,
                )
            )
        return optimizers

    def _set_learning_rates(self, optimizers, step: int) -> float:
        """Warm-up + cosine as a pure function of the tokenizer step, so a resumed run continues exactly."""
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 100_000
        factor = warmup_cosine(self.warmup_steps, total, self.min_lr_ratio)(step)
        for optimizer, base_lr in zip(optimizers, (self.lr, self.disc_lr), strict=False):
            for group in optimizer.param_groups:
                group["lr"] = base_lr * factor
        return self.lr * factor

    def training_step(self, batch, batch_idx):
        images = batch["image"]  # (B, 3, H, W) in [-1, 1]
        step = self.global_step  # tokenizer steps taken so far
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        lr = self._set_learning_rates(optimizers, step)

        reconstructions, quantizer_losses, stats, extra_logs = self.reconstruct_batch(batch, step)
        loss, logs = self.loss.generator_loss(images, reconstructions, step)
        loss = loss + sum(quantizer_losses.values())
        optimizers[0].zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_gradients(optimizers[0], gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        optimizers[0].step()
        # Short runs need a short EMA horizon early on: decay ramps up as (1 + t) / (10 + t).
        ema_update(self.ema, self.tokenizer, min(self.ema_decay, (1 + step) / (10 + step)))

        if self.loss.discriminator_active(step):
            d_loss, d_logs = self.loss.discriminator_loss(images, reconstructions.detach(), step)
            optimizers[1].zero_grad(set_to_none=True)  # drops the grads the generator loss left here
            self.manual_backward(d_loss)
            self.clip_gradients(
                optimizers[1], gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm"
            )
            step_without_counting(optimizers[1])
            logs.update(d_logs)

        logs.update(quantizer_losses)
        logs.update(extra_logs)
        logs.update({k: stats[k] for k in ("usage", "perplexity", "kept_tokens") if k in stats})
        self.log_dict({f"train/{k}": v.detach().float() for k, v in logs.items()}, prog_bar=False)
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("lr", lr)

    def reconstruct_batch(self, batch, step: int):
        """The tokenizer on a training batch -> (reconstructions, quantizer losses, stats, extra logs). With
        `module.perturb` the decoder sees perturbed codes, scheduled by step / max_steps; the measured share
        of changed tokens is logged as perturb_rate."""
        if self.perturbation is None:
            return *self.tokenizer(batch["image"]), {}
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 100_000
        record = {}
        hook = self.perturbation.hook(self.tokenizer.code_vectors, min(1.0, step / total), record)
        return *self.tokenizer(batch["image"], perturb=hook), perturbation_logs(record)

    # ---- validation on the EMA weights ---------------------------------------------------------------------
    def on_validation_epoch_start(self):
        self._val = {"psnr": [], "ssim": [], "codes": [], "originals": [], "reconstructions": []}

    def validation_step(self, batch, batch_idx):
        images = batch["image"]
        reconstructions, _, stats = self.ema(images)
        reconstructions = reconstructions.float().clamp(-1, 1)
        self._val["psnr"].append(psnr(reconstructions, images))
        self._val["ssim"].append(ssim(reconstructions, images))
        self._val["codes"].append(stats["codes"].flatten())
        kept = sum(len(x) for x in self._val["originals"])
        if kept < self.grid_images:
            self._val["originals"].append(images[: self.grid_images - kept].cpu())
            self._val["reconstructions"].append(reconstructions[: self.grid_images - kept].cpu())

    def on_validation_epoch_end(self):
        codes = self.all_gather(torch.cat(self._val["codes"])).flatten()
        # A tokenizer with several codebooks per token (fq.py) measures each through `codebook_stats`.
        own_stats = getattr(self.ema, "codebook_stats", None)
        vocab_size = self.ema.token_spec.vocab_size
        histogram = own_stats(codes) if own_stats else code_histogram_stats(codes, vocab_size)
        metrics = {
            "psnr": torch.cat(self._val["psnr"]).mean(),
            "ssim": torch.cat(self._val["ssim"]).mean(),
            "codebook_usage": histogram["usage"],
            "perplexity": histogram["perplexity"],
        }
        self.log_dict({f"val/{k}": v.float() for k, v in metrics.items()}, sync_dist=True, prog_bar=True)

    def val_grids(self) -> dict[str, tuple[torch.Tensor, int]]:
        """Originals and reconstructions interleaved, four pairs per row."""
        originals = torch.cat(self._val["originals"])
        reconstructions = torch.cat(self._val["reconstructions"])
        pairs = torch.stack([originals, reconstructions], dim=1).flatten(0, 1)  # (2K, 3, H, W)
        return {"reconstructions": (pairs, 8)}

    def export_model(self) -> Tokenizer:
        """The EMA tokenizer; one with a post-training step (`prepare_export(train batches) -> report`, e.g.
        TokenBridge's quantiser fit) runs it first, on the training data."""
        prepare = getattr(self.ema, "prepare_export", None)
        trainer = getattr(self, "_trainer", None)
        if prepare is not None and trainer is not None and trainer.datamodule is not None:
            report = prepare(trainer.datamodule.train_dataloader())
            rank_zero_info("prepare_export: " + "  ".join(f"{k}={v:.4g}" for k, v in report.items()))
        return self.ema
