"""Lightning orchestration for the EAGLE drafter (generators/eagle.py): one layer trained on a frozen target
GPT's own features over the extracted codes.

Per batch of codes (B, N) the frozen target, teacher-forced, gives its final-normed hidden states
f_0 .. f_{N-1} (f_i predicts token i) and its next-token distributions p. The drafter reads the pairs
(token i, f_i + noise) for i = 0 .. N-2 and predicts f^_{i+1}:

    loss = smooth_l1(f^_{i+1}, f_{i+1}) + ce_weight * CE(p_{i+1}, softmax(head(f^_{i+1})))

with the target's frozen head, and uniform noise of std `noise_std` on the input features (EAGLE's recipe).
Two additions, both aimed at what sampling does with the drafter (deliberate choices beyond EAGLE-1):

- guidance_scale s != 1: every sequence runs with its class and with the null class (the two halves of a
  guided batch), the loss above is averaged over both, and a third term, ce_weight * CE(p_s, q_s), compares
  the guided distributions p_s = softmax(l_u + s (l_c - l_u)) of target and drafter: speculative sampling
  at guidance s accepts by q_s, so that is the distribution the drafter must match (the halves' own
  errors add up through the 2 l_c - l_u of s = 2).
- unroll k > 1: the drafter is also run on its own predictions, k - 1 times: pass j reads (token i,
  f^(j-1)_i) where pass 1 read (token i, f_i), and every pass is trained towards the true next feature.
  Drafting gamma tokens feeds the drafter its own features for every draft after the first; trained only
  on true features (EAGLE-1) its later drafts are accepted less (EAGLE-3's training-time test, here in its
  simplest, parallel form: every earlier position of pass j also holds a prediction).

Validation reports the loss and `val/acceptance`: the mean over positions of sum_x min(p(x), q(x)) (of the
guided distributions when s != 1), the probability that exact speculative sampling accepts a one-step draft.

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

from .callbacks import FlopsPerBatch, measure_training_flops, training_sequences
from .optim import param_groups, warmup_cosine


class EagleModule(FlopsPerBatch, L.LightningModule):
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
        guidance_scale: float = 1.0,
        unroll: int = 1,
    ):
        super().__init__()
        if noise_std < 0 or ce_weight < 0:
            raise ValueError(f"module.noise_std={noise_std}, module.ce_weight={ce_weight}; expected >= 0")
        if unroll < 1:
            raise ValueError(f"module.unroll={unroll}; expected >= 1 drafter passes per training step")
        target = from_pretrained(target_path).requires_grad_(False).eval()
        if not hasattr(target, "forward_prefix"):
            raise ValueError(f"module.target_path={target_path} is not an exported GPT")
        self.drafter = EagleDrafter.for_target(target, heads)
        self._frozen = {"target": target}  # a plain dict: as a submodule it would enter every checkpoint
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.noise_std, self.ce_weight = noise_std, ce_weight
        self.guidance_scale, self.unroll = guidance_scale, unroll

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
        super().setup(stage)  # FlopsPerBatch: measures a training batch when fitting starts

    def measure_flops_per_batch(self) -> int | None:
        """FLOPs of one training batch (`losses`: the frozen target's forward, the drafter's `unroll` passes
        forward + backward) on two of the training sequences."""
        sequences = training_sequences(self.trainer.datamodule, self.device)
        if sequences is None:
            return None
        tokens, labels, batch_size = sequences
        return measure_training_flops(
            lambda: self.losses(tokens, labels, noise=True)["loss"], [self.drafter], len(tokens), batch_size
        )

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
        guided = self.guidance_scale != 1.0
        with torch.no_grad():
            if guided:  # the conditional and unconditional halves of a guided batch
                labels = torch.cat([labels, torch.full_like(labels, target.null_class)])
                tokens = torch.cat([tokens, tokens])
            elif noise and target.label_dropout > 0:  # the unconditional features guidance needs
                drop = torch.rand(labels.shape, device=labels.device) < target.label_dropout
                labels = labels.masked_fill(drop, target.null_class)
            features = target.forward_prefix(tokens[:, :-1], labels)  # (B*, N, D): f_0 .. f_{N-1}
            p_logits = target.logits(features[:, 1:]).float()  # (B*, N-1, V): tokens 1 .. N-1
        inputs = features[:, :-1]
        regression = cross_entropy = 0.0
        one_step = None  # (p, q) logits of the first pass: the acceptance of a one-step draft
        for _ in range(self.unroll):
            if noise and self.noise_std > 0:
                half_width = self.noise_std * math.sqrt(3.0)  # U(-a, a) has std a / sqrt(3)
                inputs = inputs + (torch.rand_like(inputs) * 2 - 1) * half_width
            predicted = self.drafter(tokens[:, :-1], inputs)  # (B*, N-1, D): f^_1 .. f^_{N-1}
            q_logits = self.drafter.logits(predicted).float()
            regression = regression + F.smooth_l1_loss(predicted.float(), features[:, 1:].float())
            cross_entropy = cross_entropy + soft_cross_entropy(p_logits, q_logits)
            pair = (p_logits, q_logits)
            if guided:
                pair = (self.guide(p_logits), self.guide(q_logits))
                cross_entropy = cross_entropy + soft_cross_entropy(*pair)
            one_step = one_step or pair
            # the next pass reads this one's predictions (position 0 keeps the true f_0)
            inputs = torch.cat([features[:, :1], predicted[:, :-1]], dim=1)
        regression, cross_entropy = regression / self.unroll, cross_entropy / self.unroll
        acceptance = torch.minimum(one_step[0].softmax(-1), one_step[1].softmax(-1)).sum(-1).mean()
        total = regression + self.ce_weight * cross_entropy
        return {
            "loss": total,
            "regression": regression,
            "cross_entropy": cross_entropy,
            "acceptance": acceptance,
        }

    def guide(self, logits: torch.Tensor) -> torch.Tensor:
        """Stacked [conditional; unconditional] logits (2B, ...) -> guided logits (B, ...)."""
        cond, uncond = logits.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

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


def soft_cross_entropy(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of CE(softmax(target_logits), softmax(logits))."""
    return -(target_logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
