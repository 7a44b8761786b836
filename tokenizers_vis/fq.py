"""FQGAN: "Factorized Visual Tokenization and Generation" (Bai et al., 2024), on TiTok's 1D tokens.

arXiv 2411.16681; official code: showlab/FQGAN (a 2D LlamaGen-style CNN VQGAN).

One large codebook is factorised into G small, independent sub-codebooks. A shared encoder trunk (TiTok's
ViT encoder, titok.py, imported) gives one vector per latent token; each sub-codebook has its own adapter
from that vector to its code space and its own l2-normalised VectorQuantizer (quantizers.py, imported), so
every position carries G token ids. The quantised sub-codes are concatenated, (B, N, G * code_dim), and the
TiTok decoder's input projection maps them to its width. Two extra losses shape what each sub-codebook
learns:

- disentanglement: weight * mean over positions and sub-codebook pairs of cos(q_a, q_b)^2 (0 when the
  sub-codes of a position are orthogonal, `weight` when they coincide);
- representation alignment: a small head maps the FIRST sub-code to the feature of a frozen teacher (DINOv2
  or CLIP through timm, or the project's photos-net on the embedded photos); batch-contrastive InfoNCE:
  each image's prediction must pick its own teacher feature among the batch's.

Deliberate choices (docs/METHODS.md, "FQ: Factorized Quantization"):
- TiTok-style 1D tokens instead of the paper's 2D CNN grid: same encoder and decoder as TiTok; the shared
  encoder output is TiTok's `to_code` map at full width, (B, N, W).
- Adapters: `adapter="mlp"` (default) is LayerNorm -> Linear(W, W) -> GELU -> Linear(W, code_dim) per
  sub-codebook; `"linear"` is one Linear(W, code_dim). The official adapters are 6-layer transformers over
  the CNN grid; here the shared ViT trunk already mixes positions, so a per-position map is enough.
- The concatenation order is sub-codebook 0, 1, ..., G-1; sub-codebook 0 is the semantic one (the one the
  alignment loss trains). The quantiser losses (commitment, codebook) are summed over sub-codebooks, as the
  official code adds its two VQ losses.
- Disentanglement is averaged over the G (G - 1) / 2 pairs, so its maximum is `weight` for any G; it is
  computed on the straight-through sub-codes, so its gradient reaches the adapters and the encoder.
- Alignment is POOLED over the N positions, not per position: TiTok's 1D tokens have no spatial
  correspondence with a teacher's patch grid (token i is not "the patch at i"), the official release also
  aligns one pooled prediction with DINOv2's CLS feature, and photos-net only has a pooled feature. The head
  is a per-position MLP (code_dim -> hidden -> hidden), a mean over positions, then LayerNorm and a linear
  map to the teacher's dimension. InfoNCE over the batch of one rank, cosine logits divided by
  `align_temperature` (1.0, the official value: exp(cos) without a temperature), teacher features
  detached, one direction (each prediction against every teacher feature), as in the official code. Only
  the teacher's forward runs without gradients (docs/METHODS.md: in the official release a no_grad decorator
  silently killed this loss's gradient); here it reaches the adapters and the encoder (tests check it).
- The alignment loss is computed in training mode only (the teacher costs a forward pass, and validation
  does not use the losses); it needs a batch of at least 2 (with 1 image it is a constant).
- Teacher (`teacher`): "none", "photos-net" (training/feature_net.py's classifier of the embedded photos;
  `teacher_weights` is its folder, its pooled features, 256-d by default, are the target), or "timm"
  (`teacher_model`, a timm ViT such as vit_base_patch14_dinov2.lvd142m, the official dinov2-base, created with
  pretrained=False, num_classes=0 and dynamic position embeddings, then loaded strictly from
  `teacher_weights`: a timm-format weights file (.safetensors, .pth, .bin) or a folder holding
  model.safetensors, the layout of a Hugging Face timm repository; its classifier weights, if any, are
  ignored). Images in [-1, 1] go to [0, 1], are resized to `teacher_image_size` and normalised with the
  model's own mean and std; the target is the pooled (CLS) feature. Nothing is downloaded: a missing path
  is a FileNotFoundError naming `paths.fq_teacher`. The teacher is frozen, in eval mode and held OUTSIDE the
  module tree (flextok.py's `Frozen`): not in state_dict() or parameters(), shared by deep copies (the EMA).
  On the meta device (shape-only instantiation, as tests/test_configs.py does for the published sizes)
  there is nothing to load into: the path is checked and the weights are not read.
- Exports drop the alignment head and record teacher="none" (an exported tokenizer never needs the teacher).
- `code_vectors()` raises: a factorized token is a G-tuple of codes whose latent is the concatenation of G
  sub-code vectors, so there is no (V, D) table of one vector per code (LANTERN neighbourhoods and latent
  perturbation assume one). `sub_code_vectors()` returns the per-sub-codebook tables (G, V, code_dim).
- Validation statistics: `codebook_stats(codes)` gives usage and perplexity per sub-codebook, averaged
  (training/tokenizer_module.py calls it when a tokenizer has it); pooling the G codebooks' ids into one
  histogram would mix unrelated codes that share an index. The per-step training stats are the same means.

Published recipes: dual (G = 2) and triple (G = 3) sub-codebooks of 16384 x 8, disentanglement 0.1,
alignment 0.5; rFID 0.94 (dual) / 0.76 (triple) at 16x downsampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Tokens, TokenSpec, register
from .quantizers import VectorQuantizer, code_histogram_stats
from .teachers import Frozen, load_teacher
from .titok import TiTokDecoder, TiTokEncoder, TiTokFamily, titok_shape

TEACHERS = ("none", "photos-net", "timm")
ADAPTERS = ("mlp", "linear")
TEACHER_SETTING = "paths.fq_teacher"


# ---- losses ------------------------------------------------------------------------------------------------
def disentanglement_loss(sub_codes: torch.Tensor, weight: float = 0.1) -> torch.Tensor:
    """sub_codes (..., G, d) -> weight * mean over positions and the G (G - 1) / 2 pairs of cos(q_a, q_b)^2.

    0 for orthogonal sub-codes, `weight` for identical (or opposite) ones; 0 when G = 1."""
    num_codebooks = sub_codes.shape[-2]
    if num_codebooks < 2:
        return sub_codes.new_zeros(())
    unit = F.normalize(sub_codes.float(), dim=-1)
    cosines = unit @ unit.transpose(-1, -2)  # (..., G, G)
    a, b = torch.triu_indices(num_codebooks, num_codebooks, offset=1, device=sub_codes.device)
    return weight * cosines[..., a, b].pow(2).mean()


def info_nce(prediction: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Batch-contrastive loss: prediction (B, D), target (B, D) -> mean over rows of
    -log softmax_j(cos(p_i, t_j) / temperature)[i]; the target is treated as a constant."""
    p = F.normalize(prediction.float(), dim=-1)
    t = F.normalize(target.detach().float(), dim=-1)
    logits = p @ t.t() / temperature  # (B, B)
    return F.cross_entropy(logits, torch.arange(len(p), device=p.device))


