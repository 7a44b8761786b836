"""Decoder post-training: RobusTok, "Image Tokenizer Needs Post-Training" (Qiu et al. 2025, 2509.12474).

A tokenizer's decoder only ever saw the encoder's codes, but at generation time it decodes a generator's
samples, whose errors are of another kind. Post-training fine-tunes the decoder on tokens the trained
generator produces and maps them back to the ORIGINAL images, so the decoder learns to absorb the
generator's typical mistakes (RAR-B gFID 1.83 -> 1.60 in the paper).

For each batch of images (and class labels):
  1. codes = tokenizer.encode(images) (B, N), with the encoder and quantiser frozen;
  2. the frozen generator runs teacher-forced on the true codes (GPT forward with the labels, eval mode, no
     gradient), so position i is predicted from the TRUE prefix codes[:, :i];
  3. at each position the true code is kept with probability `keep_prob` (0.7, docs/METHODS.md, "Latent
     perturbation, pFID and decoder post-training"), otherwise it is replaced by a token sampled from the
     generator's distribution at that position (temperature `temperature`, no top-k/top-p, no guidance:
     the conditional model alone);
  4. the decoder decodes the mixed tokens (`tokenizer.decode`) and is trained toward the original images
     with the usual reconstruction loss (pixel, optional perceptual and GAN: `module.loss`).

Deliberate choices:
- A subclass of TokenizerModule that replaces only the batch forward (`reconstruct_batch`): optimiser, LR
  schedule, GAN alternation, EMA, validation and export are stage 1's. The export is therefore the FULL
  tokenizer (the frozen encoder and quantiser, the fine-tuned EMA decoder) in the usual folder format, so
  scripts/evaluate.py and scripts/sample.py use it unchanged.
- Everything but `tokenizer.decoder` has requires_grad False (the optimiser never sees it), and the
  encoder and quantiser are kept in eval mode at every step, so a VQ quantiser's dead-code restarts never
  touch the codebook. Validation reports plain reconstruction (encoder codes), as stage 1 does.
- A sampled token may equal the true code; `train/kept_true` logs the share of positions kept by the
  coin (about keep_prob), `train/token_agreement` the share equal to the true codes (>= kept_true).
- The generator is held outside the module tree (not in checkpoints, no optimiser, no EMA) and follows the
  module's device on first use. Both exports are loaded at construction: a missing folder is a
  FileNotFoundError naming `module.tokenizer_path` / `module.generator_path`.
- The tokenizer's decode must be differentiable (TiTok, One-D-Piece; One-D-Piece decodes all N tokens
  here, without tail drop). FlexTok decodes by sampling without gradient and is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tokenizers_vis.base import Tokens, from_pretrained
from tokenizers_vis.losses import ReconstructionLoss
from tokenizers_vis.quantizers import code_histogram_stats

from .tokenizer_module import TokenizerModule


def load_export(path, setting: str, hint: str) -> nn.Module:
    """from_pretrained(path), or a FileNotFoundError naming the config `setting` that points at it."""
    if path is None or not (Path(path) / "config.json").is_file():
        if path is None:
            problem = "is not set"
        elif not Path(path).exists():
            problem = "does not exist"
        else:
            problem = "is not an exported model (no config.json)"
        raise FileNotFoundError(f"{setting}={None if path is None else str(path)!r} {problem} ({hint})")
    return from_pretrained(path)


@torch.no_grad()
def teacher_forced_mix(
    generator: nn.Module,
    codes: torch.Tensor,
    labels: torch.Tensor,
    keep_prob: float = 0.7,
    temperature: float = 1.0,
    rng: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (B, N) long, labels (B,) -> (mixed (B, N), kept (B, N) bool).

    The generator predicts every position from the true prefix in one teacher-forced pass; each position
    keeps its true code with probability keep_prob, else takes a sample of the predicted distribution."""
    hidden = generator(codes, labels)  # (B, N, D); hidden[:, i] predicts codes[:, i] from codes[:, :i]
    logits = generator.logits(hidden).float() / temperature  # (B, N, V)
    probs = logits.softmax(-1).flatten(0, 1)  # (B N, V)
    sampled = torch.multinomial(probs, 1, generator=rng).view_as(codes)  # (B, N)
    kept = torch.rand(codes.shape, device=codes.device, generator=rng) < keep_prob  # (B, N)
    return torch.where(kept, codes, sampled), kept


