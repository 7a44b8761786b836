"""FlexTok: "Resampling Images into 1D Token Sequences of Flexible Length" (Bachmann et al., ICML 2025).

An encoder reads [first-stage patches + R learnable register tokens] with a mask under which patches attend
among themselves and registers attend to every patch and causally to earlier registers; the register
outputs are FSQ-quantised into R codes. Training drops every register after a random keep_k (nested
dropout, replaced by one learned mask token), so any prefix of the code sequence describes the image
coarse to fine. The decoder is a rectified-flow transformer that denoises the first-stage patches
conditioned on the (possibly masked) registers; `decode(tokens, num_tokens=k)` samples an image from the
first k codes. The authors released inference code only; this training code follows the paper and
docs/METHODS.md, "FlexTok".

Deliberate choices (docs/METHODS.md marks several details [unverified]; what is chosen here is stated):
- First stage, `first_stage`: "vae" (the paper: a frozen f8 diffusers `AutoencoderKL`, 2x2 patches on its
  latents, latents scaled as (z - shift_factor) * scaling_factor, encoded with the posterior mean so that
  `encode` is deterministic) or "pixels" (patches of the image itself: the CPU quickstart). The VAE is read
  from the local folder `vae_path` in `__init__` (never downloaded; a missing folder is a one-line error
  naming `paths.flextok_vae`) and kept OUT of the module tree: it is not in `state_dict()` (exports stay
  small), not in `parameters()` (no optimiser, no EMA), and deep copies (the training module's EMA) share
  it. It follows the tokenizer's device on first use. An exported model therefore records `vae_path` in
  config.json and needs that folder to load.
- Learned registers and patch positions start at unit scale, not ViT's 0.02: at 0.02 they drown in the
  patch embeddings, the registers stay near-identical and the codes carry colours but no layout.
- Encoder mask [unverified mask mode]: an explicit boolean SDPA mask, patches <-> patches, registers ->
  all patches, register i -> registers <= i (the official "causal_last" prefix-LM packing); patches never
  read registers. Blocks are pre-norm, SDPA attention, timm's Mlp (GELU-tanh); head dim 64 in the d presets.
- FSQ levels [8, 8, 8, 5, 5, 5] (64,000 codes) by default; codes are mixed-radix indices (quantizers.py).
- Nested dropout, `nested_dropout`: "uniform" (keep_k ~ U{1..R}), "pow2" (keep_k uniform over the
  powers of two 1, 2, 4, .., R: the paper's final choice [unverified], the default) or "pow2_ceil"
  (U{1..R} rounded up to a power of two). The mask token replaces registers in the decoder's width space,
  after quantisation and the decoder's input projection; every register (masked or not) then gets its
  position embedding.
- Decoder: rectified flow with x_t = (1 - t) * x0 + t * noise (t = 1 is pure noise) and velocity target
  v = noise - x0; timesteps logit-normal (sigmoid of N(timestep_mean, timestep_std)); loss = MSE on v.
  `prediction`: "v" (the paper: the trunk outputs the velocity) or "x" (the trunk outputs a clean
  estimate x0_hat and v = (x_t - x0_hat) / max(t, min_time); the loss stays the MSE on v. Li & He 2025,
  "Back to Basics: Let Denoising Generative Models Denoise", show x-prediction is what lets small or
  pixel-space flow transformers work; the CPU quickstart uses it). `pure_noise_prob` sets that share of
  the training timesteps to exactly t = 1, where the Euler sampler starts and logit-normal draws never go.
  A DiT-style trunk over [noised patches + registers] with full attention and AdaLN-zero: a sinusoidal
  embedding of 1000 t -> MLP -> per-block shift/scale/gate (one modulation shared by patches and
  registers; the official code may modulate the two separately [unverified]), zero-initialised output.
- Classifier-free guidance: with probability `register_dropout` (0.1) a training sample's registers are
  all replaced by the mask token (keep_k = 0); at inference v = v_null + s * (v_cond - v_null), and s = 1
  runs the conditional pass only. The official inference also offers "norm guidance" (APG, scale 7.5 in
  its README); it is not implemented here.
- Sampler: plain Euler from t = 1 to 0 on a uniform grid with `num_steps` steps (no timestep shift);
  `decode(..., generator=)` makes the noise reproducible. `forward` in eval mode samples with a fixed seed
  (0), so validation PSNR is reproducible.
- REPA (optional, off by default): with `repa_weights` set to a timm weights file of `repa_teacher`,
  the patch features after decoder block `repa_layer` (default depth // 3 [unverified]) go through a
  3-layer SiLU MLP and are aligned to the frozen teacher's patch features (bilinearly resized to the
  decoder grid) with loss `repa_weight * (1 - cos)`. Teacher and weight are [unverified] for FlexTok; the
  default teacher is DINOv2-L at 224px. `repa_teacher="photos-net"` uses instead the project's classifier
  of the embedded photos (training/feature_net.py; `repa_weights` is its folder) and its activation map at
  the decoder's grid size (the deepest stage, when none matches), so the CPU quickstart can have REPA too.
  The teacher is held like the VAE; the projection head is dropped from exports (`save_pretrained`).
- `forward` returns (reconstructions, losses, stats). Training: losses = {"flow"(, "repa")}, and the
  reconstructions are the one-step estimate x0_hat = x_t - t * v_pred decoded to pixels, DETACHED and
  computed without gradients (for logging: pixel, perceptual and GAN weights must be 0; the flow loss
  trains the model). Eval: the full sampler's output from all R codes, losses {}. Stats: codes, usage,
  perplexity, kept_tokens (mean keep_k).

Size presets (width / depth / heads; FlexTok names models by depth, width = 64 * depth): tiny 64/2/4 for
CPUs and tests, d12 768/12/12, d18 1152/18/18, d28 1792/28/28. Published pairs: d12-d12, d18-d18,
d18-d28 (`FlexTok.from_preset("d18-d28")`).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp
from torch import nn

from .base import Tokenizer, Tokens, TokenSpec, register
from .quantizers import FSQuantizer
from .teachers import Frozen, load_teacher, required_path

FLEXTOK_SIZES = {
    "tiny": dict(width=64, depth=2, heads=4),
    "d12": dict(width=768, depth=12, heads=12),
    "d18": dict(width=1152, depth=18, heads=18),
    "d28": dict(width=1792, depth=28, heads=28),
}
FIRST_STAGES = ("pixels", "vae")
NESTED_DROPOUT_RULES = ("uniform", "pow2", "pow2_ceil")
PREDICTIONS = ("v", "x")


# ---- nested dropout ----------------------------------------------------------------------------------------
def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... up to n, plus n itself when it is not a power of two."""
    values = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return values if values[-1] == n else [*values, n]