# ---- factorized quantiser ----------------------------------------------------------------------------------
@dataclass
class FactorizedOutput:
    quantized: torch.Tensor  # (..., G * d) concatenated straight-through sub-codes, what the decoder reads
    sub_codes: torch.Tensor  # (..., G, d) the same, one row per sub-codebook
    codes: torch.Tensor  # (..., G) long, one id per sub-codebook
    losses: dict[str, torch.Tensor]  # commitment, codebook (summed over sub-codebooks), disentangle
    stats: dict[str, torch.Tensor]  # usage, perplexity (means over sub-codebooks)


def _adapter(kind: str, in_dim: int, code_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, code_dim)
    return nn.Sequential(
        nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, code_dim)
    )


class FactorizedQuantizer(nn.Module):
    """G sub-codebooks, each with its own adapter and l2-normalised VectorQuantizer.

    z (..., in_dim) -> FactorizedOutput(quantized (..., G * d), sub_codes (..., G, d), codes (..., G), ...).
    """

    def __init__(
        self,
        in_dim: int,
        num_codebooks: int = 2,
        codebook_size: int = 16384,
        code_dim: int = 8,
        adapter: str = "mlp",
        l2_normalize: bool = True,
        commitment_weight: float = 0.25,
        disentangle_weight: float = 0.1,
        dead_code_threshold: float = 0.0,
        usage_decay: float = 0.99,
    ):
        super().__init__()
        if num_codebooks < 1:
            raise ValueError(f"FactorizedQuantizer num_codebooks={num_codebooks}; expected >= 1")
        if adapter not in ADAPTERS:
            raise ValueError(f"FactorizedQuantizer adapter={adapter!r}; expected one of {ADAPTERS}")
        self.num_codebooks, self.codebook_size, self.code_dim = num_codebooks, codebook_size, code_dim
        self.disentangle_weight = disentangle_weight
        self.adapters = nn.ModuleList(_adapter(adapter, in_dim, code_dim) for _ in range(num_codebooks))
        self.quantizers = nn.ModuleList(
            VectorQuantizer(
                codebook_size,
                code_dim,
                l2_normalize,
                commitment_weight,
                dead_code_threshold=dead_code_threshold,
                usage_decay=usage_decay,
            )
            for _ in range(num_codebooks)
        )

    def sub_code_vectors(self) -> torch.Tensor:
        """(G, V, d): code_vectors of every sub-codebook."""
        return torch.stack([q.code_vectors() for q in self.quantizers])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., G) long -> (..., G * d) concatenated code vectors."""
        if codes.shape[-1] != self.num_codebooks:
            shape = tuple(codes.shape)
            raise ValueError(f"expected {self.num_codebooks} sub-codes per token, got codes of shape {shape}")
        return torch.cat([q.lookup(codes[..., g]) for g, q in enumerate(self.quantizers)], dim=-1)

    def codebook_stats(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """codes (..., G) -> usage and perplexity of each sub-codebook's histogram, averaged over G."""
        codes = codes.reshape(-1, self.num_codebooks)  # (M, G)
        per_codebook = [code_histogram_stats(codes[:, g], self.codebook_size) for g in range(codes.shape[1])]
        return {k: torch.stack([s[k] for s in per_codebook]).mean() for k in ("usage", "perplexity")}

    def forward(self, z: torch.Tensor) -> FactorizedOutput:
        outputs = [q(adapt(z)) for adapt, q in zip(self.adapters, self.quantizers, strict=True)]
        sub_codes = torch.stack([o.quantized for o in outputs], dim=-2)  # (..., G, d)
        codes = torch.stack([o.codes for o in outputs], dim=-1)  # (..., G)
        losses = {name: sum(o.losses[name] for o in outputs) for name in ("commitment", "codebook")}
        if self.disentangle_weight > 0 and self.num_codebooks > 1:
            losses["disentangle"] = disentanglement_loss(sub_codes, self.disentangle_weight)
        stats = {k: torch.stack([o.stats[k] for o in outputs]).mean() for k in ("usage", "perplexity")}
        return FactorizedOutput(sub_codes.flatten(-2), sub_codes, codes, losses, stats)


