"""Lightning orchestration for the EAGLE drafter (generators/eagle.py): one layer trained on a frozen target
GPT's own features over the extracted codes.

Per batch of codes (B, N) the frozen target, teacher-forced, gives its final-normed hidden states
f_0 .. f_{N-1} (f_i predicts token i) and its next-token distributions; labels are dropped with the target's
own label_dropout, so the drafter also learns the unconditional features guidance runs on. The drafter
reads the pairs (token i, f_i + noise) for i = 0 .. N-2 and predicts f^_{i+1}:

    loss = smooth_l1(f^_{i+1}, f_{i+1}) + ce_weight * CE(softmax(head(f_{i+1})), head(f^_{i+1}))

with the target's frozen head, and uniform noise of std `noise_std` on the input features (EAGLE's recipe).
Validation reports the loss and `val/acceptance`: the mean of sum_x min(p(x), q(x)) over positions, the
probability that exact speculative sampling accepts a one-step draft (what the drafter is for).

The target is loaded from `target_path` (an exported GPT) and kept out of the checkpoint; the export is the
drafter alone (config.json records the target's config, which `bind` checks at sampling time).
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from generators.eagle import EagleDrafter
from tokenizers_vis.base import from_pretrained

from .optim import param_groups, warmup_cosine


class EagleModule(L.LightningModule):
    def __init__(
        self,
        target_path: str,
        heads: int | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        noise_std: float = 0.2,
        ce_weight: float = 0.1,
    ):
        super().__init__()
        if noise_std < 0 or ce_weight < 0:
            raise ValueError(f"module.noise_std={noise_std}, module.ce_weight={ce_weight}; expected >= 0")
        target = from_pretrained(target_path).requires_grad_(False).eval()
        if not hasattr(target, "forward_prefix"):
            raise ValueError(f"module.target_path={target_path} is not an exported GPT")
        self.drafter = EagleDrafter.for_target(target, heads)
        self._frozen = {"target": target}  # a plain dict: as a submodule it would enter every checkpoint
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.noise_std, self.ce_weight = noise_std, ce_weight

    @property
    def target(self):
        return self._frozen["target"]

    def check_data(self, datamodule) -> None:
        spec, config = datamodule.token_spec, self.target.config
        for key in ("vocab_size", "num_tokens"):
            if spec[key] != config[key]:
                raise ValueError(
                    f"the target GPT has {key}={config[key]} but the codes in {datamodule.codes_dir} "
                    f"have {key}={spec[key]}: train the drafter on the target's own codes"
                )

    def setup(self, stage: str) -> None:
        self.target.to(self.device)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            param_groups(self.drafter, self.weight_decay), lr=self.lr, betas=self.betas
        )
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 100_000
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(self.warmup_steps, total, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def losses(self, tokens: torch.Tensor, labels: torch.Tensor, noise: bool) -> dict[str, torch.Tensor]:
        """tokens (B, N), labels (B,) -> regression, cross-entropy, total loss and acceptance (scalars)."""
        target = self.target.to(tokens.device)
        with torch.no_grad():
            if noise and target.label_dropout > 0:  # the unconditional features guidance needs
                drop = torch.rand(labels.shape, device=labels.device) < target.label_dropout
                labels = labels.masked_fill(drop, target.null_class)
            features = target.forward_prefix(tokens[:, :-1], labels)  # (B, N, D): f_0 .. f_{N-1}
            p = target.logits(features[:, 1:]).float().softmax(-1)  # (B, N-1, V): tokens 1 .. N-1
        inputs = features[:, :-1]
        if noise and self.noise_std > 0:
            half_width = self.noise_std * math.sqrt(3.0)  # U(-a, a) has std a / sqrt(3)
            inputs = inputs + (torch.rand_like(inputs) * 2 - 1) * half_width
        predicted = self.drafter(tokens[:, :-1], inputs)  # (B, N-1, D): f^_1 .. f^_{N-1}
        regression = F.smooth_l1_loss(predicted.float(), features[:, 1:].float())
        log_q = self.drafter.logits(predicted).float().log_softmax(-1)
        cross_entropy = -(p * log_q).sum(-1).mean()
        acceptance = torch.minimum(p, log_q.exp()).sum(-1).mean()
        total = regression + self.ce_weight * cross_entropy
        return {
            "loss": total,
            "regression": regression,
            "cross_entropy": cross_entropy,
            "acceptance": acceptance,
        }

    def training_step(self, batch, batch_idx):
        losses = self.losses(batch["tokens"], batch["label"], noise=True)
        self.log("train/loss", losses["loss"], prog_bar=True)
        self.log("train/acceptance", losses["acceptance"], prog_bar=True)
        return losses["loss"]

    def validation_step(self, batch, batch_idx):
        losses = self.losses(batch["tokens"], batch["label"], noise=False)
        size = len(batch["label"])
        for name in ("loss", "regression", "cross_entropy", "acceptance"):
            self.log(
                f"val/{name}",
                losses[name],
                prog_bar=name in ("loss", "acceptance"),
                sync_dist=True,
                batch_size=size,
            )

    def export_model(self) -> torch.nn.Module:
        return self.drafter