class DecoderPosttrainModule(TokenizerModule):
    def __init__(
        self,
        tokenizer_path: str | None,
        generator_path: str | None,
        loss: ReconstructionLoss,
        keep_prob: float = 0.7,
        temperature: float = 1.0,
        **settings,
    ):
        tokenizer = load_export(
            tokenizer_path,
            "module.tokenizer_path",
            "an exported tokenizer: train.py +experiment=titok_quickstart",
        )
        generator = load_export(
            generator_path,
            "module.generator_path",
            "an exported generator: train.py +experiment=gpt_quickstart",
        )
        if not 0 <= keep_prob <= 1 or temperature <= 0:
            raise ValueError(f"module.keep_prob={keep_prob} must lie in [0, 1], module.temperature > 0")
        spec, config = tokenizer.token_spec, generator.config
        if spec.kind != "categorical" or config.get("token_kind", "categorical") != "categorical":
            raise ValueError(
                "post-training samples categorical codes; the tokenizer or generator has another kind"
            )
        for key, value in (("vocab_size", spec.vocab_size), ("num_tokens", spec.num_tokens)):
            if config[key] != value:
                raise ValueError(
                    f"module.generator_path: the generator has {key}={config[key]}, the tokenizer of "
                    f"module.tokenizer_path {value}: they were not trained together"
                )
        if not isinstance(getattr(tokenizer, "decoder", None), nn.Module):
            raise ValueError(
                f"post-training needs a tokenizer with a `decoder`; {type(tokenizer).__name__} has none"
            )
        tokenizer.train().requires_grad_(False)  # from_pretrained returns eval mode; the decoder trains
        tokenizer.decoder.requires_grad_(True)
        super().__init__(tokenizer, loss, **settings)
        self.tokenizer_path, self.generator_path = str(tokenizer_path), str(generator_path)
        self.keep_prob, self.temperature = keep_prob, temperature
        # A plain dict, not a submodule: the frozen generator stays out of checkpoints, optimiser and EMA.
        self._frozen = {"generator": generator.requires_grad_(False).eval()}

    def check_data(self, datamodule) -> None:
        """The labels must be the generator's classes; say which setting to fix if not."""
        classes = self._frozen["generator"].config["num_classes"]
        found = getattr(datamodule, "num_classes", classes)
        if found != classes:
            raise ValueError(
                f"the data has {found} classes but the generator of module.generator_path was trained on "
                f"{classes}: use the data it was trained on"
            )

    @property
    def generator(self) -> nn.Module:
        generator = self._frozen["generator"]
        if next(generator.parameters()).device != self.device:
            generator.to(self.device)
        return generator.eval()

    def _freeze_modes(self) -> None:
        for name, child in self.tokenizer.named_children():
            if name != "decoder":
                child.eval()

    def reconstruct_batch(self, batch, step: int):
        """Encode (frozen), mix true and generator-sampled codes, decode with gradient to the decoder only."""
        images, labels = batch["image"], batch["label"]  # (B, 3, H, W), (B,)
        size = self.tokenizer.config.get("image_size")
        if size is not None and images.shape[-1] != size:
            raise ValueError(
                f"data.resolution gives {images.shape[-1]}px images; the tokenizer takes {size}px"
            )
        self._freeze_modes()
        with torch.no_grad():
            tokens = self.tokenizer.encode(images)  # codes (B, N)
            mixed, kept = teacher_forced_mix(
                self.generator, tokens.data, labels, self.keep_prob, self.temperature
            )
        reconstructions = self.tokenizer.decode(Tokens(tokens.kind, mixed, tokens.lengths, tokens.grid))
        if not reconstructions.requires_grad:
            raise ValueError(
                f"{type(self.tokenizer).__name__}.decode is not differentiable (it samples): post-training "
                "needs a decoder that maps codes to pixels directly (TiTok, One-D-Piece)"
            )
        stats = {"codes": tokens.data, **code_histogram_stats(mixed, self.tokenizer.token_spec.vocab_size)}
        logs = {
            "kept_true": kept.float().mean(),
            "token_agreement": (mixed == tokens.data).float().mean(),
        }
        return reconstructions, {}, stats, logs