def sample_keep_k(
    batch_size: int,
    num_registers: int,
    rule: str = "pow2",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B,) long, how many leading registers each sample keeps, in 1..R.

    uniform: U{1..R}; pow2: uniform over powers_of_two(R); pow2_ceil: U{1..R} rounded up to a power of two
    (capped at R), which favours long prefixes (P(R) = 1/2 for R a power of two).
    """
    if rule not in NESTED_DROPOUT_RULES:
        raise ValueError(f"nested_dropout={rule!r}; expected one of {NESTED_DROPOUT_RULES}")
    if rule == "pow2":
        choices = torch.tensor(powers_of_two(num_registers), device=device)
        picks = torch.randint(0, len(choices), (batch_size,), generator=generator, device=device)
        return choices[picks]
    keep = torch.randint(1, num_registers + 1, (batch_size,), generator=generator, device=device)
    if rule == "pow2_ceil":
        exponent = torch.ceil(torch.log2(keep.double())).long()
        keep = torch.clamp(torch.pow(2, exponent), max=num_registers)
    return keep


def apply_nested_dropout(
    registers: torch.Tensor, keep_k: torch.Tensor, mask_token: torch.Tensor
) -> torch.Tensor:
    """registers (B, R, W), keep_k (B,) in 0..R, mask_token (W,) -> (B, R, W), row b's registers at
    positions >= keep_k[b] replaced by the mask token (keep_k = 0: every register masked, the CFG null)."""
    keep = torch.arange(registers.shape[1], device=registers.device) < keep_k.to(registers.device)[:, None]
    return torch.where(keep[..., None], registers, mask_token.to(registers.dtype))


def encoder_attention_mask(num_patches: int, num_registers: int, device=None) -> torch.Tensor:
    """(P + R, P + R) bool, True = query row may attend to key column: patches <-> patches, registers ->
    all patches, register i -> registers j <= i; patches never read registers."""
    size = num_patches + num_registers
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[:, :num_patches] = True
    mask[num_patches:, num_patches:] = torch.ones(num_registers, num_registers, device=device).tril().bool()
    return mask


# ---- flow matching helpers ---------------------------------------------------------------------------------
def logit_normal_timesteps(
    batch_size: int, mean: float = 0.0, std: float = 1.0, generator=None, device=None
) -> torch.Tensor:
    """(B,) t = sigmoid(mean + std * N(0, 1)) in (0, 1) (Esser et al. 2024, SD3)."""
    return torch.sigmoid(mean + std * torch.randn(batch_size, generator=generator, device=device))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """(B,) -> (B, dim) sinusoidal embedding of 1000 t (DiT's convention, t in [0, 1])."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p p C)"""
    return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(x: torch.Tensor, patch_size: int, grid: int) -> torch.Tensor:
    """(B, grid^2, p p C) -> (B, C, grid p, grid p)"""
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=grid, p=patch_size, q=patch_size)