# ---- teachers ----------------------------------------------------------------------------------------------
class AlignHead(nn.Module):
    """Sub-codes (B, N, d) -> one pooled prediction (B, D_t) of the teacher's feature."""

    def __init__(self, code_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.token = nn.Sequential(nn.Linear(code_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, out_dim))

    def forward(self, sub_codes: torch.Tensor) -> torch.Tensor:
        return self.out(self.token(sub_codes).mean(dim=1))  # (B, N, d) -> (B, hidden) -> (B, D_t)


# ---- tokenizer ---------------------------------------------------------------------------------------------
@register("fq")
class FQTiTok(TiTokFamily):
    def __init__(
        self,
        image_size: int = 256,
        patch_size: int = 16,
        size: str = "B",
        width: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        num_tokens: int = 256,
        num_codebooks: int = 2,
        codebook_size: int = 16384,
        code_dim: int = 8,
        adapter: str = "mlp",
        l2_normalize: bool = True,
        commitment_weight: float = 0.25,
        dead_code_threshold: float = 0.0,
        usage_decay: float = 0.99,
        disentangle_weight: float = 0.1,
        teacher: str = "none",
        teacher_weights: str | None = None,
        teacher_model: str = "vit_base_patch14_dinov2.lvd142m",
        teacher_image_size: int = 224,
        align_weight: float = 0.5,
        align_hidden: int = 1024,
        align_temperature: float = 1.0,
    ):
        super().__init__()
        if teacher not in TEACHERS:
            raise ValueError(f"FQTiTok teacher={teacher!r}; expected one of {TEACHERS}")
        shape = titok_shape(type(self).__name__, image_size, patch_size, size, width, depth, heads)
        width = shape["width"]
        self.num_tokens, self.num_codebooks, self.codebook_size = num_tokens, num_codebooks, codebook_size
        self.code_dim, self.align_weight, self.align_temperature = code_dim, align_weight, align_temperature
        self.encoder = TiTokEncoder(**shape, num_tokens=num_tokens, code_dim=width)  # shared trunk (B, N, W)
        self.quantizer = FactorizedQuantizer(
            width,
            num_codebooks,
            codebook_size,
            code_dim,
            adapter,
            l2_normalize,
            commitment_weight,
            disentangle_weight,
            dead_code_threshold,
            usage_decay,
        )
        # The decoder's input projection (from_code) maps the concatenated sub-codes to its width.
        self.decoder = TiTokDecoder(**shape, num_tokens=num_tokens, code_dim=num_codebooks * code_dim)

        self._teacher: Frozen | None = None
        self.align_head: AlignHead | None = None
        if teacher != "none":
            module = load_teacher(
                "photos-net" if teacher == "photos-net" else teacher_model,
                teacher_weights,
                TEACHER_SETTING,
                f"FQTiTok teacher={teacher} needs frozen teacher weights",
                image_size=teacher_image_size,
            )
            self._teacher = Frozen(module)
            self.align_head = AlignHead(code_dim, align_hidden, module.num_features)

    # ---- interface -----------------------------------------------------------------------------------------
    @property
    def token_spec(self) -> TokenSpec:
        return TokenSpec(
            "factorized",
            self.num_tokens,
            vocab_size=self.codebook_size,
            code_dim=self.code_dim,
            token_dim=self.num_codebooks,
        )

    def code_vectors(self) -> torch.Tensor:
        raise NotImplementedError(
            "FQTiTok has factorized tokens: a token is a tuple of one code per sub-codebook, whose latent is "
            "the concatenation of the sub-code vectors, so there is no (V, D) table of one vector per code; "
            "sub_code_vectors() gives the (G, V, code_dim) tables of the sub-codebooks"
        )

    def sub_code_vectors(self) -> torch.Tensor:
        """(G, V, code_dim): the vector behind code v of sub-codebook g at [g, v]."""
        return self.quantizer.sub_code_vectors()

    def codebook_stats(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """codes (..., G) (or flattened from that layout) -> usage, perplexity averaged over sub-codebooks."""
        return self.quantizer.codebook_stats(codes)

    def encode(self, images: torch.Tensor) -> Tokens:
        """images (B, 3, H, W) -> Tokens("factorized", codes (B, N, G))"""
        return Tokens("factorized", self.quantizer(self.encoder(images)).codes)

    def decode(self, tokens: Tokens, num_tokens: int | None = None) -> torch.Tensor:
        """Tokens with codes (B, N, G) -> images (B, 3, H, W); `num_tokens=k` decodes the first k tokens."""
        codes = tokens.data if num_tokens is None else tokens.data[:, :num_tokens]  # (B, k, G)
        return self.decoder(self.quantizer.lookup(codes))

    def forward(self, images: torch.Tensor):
        """images (B, 3, H, W) -> (reconstructions (B, 3, H, W), losses, stats)"""
        quantized = self.quantizer(self.encoder(images))
        reconstructions = self.decoder(quantized.quantized)
        losses = dict(quantized.losses)
        if self.align_head is not None and self.training:
            semantic = quantized.sub_codes[..., 0, :]  # (B, N, d): the first sub-codebook's codes
            losses["align"] = self.align_weight * self.alignment_loss(semantic, images)
        return reconstructions, losses, {**quantized.stats, "codes": quantized.codes}

    def alignment_loss(self, semantic: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Unweighted InfoNCE between the head's pooled prediction from `semantic` (B, N, d) and the frozen
        teacher's features of `images`. Only the teacher runs without gradients."""
        if self.align_head is None:
            raise RuntimeError("FQTiTok was built with teacher=none: there is no alignment loss")
        with torch.no_grad():
            target = self._teacher.on(images.device)(images).float()  # (B, D_t)
        prediction = self.align_head(semantic)  # (B, D_t)
        return info_nce(prediction, target, self.align_temperature)

    def save_pretrained(self, folder, **kwargs):
        """Export for inference: without the alignment head, and with teacher=none in config.json."""
        head, config = self.align_head, self.config
        self.align_head = None
        self.config = {**config, "teacher": "none", "teacher_weights": None}
        try:
            return super().save_pretrained(folder, **kwargs)
        finally:
            self.align_head, self.config = head, config