def _embedding(*shape: int, std: float = 0.02) -> nn.Parameter:
    return nn.Parameter(std * torch.randn(*shape))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# ---- transformer -------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block with SDPA attention (optional boolean mask) and optional AdaLN-zero."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, adaln: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=not adaln, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=not adaln, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.modulation = nn.Linear(width, 6 * width) if adaln else None
        if adaln:  # AdaLN-zero: every block starts as the identity
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)

    def attention(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, L, head_dim) each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, L, head_dim)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.modulation is None:
            x = x + self.attention(self.norm1(x), mask)  # (B, L, W)
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond))[:, None].chunk(6, -1)
        x = x + gate1 * self.attention(_modulate(self.norm1(x), shift1, scale1), mask)  # (B, L, W)
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FlexTokEncoder(nn.Module):
    """First-stage patches + R registers -> (B, R, code_dim) pre-quantisation register outputs."""

    def __init__(
        self, in_channels, grid, patch_size, width, depth, heads, mlp_ratio, num_registers, code_dim
    ):
        super().__init__()
        self.patch_size, self.num_patches = patch_size, grid * grid
        self.patch_embed = nn.Linear(patch_size * patch_size * in_channels, width)
        # Unit scale, not ViT's usual 0.02: the patch embeddings have std ~0.3-0.6, and registers or positions
        # 50x smaller than that are swamped by the first attention output. The registers then start (and
        # stay) near-identical, all summarising the image's colours, and no layout reaches the codes (see
        # test_flextok.py::test_registers_start_distinct_and_patches_know_their_position).
        self.patch_pos = _embedding(self.num_patches, width, std=1.0)
        self.registers = _embedding(num_registers, width, std=1.0)  # each register its own learned vector
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.to_code = nn.Linear(width, code_dim)
        self.register_buffer(
            "attn_mask", encoder_attention_mask(self.num_patches, num_registers), persistent=False
        )

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(patchify(x0, self.patch_size)) + self.patch_pos  # (B, P, W)
        x = torch.cat([patches, self.registers.expand(x0.shape[0], -1, -1)], dim=1)  # (B, P + R, W)
        for block in self.blocks:
            x = block(x, self.attn_mask)
        return self.to_code(self.norm(x[:, self.num_patches :]))  # (B, R, code_dim)


class FlexTokDecoder(nn.Module):
    """Rectified-flow velocity model: (x_t (B, C, h, w), registers (B, R, W), t (B,)) -> v (B, C, h, w)."""

    def __init__(
        self,
        in_channels,
        grid,
        patch_size,
        width,
        depth,
        heads,
        mlp_ratio,
        num_registers,
        code_dim,
        freq_dim=256,
    ):
        super().__init__()
        self.patch_size, self.grid, self.num_patches = patch_size, grid, grid * grid
        self.num_registers, self.freq_dim = num_registers, freq_dim
        self.patch_embed = nn.Linear(patch_size * patch_size * in_channels, width)
        self.patch_pos = _embedding(self.num_patches, width, std=1.0)  # unit scale: see FlexTokEncoder
        self.from_code = nn.Linear(code_dim, width)
        self.mask_token = _embedding(width)
        self.register_pos = _embedding(num_registers, width)
        self.time_embed = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, adaln=True) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Linear(width, 2 * width)
        self.to_velocity = nn.Linear(width, patch_size * patch_size * in_channels)
        for layer in (self.out_modulation, self.to_velocity):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed_registers(self, code_vectors: torch.Tensor, keep_k: torch.Tensor) -> torch.Tensor:
        """code_vectors (B, N, code_dim), N <= R; keep_k (B,) -> (B, R, W) with positions >= keep_k (and
        >= N) set to the mask token."""
        registers = self.from_code(code_vectors)  # (B, N, W)
        batch, n, width = registers.shape
        if n < self.num_registers:
            pad = self.mask_token.to(registers.dtype).expand(batch, self.num_registers - n, width)
            registers = torch.cat([registers, pad], dim=1)  # (B, R, W)
        return apply_nested_dropout(registers, keep_k, self.mask_token)

    def null_registers(self, batch_size: int) -> torch.Tensor:
        """(B, R, W) every register masked: the classifier-free guidance null condition."""
        return self.mask_token.expand(batch_size, self.num_registers, -1)

    def forward(
        self, x_t: torch.Tensor, registers: torch.Tensor, t: torch.Tensor, feature_layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (velocity (B, C, h, w), patch features after block `feature_layer` (B, P, W) or None)"""
        cond = self.time_embed(
            timestep_embedding(t, self.freq_dim).to(self.time_embed[0].weight.dtype)
        )  # (B, W)
        patches = self.patch_embed(patchify(x_t, self.patch_size)) + self.patch_pos  # (B, P, W)
        x = torch.cat([patches, registers + self.register_pos], dim=1)  # (B, P + R, W)
        features = None
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, None, cond)
            if i == feature_layer:
                features = x[:, : self.num_patches]
        shift, scale = self.out_modulation(F.silu(cond))[:, None].chunk(2, -1)  # (B, 1, W) each
        v = self.to_velocity(_modulate(self.norm_out(x[:, : self.num_patches]), shift, scale))  # (B, P, ppC)
        return unpatchify(v, self.patch_size, self.grid), features


# ---- the tokenizer -----------------------------------------------------------------------------------------
@register("flextok")
class FlexTok(Tokenizer):
    fsdp_blocks = (Block,)

    def __init__(
        self,
        image_size: int = 256,
        first_stage: str = "vae",
        vae_path: str | None = None,
        patch_size: int | None = None,
        size: str = "d18",
        decoder_size: str | None = None,
        width: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        decoder_width: int | None = None,
        decoder_depth: int | None = None,
        decoder_heads: int | None = None,
        mlp_ratio: float = 4.0,
        num_registers: int = 256,
        levels: tuple[int, ...] | list[int] = (8, 8, 8, 5, 5, 5),
        nested_dropout: str = "pow2",
        register_dropout: float = 0.1,
        timestep_mean: float = 0.0,
        timestep_std: float = 1.0,
        prediction: str = "v",
        min_time: float = 0.05,
        pure_noise_prob: float = 0.0,
        num_steps: int = 25,
        guidance_scale: float = 1.0,
        repa_weights: str | None = None,
        repa_teacher: str = "vit_large_patch14_dinov2",
        repa_image_size: int = 224,
        repa_layer: int | None = None,
        repa_weight: float = 1.0,
        repa_hidden: int = 2048,
    ):
        super().__init__()
        decoder_size = decoder_size or size
        for name in (size, decoder_size):
            if name not in FLEXTOK_SIZES:
                raise ValueError(f"FlexTok size={name!r}; expected one of {sorted(FLEXTOK_SIZES)}")
        if first_stage not in FIRST_STAGES:
            raise ValueError(f"FlexTok first_stage={first_stage!r}; expected one of {FIRST_STAGES}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"FlexTok prediction={prediction!r}; expected one of {PREDICTIONS}")
        if nested_dropout not in NESTED_DROPOUT_RULES:
            raise ValueError(
                f"FlexTok nested_dropout={nested_dropout!r}; expected one of {NESTED_DROPOUT_RULES}"
            )
        enc, dec = FLEXTOK_SIZES[size], FLEXTOK_SIZES[decoder_size]
        width, depth, heads = width or enc["width"], depth or enc["depth"], heads or enc["heads"]
        decoder_width = decoder_width or dec["width"]
        decoder_depth = decoder_depth or dec["depth"]
        decoder_heads = decoder_heads or dec["heads"]
        patch_size = patch_size or (2 if first_stage == "vae" else 16)  # 16 px either way
        levels = [int(level) for level in levels]  # plain ints: Hydra passes a ListConfig
        repa_layer = repa_layer or max(1, decoder_depth // 3)
        if not 1 <= repa_layer <= decoder_depth:
            raise ValueError(f"FlexTok repa_layer={repa_layer} outside 1..{decoder_depth}")
        self.num_registers, self.levels, self.prediction, self.min_time = (
            num_registers,
            levels,
            prediction,
            min_time,
        )
        self.num_steps, self.guidance_scale, self.repa_layer = num_steps, guidance_scale, repa_layer

        # First stage: pixels, or a frozen VAE kept outside the module tree (module docstring).
        self._vae: Frozen | None = None
        channels, downsample = 3, 1
        self.latent_scale, self.latent_shift = 1.0, 0.0
        if first_stage == "vae":
            self._vae = Frozen(_load_vae(vae_path))
            vae_config = self._vae.module.config
            channels = vae_config.latent_channels
            downsample = 2 ** (len(vae_config.block_out_channels) - 1)
            self.latent_scale = float(vae_config.scaling_factor)
            self.latent_shift = float(getattr(vae_config, "shift_factor", None) or 0.0)
        if image_size % (downsample * patch_size):
            raise ValueError(
                f"FlexTok image_size={image_size} is not a multiple of {downsample * patch_size} "
                f"(first-stage downsampling {downsample} x patch_size {patch_size})"
            )
        self.latent_channels, self.latent_size = channels, image_size // downsample
        grid = self.latent_size // patch_size

        self.quantizer = FSQuantizer(levels)
        common = dict(in_channels=channels, grid=grid, patch_size=patch_size, mlp_ratio=mlp_ratio)
        common.update(num_registers=num_registers, code_dim=len(levels))
        self.encoder = FlexTokEncoder(width=width, depth=depth, heads=heads, **common)
        self.decoder = FlexTokDecoder(width=decoder_width, depth=decoder_depth, heads=decoder_heads, **common)

        self._teacher: Frozen | None = None
        self.repa_head: nn.Module | None = None
        if repa_weights is not None:
            teacher = load_teacher(
                repa_teacher,
                repa_weights,
                "paths.repa_weights",
                "FlexTok REPA needs frozen teacher weights",
                image_size=repa_image_size,
                grid=grid,
            )
            self._teacher = Frozen(teacher)
            self.repa_head = nn.Sequential(
                nn.Linear(decoder_width, repa_hidden),
                nn.SiLU(),
                nn.Linear(repa_hidden, repa_hidden),
                nn.SiLU(),
                nn.Linear(repa_hidden, teacher.map_features),
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> FlexTok:
        """ "d18-d28" -> encoder d18, decoder d28; keyword arguments override anything else."""
        size, decoder_size = name.split("-")
        return cls(size=size, decoder_size=decoder_size, **overrides)

    # ---- interface -----------------------------------------------------------------------------------------
    @property
    def token_spec(self) -> TokenSpec:
        return TokenSpec(
            "categorical", self.num_registers, None, self.quantizer.codebook_size, len(self.levels)
        )

    def code_vectors(self) -> torch.Tensor:
        return self.quantizer.code_vectors()

    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> first-stage latents x0 (B, C, h, w)."""
        if self._vae is None:
            return images
        vae = self._vae.on(images.device)
        with torch.no_grad():
            z = vae.encode(images.to(vae.dtype)).latent_dist.mode()  # (B, C, H/8, W/8)
        return ((z - self.latent_shift) * self.latent_scale).float()

    def to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """First-stage latents (B, C, h, w) -> images (B, 3, H, W)."""
        if self._vae is None:
            return latents
        vae = self._vae.on(latents.device)
        with torch.no_grad():
            return vae.decode((latents / self.latent_scale + self.latent_shift).to(vae.dtype)).sample.float()

    def encode(self, images: torch.Tensor) -> Tokens:
        return Tokens("categorical", self.quantizer(self.encoder(self.to_latents(images))).codes)

    def velocity(
        self, x_t: torch.Tensor, registers: torch.Tensor, t: torch.Tensor, feature_layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder's output as a velocity: itself ("v" prediction) or, for "x" prediction (a clean
        estimate x0_hat), v = (x_t - x0_hat) / max(t, min_time). -> (v (B, C, h, w), features or None)"""
        out, features = self.decoder(x_t, registers, t, feature_layer)
        if self.prediction == "v":
            return out, features
        t_ = t.clamp(min=self.min_time).view(-1, 1, 1, 1).to(out.dtype)
        return (x_t - out) / t_, features

    def guided_velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, registers: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """v = v_null + s (v_cond - v_null); s = 1 runs the conditional pass only (exactly v_cond)."""
        if guidance_scale == 1.0:
            return self.velocity(x_t, registers, t)[0]
        null = self.decoder.null_registers(x_t.shape[0]).to(registers.dtype)
        both = self.velocity(torch.cat([x_t, x_t]), torch.cat([registers, null]), torch.cat([t, t]))[0]
        v_cond, v_null = both.float().chunk(2)
        return v_null + guidance_scale * (v_cond - v_null)

    @torch.no_grad()
    def sample_latents(
        self,
        registers: torch.Tensor,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Euler from t = 1 (noise) to t = 0: registers (B, R, W) -> latents (B, C, h, w) fp32."""
        num_steps = num_steps or self.num_steps
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        batch, device = registers.shape[0], registers.device
        shape = (batch, self.latent_channels, self.latent_size, self.latent_size)
        x = torch.randn(shape, generator=generator, device=device)  # (B, C, h, w) at t = 1
        times = torch.linspace(1.0, 0.0, num_steps + 1, device=device)
        for i in range(num_steps):
            v = self.guided_velocity(x, times[i].expand(batch), registers, scale)
            x = x + (times[i + 1] - times[i]) * v.float()
        return x

    @torch.no_grad()
    def decode(
        self,
        tokens: Tokens,
        num_tokens: int | None = None,
        *,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample images from the first k codes of each row: k = num_tokens (default: all given), and
        min(k, tokens.lengths[b]) per row when lengths are set; the remaining registers are masked."""
        codes = tokens.data  # (B, N), N <= R
        batch, n = codes.shape
        if n > self.num_registers:
            raise ValueError(f"{n} tokens per row, but this FlexTok has {self.num_registers} registers")
        keep = torch.full((batch,), n if num_tokens is None else min(num_tokens, n), device=codes.device)
        if tokens.lengths is not None:
            keep = torch.minimum(keep, tokens.lengths.to(codes.device).long())
        vectors = self.quantizer.indices_to_codes(
            codes.clamp(0, self.quantizer.codebook_size - 1)
        )  # (B, N, d)
        registers = self.decoder.embed_registers(vectors.to(self.decoder.from_code.weight.dtype), keep)
        latents = self.sample_latents(registers, num_steps, guidance_scale, generator)
        return self.to_pixels(latents)

    # ---- training ------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, perturb=None):
        """images (B, 3, H, W) -> (reconstructions (B, 3, H, W), losses, stats); see the module docstring.
        `perturb` (perturb.py) maps the quantised registers to what the decoder sees."""
        c = self.config
        batch, device = images.shape[0], images.device
        x0 = self.to_latents(images)  # (B, C, h, w)
        quantized = self.quantizer(self.encoder(x0))  # quantized (B, R, d), codes (B, R)
        stats = {**quantized.stats, "codes": quantized.codes}
        latents = quantized.quantized if perturb is None else perturb(quantized.quantized, quantized.codes)

        if not self.training:
            keep = torch.full((batch,), c["num_registers"], device=device)
            registers = self.decoder.embed_registers(latents, keep)  # (B, R, W)
            generator = torch.Generator(device=device).manual_seed(0)
            reconstructions = self.to_pixels(self.sample_latents(registers, generator=generator))
            stats["kept_tokens"] = keep.float().mean()
            return reconstructions, {}, stats

        keep = sample_keep_k(batch, c["num_registers"], c["nested_dropout"], device=device)  # (B,)
        keep = keep.masked_fill(torch.rand(batch, device=device) < c["register_dropout"], 0)
        registers = self.decoder.embed_registers(latents, keep)  # (B, R, W)
        t = logit_normal_timesteps(batch, c["timestep_mean"], c["timestep_std"], device=device)  # (B,)
        t = t.masked_fill(torch.rand(batch, device=device) < c["pure_noise_prob"], 1.0)  # the sampler's start
        noise = torch.randn_like(x0)
        t_ = t.view(batch, 1, 1, 1)
        x_t = (1 - t_) * x0 + t_ * noise
        feature_layer = self.repa_layer if self.repa_head is not None else None
        v, features = self.velocity(x_t, registers, t, feature_layer)
        losses = {"flow": F.mse_loss(v.float(), noise - x0)}
        if self.repa_head is not None:
            losses["repa"] = c["repa_weight"] * self.repa_loss(features, images)
        with torch.no_grad():  # one-step estimate x0_hat, for logging only
            reconstructions = self.to_pixels(x_t - t_ * v.detach().float())
        stats["kept_tokens"] = keep.float().mean()
        return reconstructions, losses, stats

    def repa_loss(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """1 - mean cosine similarity between projected decoder patch features (B, P, W) and the frozen
        teacher's patch features of the clean images, resized to the decoder's patch grid."""
        teacher = self._teacher.on(images.device)
        grid = self.decoder.grid
        with torch.no_grad():
            target = teacher.patch_features(images.float()).float()  # (B, D_t, h, w)
            if target.shape[-1] != grid:
                target = F.interpolate(target, size=(grid, grid), mode="bilinear", align_corners=False)
            target = rearrange(target, "b d h w -> b (h w) d")  # (B, P, D_t)
        prediction = self.repa_head(features).float()  # (B, P, D_t)
        return 1 - F.cosine_similarity(prediction, target, dim=-1).mean()

    def save_pretrained(self, folder, **kwargs):
        """Export for inference: without the REPA head, and with repa_weights=None in config.json."""
        head, config = self.repa_head, self.config
        self.repa_head, self.config = None, {**config, "repa_weights": None}
        try:
            return super().save_pretrained(folder, **kwargs)
        finally:
            self.repa_head, self.config = head, config


def _load_vae(vae_path) -> nn.Module:
    folder = required_path(
        vae_path,
        "paths.flextok_vae",
        "FlexTok first_stage=vae needs a diffusers AutoencoderKL folder",
        "set paths.flextok_vae to a local AutoencoderKL folder (python scripts/train_autoencoder.py trains a "
        "small one on the embedded photos), or tokenizer.first_stage=pixels",
        Path.is_dir,
    )
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
