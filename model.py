"""
The FLUX.1 text-to-image stack, from scratch, in one file.

    Flux          the MMDiT velocity network (double-stream + single-stream blocks)
    T5Encoder     T5 v1.1 encoder (the `txt` sequence FLUX attends to)
    CLIPText      CLIP ViT-L/14 text tower (the pooled `y` vector that modulates FLUX)
    CLIPVision    CLIP ViT-L/14 vision tower and projections (for CLIPScore and the LAION
                  aesthetic reward of rewards.py), with CLIP's preprocessing done in torch
    tokenizers    CLIP BPE (`tokenizers`) and T5 SentencePiece (`sentencepiece`)
    AutoEncoder   the FLUX autoencoder (16 latent channels, scale 0.3611, shift 0.1159)
    loaders       load_flux / load_t5 / load_clip_text / load_autoencoder / load_clip_vision /
                  load_clip, reading the real release files (BFL single files and Hugging Face /
                  diffusers folders), and the matching save_* writers
    PixelLatent   the embedded mini-FLUX's stand-in for the autoencoder (pixels rearranged)

Module attribute names equal the checkpoint keys, so every load is
`load_state_dict(strict=True, assign=True)` on a model built on the meta device: the weights are
memory-mapped from safetensors and never held twice. Where two file formats disagree, the remap
is one explicit table.

References:
  [1] Black Forest Labs, FLUX.1 reference code, github.com/black-forest-labs/flux
  [2] Esser et al. 2024, "Scaling Rectified Flow Transformers" (MMDiT), arXiv 2403.03206
  [3] Raffel et al. 2020, "Exploring the Limits of Transfer Learning" (T5), arXiv 1910.10683
  [4] Radford et al. 2021, "Learning Transferable Visual Models" (CLIP), arXiv 2103.00020
  [5] Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (the
      autoencoder layout), arXiv 2112.10752
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple

import sentencepiece
import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------
# Config checks shared by every architecture


def check_field_types(config) -> None:
    """ValueError naming the first field of a config dataclass whose value has the wrong type (a
    config.json with `"num_layers": "three"` must fail here, not deep inside the model's constructor).
    The annotations are strings (postponed evaluation): int, float, bool, int | None, tuple[int, ...]."""
    for name, f in config.__dataclass_fields__.items():
        value = getattr(config, name)
        kind = f.type
        if kind == "int | None" and value is None:
            continue
        if kind in ("int", "int | None"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "tuple[int, ...]":
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        else:
            raise AssertionError(f"check_field_types: no rule for {type(config).__name__}.{name}: {kind}")
        if not ok:
            raise ValueError(f"{name} must be {kind.replace('tuple[int, ...]', 'a list of ints')}, got {value!r}")


# -----------------------------------------------------------------------------------------------
# Flux MMDiT
#
# The FLUX.1 velocity network [1], an MMDiT [2]. Text and image tokens first pass through `depth`
# double-stream blocks (separate weights per stream, one joint attention), then, concatenated,
# through `depth_single_blocks` single-stream blocks. Every block is modulated (adaLN) by one
# conditioning vector vec = MLP(t) + MLP(guidance) + MLP(y), y being CLIP's pooled text vector.
# Shape letters: B batch, L tokens (L_txt text, L_img image), D hidden size, H heads, Dh = D / H.


@dataclass(kw_only=True)
class FluxParams:
    """Architecture of a Flux transformer (BFL's `FluxParams`; all fields keyword-only)."""

    in_channels: int             # channels of a packed latent token: 16 latent channels x 2 x 2 = 64
    out_channels: int | None = None  # channels of the predicted velocity per token; None = in_channels
    vec_in_dim: int              # width of the pooled conditioning vector y (CLIP-L pooled: 768)
    context_in_dim: int          # width of the text token states txt (T5-XXL: 4096)
    hidden_size: int             # D, width of the residual stream (3072)
    mlp_ratio: float             # MLP hidden width = mlp_ratio * D (4.0)
    num_heads: int               # H, attention heads (24, so head dim Dh = 128)
    depth: int                   # number of double-stream blocks (19)
    depth_single_blocks: int     # number of single-stream blocks (38)
    axes_dim: tuple[int, ...]    # RoPE channels per position axis (index, row, col); sums to Dh
    theta: int                   # RoPE base period (10000)
    qkv_bias: bool               # bias in the double-stream q|k|v projections (True)
    guidance_embed: bool         # embeds a distilled-guidance scalar (dev: True, schnell: False)

    def __post_init__(self):
        check_field_types(self)
        self.axes_dim = tuple(self.axes_dim)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim or any(d % 2 for d in self.axes_dim):
            raise ValueError(f"axes_dim {list(self.axes_dim)} must be even numbers summing to the head dim "
                             f"{head_dim} (= hidden_size / num_heads)")


FLUX_CONFIGS = {
    "flux-schnell": FluxParams(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096,
                               hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19,
                               depth_single_blocks=38, axes_dim=(16, 56, 56), theta=10_000,
                               qkv_bias=True, guidance_embed=False),
    "flux-dev": FluxParams(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096,
                           hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19,
                           depth_single_blocks=38, axes_dim=(16, 56, 56), theta=10_000,
                           qkv_bias=True, guidance_embed=True),
    # For tests and notebooks: the same architecture at 4 heads x 16 channels, 2 + 2 blocks.
    "tiny": FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=48,
                       hidden_size=64, mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=2,
                       axes_dim=(4, 6, 6), theta=10_000, qkv_bias=True, guidance_embed=False),
}


def pack(x: torch.Tensor) -> torch.Tensor:
    """Latent image (B, C, H, W) -> tokens (B, H/2 * W/2, 4C), one token per 2x2 patch.

    "b c (h 2) (w 2) -> b (h w) (c 2 2)": token index = row * W/2 + col, channel index
    = c * 4 + dy * 2 + dx. FLUX packs its 16-channel latents into 64-channel tokens this way.
    """
    if x.ndim != 4 or x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"pack expects (B, C, H, W) with even H and W, got {tuple(x.shape)}")
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // 2, 2, W // 2, 2)              # (B, C, H/2, dy, W/2, dx)
    x = x.permute(0, 2, 4, 1, 3, 5)                        # (B, H/2, W/2, C, dy, dx)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)        # (B, L_img, 4C)


def unpack(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Tokens (B, height/2 * width/2, 4C) -> latent image (B, C, height, width); inverts `pack`."""
    if x.ndim != 3 or height % 2 or width % 2 or x.shape[1] != (height // 2) * (width // 2) or x.shape[2] % 4:
        raise ValueError(f"unpack expects (B, {height // 2 * (width // 2)}, 4C) tokens for an even "
                         f"{height}x{width} latent, got {tuple(x.shape)}")
    B, _, C4 = x.shape
    x = x.reshape(B, height // 2, width // 2, C4 // 4, 2, 2)  # (B, H/2, W/2, C, dy, dx)
    x = x.permute(0, 3, 1, 4, 2, 5)                          # (B, C, H/2, dy, W/2, dx)
    return x.reshape(B, C4 // 4, height, width)              # (B, C, H, W)


def image_ids(batch: int, height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE positions of the packed tokens of a (height, width) latent: (batch, L_img, 3).

    Token (row, col) of the (height/2, width/2) patch grid gets [0, row, col], row-major like
    `pack`. Axis 0 is 0 for plain text-to-image (FLUX Kontext puts reference images at 1).
    """
    if height % 2 or width % 2:
        raise ValueError(f"latent height and width must be even, got {height}x{width}")
    rows = torch.arange(height // 2, device=device, dtype=torch.float32)
    cols = torch.arange(width // 2, device=device, dtype=torch.float32)
    ids = torch.zeros(height // 2, width // 2, 3, device=device)  # (H/2, W/2, 3)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(1, -1, 3).repeat(batch, 1, 1)               # (batch, L_img, 3)


def text_ids(batch: int, length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE positions of the text tokens: all zeros (batch, length, 3), i.e. no rotation."""
    return torch.zeros(batch, length, 3, device=device)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of times t in [0, 1]: (B,) -> (B, dim) float32, [cos | sin].

    The only place where FLUX's 0-1000 time scale exists: the angle of frequency k is
    time_factor * t * exp(-ln(max_period) * k / (dim/2)), k = 0 .. dim/2 - 1 (BFL's
    `timestep_embedding`; diffusers' `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`).
    The distilled-guidance scalar goes through the same function, so it is scaled by 1000 too.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects a (B,) tensor, got {tuple(t.shape)}")
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)                 # (dim/2,)
    args = time_factor * t.float()[:, None] * freqs[None, :]            # (B, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)         # (B, 2 * (dim/2))
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)    # (B, dim)
    return emb


def rope_angles(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """Rotary angles of 3-axis positions: ids (B, L, 3) -> (B, L, Dh/2), float64.

    Axis i, with d_i channels, has frequencies omega_j = theta^(-2j / d_i), j < d_i / 2 (1-D RoPE,
    Su et al. 2021, per axis); token l gets the angles ids[l, i] * omega_j. The columns of the
    three axes are concatenated, so query/key channel pair (2j, 2j+1) is rotated by column j.
    """
    # float64 like BFL and diffusers: in float32, position x frequency (and its cos, sin) would
    # be off by ~1e-5 at large positions. Apple's MPS has no float64.
    dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    columns = []
    for i, d in enumerate(axes_dim):
        omega = theta ** (-torch.arange(0, d, 2, dtype=dtype, device=ids.device) / d)  # (d/2,)
        columns.append(ids[..., i].to(dtype)[..., None] * omega)                       # (B, L, d/2)
    return torch.cat(columns, dim=-1)                                                  # (B, L, Dh/2)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of x (B, L, H, Dh) by the RoPE angles: rot (B or 1, L, 1, Dh/2) = e^(i angle).

    Pair j, (x[2j], x[2j+1]), read as the complex number x[2j] + i x[2j+1], is multiplied by
    rot[j]: a 2-D rotation by angle_j (as in Llama's reference code; on CPU ~20x faster than four
    real products on the strided halves). Computed in float32 for bf16 / fp16 inputs (as BFL), in
    float64 for float64 inputs (so gradient checks see no float32 rounding).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    pairs = torch.view_as_complex(x.to(dtype).reshape(*x.shape[:-1], -1, 2))  # (B, L, H, Dh/2), complex
    return torch.view_as_real(pairs * rot).flatten(-2).type_as(x)             # (B, L, H, Dh)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """RoPE on q, k, then softmax(q k^T / sqrt(Dh)) v. q, k, v (B, L, H, Dh) -> (B, L, H * Dh)."""
    q, k = apply_rope(q, rot), apply_rope(k, rot)
    x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, L, Dh)
    B, H, L, Dh = x.shape
    return x.transpose(1, 2).reshape(B, L, H * Dh)                                                # (B, L, D)


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused projections (B, L, 3 * D), ordered q | k | v then heads, -> q, k, v each (B, L, H, Dh).

    Heads stay after the sequence axis until the attention itself, so QK-norm and RoPE run on
    (nearly) contiguous memory.
    """
    B, L, D3 = qkv.shape
    qkv = qkv.reshape(B, L, 3, num_heads, D3 // (3 * num_heads))  # (B, L, 3, H, Dh)
    return qkv.unbind(2)                                          # 3 x (B, L, H, Dh)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear; embeds t, guidance and y into the conditioning vector."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last dim, computed in at least float32 (the QK-norm of FLUX)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 / fp16 are upcast to float32 as in BFL; float64 stays float64.
        x_hi = x.to(torch.promote_types(x.dtype, torch.float32))
        rrms = torch.rsqrt(x_hi.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        return (x_hi * rrms).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    """Separate RMSNorms for queries and keys, per head (stabilises attention logits)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """The weights of one stream's attention: fused q|k|v projection, QK-norm, output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, D) -> normalised q, k and v, each (B, L, H, Dh)."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


@dataclass
class ModulationOut:
    """adaLN parameters of one sub-layer: x + gate * f((1 + scale) * LayerNorm(x) + shift)."""

    shift: torch.Tensor  # (B, 1, D)
    scale: torch.Tensor  # (B, 1, D)
    gate: torch.Tensor   # (B, 1, D)


class Modulation(nn.Module):
    """vec (B, D) -> one (double=False) or two (double=True) ModulationOut, from Linear(SiLU(vec))."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: torch.Tensor) -> list[ModulationOut]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # multiplier x (B, 1, D)
        return [ModulationOut(*out[i:i + 3]) for i in range(0, self.multiplier, 3)]


class DoubleStreamBlock(nn.Module):
    """MMDiT block: image and text keep their own weights but attend jointly over [txt, img]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden, hidden_size))
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden, hidden_size))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, L_img, D), txt (B, L_txt, D), vec (B, D), rot = RoPE rotations of [txt, img]."""
        L_txt = txt.shape[1]
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.heads((1 + img_mod1.scale) * self.img_norm1(img) + img_mod1.shift)
        txt_q, txt_k, txt_v = self.txt_attn.heads((1 + txt_mod1.scale) * self.txt_norm1(txt) + txt_mod1.shift)
        q = torch.cat((txt_q, img_q), dim=1)  # (B, L_txt + L_img, H, Dh), text first as in BFL
        k = torch.cat((txt_k, img_k), dim=1)
        v = torch.cat((txt_v, img_v), dim=1)
        attn = attention(q, k, v, rot)        # (B, L_txt + L_img, D)
        txt_attn, img_attn = attn[:, :L_txt], attn[:, L_txt:]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp((1 + img_mod2.scale) * self.img_norm2(img) + img_mod2.shift)
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp((1 + txt_mod2.scale) * self.txt_norm2(txt) + txt_mod2.shift)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint [txt, img] sequence (Dehghani et al. 2023, ViT-22B)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden)  # q | k | v | mlp in
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden, hidden_size)      # attn | mlp out
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) = [txt, img], vec (B, D) -> (B, L, D)."""
        (mod,) = self.modulation(vec)
        x_mod = (1 + mod.scale) * self.pre_norm(x) + mod.shift
        # linear1 is BFL's fused [q | k | v | mlp-in] projection. Applying its two row blocks one
        # after the other is the same math, but the MLP half is consumed (GELU) before attention
        # and no (B, L, 3D + mlp_hidden) buffer is alive through it: lower peak memory, and
        # measurably faster on CPU (benchmarks/bench_flux.py).
        D3 = 3 * x.shape[-1]
        mlp = self.mlp_act(F.linear(x_mod, self.linear1.weight[D3:], self.linear1.bias[D3:]))  # (B, L, mlp_hidden)
        qkv = F.linear(x_mod, self.linear1.weight[:D3], self.linear1.bias[:D3])                 # (B, L, 3D)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, rot)                                                          # (B, L, D)
        return x + mod.gate * self.linear2(torch.cat((attn, mlp), dim=-1))


class LastLayer(nn.Module):
    """adaLN (shift, scale only) then Linear D -> out_channels."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # 2 x (B, 1, D)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


class Flux(nn.Module):
    """The FLUX.1 transformer: predicts the flow velocity of packed latent tokens.

    Attribute names equal the BFL checkpoint keys (`double_blocks.3.img_attn.qkv.weight`, ...).
    """

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        D = params.hidden_size
        self.img_in = nn.Linear(params.in_channels, D)
        self.time_in = MLPEmbedder(256, D)
        self.vector_in = MLPEmbedder(params.vec_in_dim, D)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(256, D)
        self.txt_in = nn.Linear(params.context_in_dim, D)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(D, params.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(D, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(D, params.out_channels)

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity of the packed latents x_t at time t (t = 1 noise, t = 0 data).

        img (B, L_img, in_channels)   packed latents, see `pack`
        img_ids (B or 1, L_img, 3)    their positions, see `image_ids`
        txt (B, L_txt, context_in_dim) T5 token states
        txt_ids (B or 1, L_txt, 3)    zeros, see `text_ids`
        timesteps (B,)                t in [0, 1]
        y (B, vec_in_dim)             CLIP pooled text vector
        guidance (B,)                 distilled guidance scale (e.g. 3.5) if params.guidance_embed, else None
        Returns the velocity (B, L_img, out_channels).
        """
        self._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        p, L_txt = self.params, txt.shape[1]

        dtype = self.img_in.weight.dtype
        img = self.img_in(img)  # (B, L_img, D)
        txt = self.txt_in(txt)  # (B, L_txt, D)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))  # (B, D)
        if p.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        vec = vec + self.vector_in(y)

        n = max(len(txt_ids), len(img_ids))
        ids = torch.cat((txt_ids.expand(n, -1, -1), img_ids.expand(n, -1, -1)), dim=1)  # (n, L_txt + L_img, 3)
        angles = rope_angles(ids, p.axes_dim, p.theta)[:, :, None]              # (n, L_txt + L_img, 1, Dh/2)
        # e^(i angle) in complex64, or complex128 for a float64 model (apply_rope then computes in float64)
        rot = torch.polar(torch.ones_like(angles), angles).to(
            torch.complex128 if dtype == torch.float64 else torch.complex64)  # (n, L_txt + L_img, 1, Dh/2)

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, rot)
        x = torch.cat((txt, img), dim=1)  # (B, L_txt + L_img, D)
        for block in self.single_blocks:
            x = block(x, vec, rot)
        return self.final_layer(x[:, L_txt:], vec)  # (B, L_img, out_channels)

    def _check_inputs(self, img, img_ids, txt, txt_ids, timesteps, y, guidance) -> None:
        """ValueError, naming the input, unless every input has the shape `forward` documents."""
        p = self.params
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, L, C), got {tuple(img.shape)} and {tuple(txt.shape)}")
        B, L_img, _ = img.shape
        L_txt = txt.shape[1]
        _check_shape("img", img, (B, L_img, p.in_channels))
        _check_shape("txt", txt, (B, L_txt, p.context_in_dim))
        _check_shape("img_ids", img_ids, (None, L_img, 3))
        _check_shape("txt_ids", txt_ids, (None, L_txt, 3))
        if len(img_ids) not in (1, B) or len(txt_ids) not in (1, B):
            raise ValueError(f"img_ids and txt_ids need batch size {B} or 1, got {len(img_ids)} and {len(txt_ids)}")
        _check_shape("timesteps", timesteps, (B,))
        _check_shape("y", y, (B, p.vec_in_dim))
        if p.guidance_embed and guidance is None:
            raise ValueError("this model embeds distilled guidance (like flux-dev): pass guidance, shape (B,)")
        if not p.guidance_embed and guidance is not None:
            raise ValueError("this model has no guidance embedder (like flux-schnell): pass guidance=None")
        if guidance is not None:
            _check_shape("guidance", guidance, (B,))


def _check_shape(name: str, x: torch.Tensor, shape: tuple[int | None, ...]) -> None:
    """ValueError unless x has `shape` (None matches any size)."""
    if x.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape ({want}), got {tuple(x.shape)}")


# -----------------------------------------------------------------------------------------------
# T5 v1.1 encoder
#
# The encoder of T5 v1.1 XXL [3] ("google/t5-v1_1-xxl"), whose last hidden states are the `txt`
# token sequence FLUX attends to. v1.1 differs from the original T5 by a gated-GELU feed-forward
# and no dropout at inference. Every block is pre-norm (RMSNorm), attention has no 1/sqrt(Dk)
# scaling (Mesh TensorFlow folds it into the initialisation of q) and no absolute positions: a
# learned bias per (relative-position bucket, head) is added to the attention logits. Block 0 owns
# that bias table and the same (1, H, L, L) bias serves all blocks. BFL and diffusers call the
# encoder without an attention mask, so padding tokens are attended to, and so do we.
# Attribute names equal Hugging Face's T5EncoderModel keys (`encoder.block.3.layer.0.SelfAttention.q`).
# Shape letters: B batch, L tokens, D = d_model, H heads, Dk = d_kv, F = d_ff.


@dataclass(kw_only=True)
class T5Config:
    """Architecture of a T5 v1.1 encoder (field names as in Hugging Face's config.json)."""

    vocab_size: int                      # rows of the token embedding `shared` (XXL: 32128)
    d_model: int                         # D, width of the residual stream (4096)
    d_kv: int                            # Dk, width of one attention head (64); H * Dk may differ from D
    d_ff: int                            # F, hidden width of the gated-GELU feed-forward (10240)
    num_layers: int                      # encoder blocks (24)
    num_heads: int                       # H, attention heads (64)
    relative_attention_num_buckets: int  # position-bias buckets, half per direction (32)
    relative_attention_max_distance: int  # offsets at least this far share the outermost bucket (128)
    layer_norm_epsilon: float            # RMSNorm epsilon (1e-6)

    def __post_init__(self):
        check_field_types(self)
        if min(self.vocab_size, self.d_model, self.d_kv, self.d_ff, self.num_layers, self.num_heads) < 1:
            raise ValueError(f"T5Config sizes must be positive, got {self}")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 4:
            raise ValueError(f"relative_attention_num_buckets must be a positive multiple of 4 (exact and "
                             f"log-spaced halves per direction), got {self.relative_attention_num_buckets}")


T5_CONFIGS = {
    "t5-v1_1-xxl": T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                            relative_attention_num_buckets=32, relative_attention_max_distance=128,
                            layer_norm_epsilon=1e-6),
    # For tests and notebooks: 2 blocks, 4 heads x 8 channels.
    "tiny": T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     layer_norm_epsilon=1e-6),
}


def _check_ids(name: str, input_ids: torch.Tensor, vocab_size: int, max_length: int | None = None) -> None:
    """ValueError unless input_ids is a (B, L) integer tensor of ids < vocab_size (and L <= max_length)."""
    if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32) or input_ids.shape[1] == 0:
        raise ValueError(f"{name} expects input_ids of shape (B, L), L >= 1, dtype long; "
                         f"got {tuple(input_ids.shape)} {input_ids.dtype}")
    if max_length is not None and input_ids.shape[1] > max_length:
        raise ValueError(f"{name} has {max_length} positions; got {input_ids.shape[1]} tokens "
                         f"(tokenize with max_length <= {max_length})")
    lo, hi = input_ids.min().item(), input_ids.max().item()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} has a vocabulary of {vocab_size}; got token ids in [{lo}, {hi}] "
                         f"(tokenizer and model do not match?)")


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of each key - query offset for bidirectional T5 attention (Raffel et al. 2020, Sec. 2.1).

    Half of the buckets are for keys after the query, half for keys before it (offset 0 is
    "before"). Within a half of n = num_buckets / 2 buckets, offsets |r| < n/2 get their own bucket
    and larger ones log-spaced buckets up to max_distance; farther offsets share the last bucket:
    bucket(|r|) = n/2 + floor(log(|r| / (n/2)) / log(max_distance / (n/2)) * n/2), capped at n - 1.
    Integer tensor in, same-shape long tensor in [0, num_buckets) out.
    """
    n = num_buckets // 2
    max_exact = n // 2
    bucket = (relative_position > 0).long() * n                        # keys to the right use the upper half
    distance = relative_position.abs()
    # clamp(min=max_exact): log(0) would be -inf; those offsets take the exact branch anyway.
    log_ratio = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (n - max_exact)).long()).clamp(max=n - 1)
    return bucket + torch.where(distance < max_exact, distance, far)


class T5LayerNorm(nn.Module):
    """T5's "layer norm" is an RMSNorm: x / sqrt(mean(x^2) + eps) * weight, with no mean subtraction
    and no bias; the statistic is computed in float32 even for bf16 weights."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rrms = torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (B, L, 1)
        return (x.float() * rrms).to(self.weight.dtype) * self.weight


class T5Attention(nn.Module):
    """Multi-head self-attention with an additive position bias and no logit scaling."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), position_bias (1, H, L, L) -> (B, L, D)."""
        B, L, _ = x.shape
        q = self.q(x).reshape(B, L, self.num_heads, self.d_kv).transpose(1, 2)  # (B, H, L, Dk)
        k = self.k(x).reshape(B, L, self.num_heads, self.d_kv).transpose(1, 2)  # (B, H, L, Dk)
        v = self.v(x).reshape(B, L, self.num_heads, self.d_kv).transpose(1, 2)  # (B, H, L, Dk)
        # softmax(q k^T + bias) v: scale=1.0 because T5 has no 1/sqrt(Dk) (it is in q's init).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(B, L, self.num_heads * self.d_kv))  # (B, L, D)


class T5LayerSelfAttention(nn.Module):
    """x + SelfAttention(RMSNorm(x))."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), position_bias)


class T5DenseGatedActDense(nn.Module):
    """The v1.1 feed-forward: wo(gelu_tanh(wi_0 h) * wi_1 h) (a GEGLU, Shazeer 2020), no biases."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # "gelu_new" in the Hugging Face config is the tanh approximation of GELU.
        return self.wo(F.gelu(self.wi_0(h), approximate="tanh") * self.wi_1(h))  # (B, L, F) -> (B, L, D)


class T5LayerFF(nn.Module):
    """x + DenseReluDense(RMSNorm(x)) (the name is historical: v1.1's activation is a gated GELU)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """layer.0 = self-attention sub-layer, layer.1 = feed-forward sub-layer."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)])

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, position_bias))


class T5Encoder(nn.Module):
    """T5 v1.1 encoder: token ids (B, L) -> last hidden states (B, L, d_model), the FLUX `txt`.

    Attribute names equal Hugging Face T5EncoderModel's keys. Its `encoder.embed_tokens` is the
    same tensor as `shared` (tied); here it exists once, as `shared`.
    """

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # ModuleDict only to reproduce the checkpoint's `encoder.` level (as nanoGPT does for GPT-2).
        self.encoder = nn.ModuleDict(dict(
            block=nn.ModuleList(T5Block(cfg, has_relative_attention_bias=i == 0) for i in range(cfg.num_layers)),
            final_layer_norm=T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon),
        ))

    def position_bias(self, L: int) -> torch.Tensor:
        """The additive attention bias of L tokens, shared by all blocks: (1, H, L, L)."""
        cfg = self.cfg
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias  # (buckets, H)
        position = torch.arange(L, device=table.weight.device)
        relative_position = position[None, :] - position[:, None]                     # (L, L): key - query
        bucket = relative_position_bucket(relative_position, cfg.relative_attention_num_buckets,
                                          cfg.relative_attention_max_distance)        # (L, L)
        return table(bucket).permute(2, 0, 1)[None]                                   # (1, H, L, L)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) long -> last_hidden_state (B, L, d_model). No attention mask, as in FLUX."""
        _check_ids("T5Encoder", input_ids, self.cfg.vocab_size)
        B, L = input_ids.shape
        x = self.shared(input_ids)  # (B, L, D)
        bias = self.position_bias(L)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)  # (B, L, D)


# -----------------------------------------------------------------------------------------------
# CLIP text encoder
#
# The text tower of CLIP ViT-L/14 [4] ("openai/clip-vit-large-patch14"). FLUX uses only its pooled
# output: the final-LayerNorm state of the first <|endoftext|> token, which becomes the vector y
# that modulates every FLUX block (no text projection). A GPT-2-style pre-LN transformer with
# learned absolute positions, a causal mask, and quick_gelu. The causal mask means the padding
# after <|endoftext|> cannot change the pooled state, so no padding mask is needed.
# Attribute names equal the keys of Hugging Face's CLIPTextModel files (`text_model.encoder.
# layers.3.self_attn.q_proj`, ...). Shape letters: B batch, L tokens, D hidden, H heads, Dh = D / H.


@dataclass(kw_only=True)
class CLIPTextConfig:
    """Architecture of a CLIP text tower (field names as in Hugging Face's config.json)."""

    vocab_size: int               # BPE vocabulary, <|startoftext|> and <|endoftext|> last (ViT-L/14: 49408)
    hidden_size: int              # D, width of the residual stream (768)
    intermediate_size: int        # hidden width of the MLP (3072)
    num_hidden_layers: int        # transformer layers (12)
    num_attention_heads: int      # H (12, so Dh = 64)
    max_position_embeddings: int  # learned positions = longest token sequence (77)
    layer_norm_eps: float         # LayerNorm epsilon (1e-5)

    def __post_init__(self):
        check_field_types(self)
        if min(self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers,
               self.num_attention_heads, self.max_position_embeddings) < 1:
            raise ValueError(f"CLIPTextConfig sizes must be positive, got {self}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_attention_heads "
                             f"{self.num_attention_heads}")


CLIP_CONFIGS = {
    "clip-vit-large-patch14": CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                             num_hidden_layers=12, num_attention_heads=12,
                                             max_position_embeddings=77, layer_norm_eps=1e-5),
    # For tests and notebooks: 2 layers, 4 heads x 8 channels.
    "tiny": CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5),
}


class CLIPTextOutput(NamedTuple):
    """What CLIPText returns; unpacks as `last_hidden_state, pooled = clip(ids)`."""

    last_hidden_state: torch.Tensor  # (B, L, D) after the final LayerNorm
    pooled: torch.Tensor             # (B, D) the state at the first <|endoftext|>: FLUX's y


class CLIPAttention(nn.Module):
    """Multi-head self-attention, softmax(q k^T / sqrt(Dh) [+ causal mask]) v, with biases. The text
    tower is causal (token l sees tokens 0..l only); the vision tower is not (every patch sees all)."""

    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig, causal: bool):
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.causal = causal
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D)."""
        B, L, D = x.shape
        H = self.num_heads
        q = self.q_proj(x).reshape(B, L, H, D // H).transpose(1, 2)  # (B, H, L, Dh)
        k = self.k_proj(x).reshape(B, L, H, D // H).transpose(1, 2)  # (B, H, L, Dh)
        v = self.v_proj(x).reshape(B, L, H, D // H).transpose(1, 2)  # (B, H, L, Dh)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, L, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))            # (B, L, D)


class CLIPMLP(nn.Module):
    """fc2(quick_gelu(fc1(x))), quick_gelu(x) = x * sigmoid(1.702 x) (OpenAI CLIP's GELU approximation)."""

    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)                               # (B, L, intermediate_size)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # (B, L, D)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x)); shared by the text (causal) and vision towers."""

    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig, causal: bool = True):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPText(nn.Module):
    """CLIP text tower: token ids (B, L) -> CLIPTextOutput(last_hidden_state (B, L, D), pooled (B, D)).

    pooled is taken at `argmax(input_ids)` of each row: <|endoftext|> has the largest id of the
    vocabulary, and argmax returns the first maximum, so this is the first <|endoftext|> even when
    the padding is <|endoftext|> too. It is what OpenAI's CLIP does, and what transformers does for
    configs with the legacy eos_token_id = 2 (openai/clip-vit-large-patch14, the FLUX.1 copy, and
    the files `save_clip_text` writes). A vocabulary whose <|endoftext|> is not its largest id
    (none of CLIP's) would need the explicit "first id == eos" search instead.
    """

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        # ModuleDicts only to reproduce the checkpoint's `text_model.embeddings.` and
        # `text_model.encoder.` levels (as nanoGPT does for GPT-2's names).
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(
                token_embedding=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
                position_embedding=nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size),
            )),
            encoder=nn.ModuleDict(dict(
                layers=nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)),
            )),
            final_layer_norm=nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps),
        ))

    def forward(self, input_ids: torch.Tensor) -> CLIPTextOutput:
        """input_ids (B, L) long, L <= max_position_embeddings -> (last_hidden_state (B, L, D), pooled (B, D))."""
        _check_ids("CLIPText", input_ids, self.cfg.vocab_size, self.cfg.max_position_embeddings)
        B, L = input_ids.shape
        tm = self.text_model
        position = torch.arange(L, device=input_ids.device)
        x = tm.embeddings.token_embedding(input_ids) + tm.embeddings.position_embedding(position)  # (B, L, D)
        for layer in tm.encoder.layers:
            x = layer(x)
        x = tm.final_layer_norm(x)                                                  # (B, L, D)
        pooled = x[torch.arange(B, device=x.device), input_ids.argmax(dim=-1)]      # (B, D)
        return CLIPTextOutput(x, pooled)


# -----------------------------------------------------------------------------------------------
# CLIP vision encoder
#
# The image tower of CLIP ViT-L/14 [4] ("openai/clip-vit-large-patch14") and the two projections
# into CLIP's joint embedding space. FLUX does not use it: the rewards do. The LAION aesthetic
# predictor (paper App. E.1, the differentiable reward of Table 2) is an MLP on the L2-normalised
# projected image embedding, and CLIPScore is the cosine between projected image and text embeddings.
# A ViT (Dosovitskiy et al. 2021, arXiv 2010.11929): the image is cut into P x P patches, each
# patch linearly embedded (a stride-P convolution without bias), a learned class token is prepended
# and learned absolute positions added; then a LayerNorm ("pre_layrnorm", misspelt in the
# checkpoints), the same pre-LN layers as the text tower but bidirectional (no causal mask), and the
# class token's state after "post_layernorm" is the pooled output, which `visual_projection` (no
# bias) maps to the joint space.
# Attribute names equal the keys of Hugging Face's CLIPVisionModelWithProjection / CLIPModel files.
# The preprocessing (resize, centre crop, normalise) is done here in torch so that gradients reach
# the pixels; `clip_preprocess` says where it differs from transformers' PIL-based processor.
# Shape letters: B batch, S image side, P patch side, N = (S / P)^2 patches, D hidden, E = projection_dim.

# OpenAI CLIP's per-channel pixel statistics (its preprocessing `Normalize`, and HF's image_mean/std).
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(kw_only=True)
class CLIPVisionConfig:
    """Architecture of a CLIP vision tower + projection (field names as in Hugging Face's config.json)."""

    hidden_size: int              # D, width of the residual stream (ViT-L/14: 1024)
    intermediate_size: int        # hidden width of the MLP (4096)
    num_hidden_layers: int        # transformer layers (24)
    num_attention_heads: int      # heads (16, so head dim 64)
    num_channels: int             # input image channels (3)
    image_size: int               # S, the side the tower is trained on; positions exist for it only (224)
    patch_size: int               # P, side of one patch = stride of the patch embedding (14)
    projection_dim: int           # E, width of the joint image-text embedding space (768)
    layer_norm_eps: float         # LayerNorm epsilon (1e-5)

    def __post_init__(self):
        check_field_types(self)
        if min(self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.num_attention_heads,
               self.num_channels, self.image_size, self.patch_size, self.projection_dim) < 1:
            raise ValueError(f"CLIPVisionConfig sizes must be positive, got {self}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        """N + 1: one position per patch plus the class token (ViT-L/14 at 224: 16^2 + 1 = 257)."""
        return (self.image_size // self.patch_size) ** 2 + 1


CLIP_VISION_CONFIGS = {
    "clip-vit-large-patch14": CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                               num_attention_heads=16, num_channels=3, image_size=224,
                                               patch_size=14, projection_dim=768, layer_norm_eps=1e-5),
    # For tests and notebooks: 2 layers, 4 heads x 8 channels, 32 x 32 images in 4 x 4 patches of 8 px.
    "tiny": CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_channels=3, image_size=32, patch_size=8, projection_dim=16, layer_norm_eps=1e-5),
}


def clip_preprocess(images: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """CLIP's image preprocessing, differentiable: (B, 3, H, W) in [0, 1] -> (B, 3, S, S) normalised.

    As transformers' CLIPImageProcessor: resize with bicubic filtering so that the shorter side is S
    (the longer one becomes int(S * long / short)), crop the centre S x S (offsets rounded down;
    OpenAI's torchvision pipeline rounds them to nearest, one pixel apart when the excess is odd),
    subtract CLIP_IMAGE_MEAN and divide by CLIP_IMAGE_STD per channel.
    The resize is PIL's algorithm in torch: `antialias=True` selects PIL's bicubic kernel (a = -0.5,
    widened by the scale factor when shrinking, so a 1024^2 FLUX image is low-pass filtered, not
    aliased), and like PIL it resizes the width first, then the height, clipping to [0, 1] after
    each pass (PIL stores 8-bit images). The only difference left: PIL also rounds to 8 bits after
    each pass, at most 0.5 / 255 after the first pass (carried into the second by a kernel whose
    absolute weights sum to at most 1.25) and 0.5 / 255 after the second, i.e. <= 1.125 / 255 per pixel
    before normalisation (test). Clipping zeroes the gradient of overshooting pixels only.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"clip_preprocess expects images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    short, long = min(H, W), max(H, W)
    new_long = int(image_size * long / short)
    h, w = (image_size, new_long) if H <= W else (new_long, image_size)
    x = images
    # PIL resizes horizontally first, then vertically, each as a separate 1-D pass
    if w != W:
        x = F.interpolate(x, size=(H, w), mode="bicubic", antialias=True, align_corners=False)  # (B, 3, H, w)
        x = x.clamp(0, 1)
    if h != H:
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)  # (B, 3, h, w)
        x = x.clamp(0, 1)
    top, left = (h - image_size) // 2, (w - image_size) // 2
    x = x[:, :, top:top + image_size, left:left + image_size]                    # (B, 3, S, S)
    mean = torch.tensor(CLIP_IMAGE_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_IMAGE_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class CLIPVisionOutput(NamedTuple):
    """What CLIPVision returns (the fields of transformers' CLIPVisionModelWithProjection output)."""

    last_hidden_state: torch.Tensor  # (B, N + 1, D) the last layer's states, class token first (no post_layernorm)
    pooled: torch.Tensor             # (B, D) post_layernorm(class token state)
    image_embeds: torch.Tensor       # (B, E) visual_projection(pooled), not normalised


class CLIPVisionEmbeddings(nn.Module):
    """Pixels (B, C, S, S) -> tokens (B, N + 1, D): [class token; patch embeddings] + positions."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, S/P, S/P)
        patches = patches.flatten(2).transpose(1, 2)                              # (B, N, D), row-major patches
        cls = self.class_embedding.expand(B, 1, -1)                               # (B, 1, D)
        position = torch.arange(self.cfg.num_positions, device=pixel_values.device)
        return torch.cat([cls, patches], dim=1) + self.position_embedding(position)  # (B, N + 1, D)


class CLIPVision(nn.Module):
    """CLIP image tower + visual_projection: pixel_values (B, C, S, S), normalised by `clip_preprocess`
    -> CLIPVisionOutput(last_hidden_state (B, N + 1, D), pooled (B, D), image_embeds (B, E))."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.cfg = cfg
        # ModuleDicts only to reproduce the checkpoint's `vision_model.` and `vision_model.encoder.` levels.
        self.vision_model = nn.ModuleDict(dict(
            embeddings=CLIPVisionEmbeddings(cfg),
            pre_layrnorm=nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps),  # sic, the checkpoint key
            encoder=nn.ModuleDict(dict(
                layers=nn.ModuleList(CLIPEncoderLayer(cfg, causal=False) for _ in range(cfg.num_hidden_layers)),
            )),
            post_layernorm=nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps),
        ))
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> CLIPVisionOutput:
        S = self.cfg.image_size
        _check_shape("CLIPVision pixel_values (use clip_preprocess)", pixel_values, (None, self.cfg.num_channels, S, S))
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))      # (B, N + 1, D)
        for layer in vm.encoder.layers:
            x = layer(x)
        pooled = vm.post_layernorm(x[:, 0])                   # (B, D), the class token
        return CLIPVisionOutput(x, pooled, self.visual_projection(pooled))


class CLIP(nn.Module):
    """A full CLIP model (transformers' CLIPModel): both towers, both projections into the joint space,
    and the learned temperature. What CLIPScore needs; the aesthetic predictor needs only `vision`.

    Its own attribute names nest the towers (`text.text_model.*`, `vision.vision_model.*`,
    `vision.visual_projection`), so that each tower is the standalone module; `clip_from_transformers`
    maps the file's flat names (`text_model.*`, `vision_model.*`, `visual_projection`) onto them.
    """

    def __init__(self, text: CLIPTextConfig, vision: CLIPVisionConfig):
        super().__init__()
        self.text = CLIPText(text)
        self.vision = CLIPVision(vision)
        self.text_projection = nn.Linear(text.hidden_size, vision.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.empty(()))  # log of the logits' scale (ln 100 in trained CLIPs)

    def text_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> projected text embeddings (B, E), not normalised (get_text_features)."""
        return self.text_projection(self.text(input_ids).pooled)  # (B, E)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, C, S, S) -> projected image embeddings (B, E), not normalised (get_image_features)."""
        return self.vision(pixel_values).image_embeds  # (B, E)


# -----------------------------------------------------------------------------------------------
# Tokenizers
#
# Prompt -> fixed-length id tensors, as FLUX's pipelines make them (padding="max_length",
# truncation=True):
#   CLIP  <|startoftext|> pieces <|endoftext|>, padded with <|endoftext|> to 77 ids. Byte-level
#         BPE (Radford et al. 2019, GPT-2; Sennrich et al. 2016) on lower-cased, whitespace-cleaned
#         text; a word's last piece carries the suffix `</w>`. Runs on the `tokenizers` library.
#   T5    SentencePiece unigram pieces (Kudo 2018) then </s> = 1, padded with <pad> = 0 to
#         max_length (FLUX.1: 256 for schnell, 512 for dev). No <s>. Runs on `sentencepiece`.
# Both tokenizers truncate long prompts keeping the final end token, and warn naming the prompt.
# The trainers build small vocabularies in the same file formats for the embedded model.

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# OpenAI CLIP's word pattern (simple_tokenizer.py): the specials, English contractions, runs of
# letters, single digits, runs of other non-space characters. Whitespace between them is dropped.
_CLIP_WORD_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"


def clip_byte_alphabet() -> dict[int, str]:
    """Byte -> the printable character that stands for it in byte-level BPE, in vocabulary order.

    GPT-2's scheme, which CLIP's vocabulary starts with: the 188 printable bytes ('!'..'~',
    '¡'..'¬', '®'..'ÿ') stand for themselves and come first; the 68 others (controls, space,
    ...) follow in byte order as chr(256), chr(257), ... So ids 0..255 are these characters and
    ids 256..511 the same characters with `</w>` appended (CLIP: "a" = 94, "a</w>" = 320).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def clip_pipeline(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Attach CLIP's text cleaning and word splitting to a `tokenizers` BPE model.

    OpenAI's CLIP also runs ftfy and HTML unescaping first; transformers' CLIPTokenizer does not,
    and neither do we (NFC normalisation, whitespace runs -> one space, lower case).
    """
    backend.normalizer = tokenizers.normalizers.Sequence([
        tokenizers.normalizers.NFC(),
        tokenizers.normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
        tokenizers.normalizers.Lowercase(),
    ])
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        # invert=True: the pattern's matches are the words; what lies between them (spaces) is removed.
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(_CLIP_WORD_PATTERN), behavior="removed", invert=True),
        # Each word's UTF-8 bytes -> clip_byte_alphabet characters (no further splitting).
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return backend


def _fixed_length(name: str, prompts: list[str], rows: list[list[int]], bos: int | None, eos: int, pad: int,
                  max_length: int, decode: Callable[[list[int]], str]) -> torch.Tensor:
    """[bos] + row + [eos] per prompt, cut to max_length (the eos is kept) and padded: (B, max_length) long."""
    head = [] if bos is None else [bos]
    room = max_length - len(head) - 1  # tokens of the prompt that fit
    out = torch.full((len(rows), max_length), pad, dtype=torch.long)
    for b, (prompt, row) in enumerate(zip(prompts, rows)):
        if len(row) > room:
            warnings.warn(f"{name} tokenizer: the prompt {prompt!r} has {len(row)} tokens but only {room} fit in "
                          f"max_length={max_length}; dropped the end: {decode(row[room:])!r}", stacklevel=3)
            row = row[:room]
        ids = head + row + [eos]
        out[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def _as_prompt_list(prompts: str | list[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
    return prompts


@dataclass
class CLIPTokenizer:
    """CLIP's BPE tokenizer: `tok(prompts)` -> ids (B, max_length), as transformers' CLIPTokenizer makes
    them with padding="max_length", truncation=True (<|startoftext|> ... <|endoftext|>, then padding)."""

    backend: tokenizers.Tokenizer  # BPE model + CLIP cleaning / splitting (see clip_pipeline)
    max_length: int                # ids per prompt, specials included (CLIP: 77 = its positions)
    bos_id: int                    # <|startoftext|> (49406 in CLIP)
    eos_id: int                    # <|endoftext|> (49407), also the padding and the unknown token

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def tokenize(self, prompt: str) -> list[str]:
        """The BPE pieces of one prompt, without specials ("red circles" -> ['red</w>', 'circles</w>'])."""
        return self.backend.encode(prompt, add_special_tokens=False).tokens

    def decode(self, ids: list[int]) -> str:
        """Ids -> text: pieces joined, `</w>` -> space, byte characters -> UTF-8."""
        byte_to_char = clip_byte_alphabet()
        char_to_byte = {c: b for b, c in byte_to_char.items()}
        text = "".join(self.backend.id_to_token(i) for i in ids).replace("</w>", byte_to_char[ord(" ")])
        return bytes(char_to_byte.get(c, ord("?")) for c in text).decode("utf-8", errors="replace").strip()

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """prompts (B strings) -> input_ids (B, max_length) long."""
        prompts = _as_prompt_list(prompts)
        rows = [e.ids for e in self.backend.encode_batch(prompts, add_special_tokens=False)]
        return _fixed_length("CLIP", prompts, rows, self.bos_id, self.eos_id, self.eos_id, self.max_length,
                             self.decode)


@dataclass
class T5Tokenizer:
    """T5's SentencePiece tokenizer: `tok(prompts)` -> ids (B, max_length), as transformers' T5Tokenizer
    makes them with padding="max_length", truncation=True (pieces, </s> = 1, then <pad> = 0)."""

    sp: sentencepiece.SentencePieceProcessor  # the unigram model of spiece.model
    max_length: int                           # ids per prompt, </s> included (FLUX.1: 256 schnell, 512 dev)

    @property
    def vocab_size(self) -> int:
        """Pieces in spiece.model (T5: 32000; its embedding has 32128 rows, for sentinels and padding)."""
        return self.sp.get_piece_size()

    def encode(self, prompt: str) -> list[int]:
        """The piece ids of one prompt, without the final </s>.

        <pad>, </s> and <unk> written in the prompt become their ids, and the text between them is
        encoded separately, as transformers' T5Tokenizer does (SentencePiece alone would spell them
        out). The 100 sentinels "<extra_id_N>" that transformers adds are not in spiece.model and
        are spelled out here; FLUX prompts never use them.
        """
        specials = [self.sp.id_to_piece(i) for i in (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id())]
        parts = re.split("(" + "|".join(map(re.escape, specials)) + ")", prompt)  # text, special, text, ...
        ids = []
        for i, part in enumerate(parts):
            ids += [self.sp.piece_to_id(part)] if i % 2 else self.sp.encode(part)
        return ids

    def tokenize(self, prompt: str) -> list[str]:
        """The pieces of one prompt, without </s> ("red circles" -> ['▁red', '▁circle', 's'])."""
        return [self.sp.id_to_piece(i) for i in self.encode(prompt)]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """prompts (B strings) -> input_ids (B, max_length) long."""
        prompts = _as_prompt_list(prompts)
        rows = [self.encode(p) for p in prompts]
        return _fixed_length("T5", prompts, rows, None, self.sp.eos_id(), self.sp.pad_id(), self.max_length,
                             self.decode)

# -----------------------------------------------------------------------------------------------
# Autoencoder
#
# The FLUX.1 autoencoder [1]: the KL-regularised convolutional autoencoder of latent diffusion [5],
# with 16 latent channels and an 8x smaller grid. The encoder maps an image (B, 3, H, W) in [-1, 1]
# to the mean and log-variance of a diagonal Gaussian over latents (B, 16, H/8, W/8); the decoder
# maps a latent back to pixels. The flow runs on z = scale_factor * (mean - shift_factor), which
# has roughly zero mean and unit variance; `decode` undoes that affine map first (flux.md sec. 3).
# Rewards are computed on decoded images (the paper's reward r(x0_hat), Sec. 3), and gradient
# guidance (DPS, App. E.1, Eq. 30) backpropagates through `decode`, so nothing here is no_grad.
# Shape letters: B batch, C channels, H x W pixels, h x w latent grid, f = 2^(levels - 1).


@dataclass(kw_only=True)
class AutoEncoderParams:
    """Architecture and latent normalisation of the FLUX autoencoder (BFL's `AutoEncoderParams`)."""

    resolution: int              # training image size; metadata only, any multiple of f works (BFL: 256)
    in_channels: int             # image channels encoded (RGB: 3)
    ch: int                      # base width; level i has ch * ch_mult[i] channels (128)
    out_ch: int                  # image channels decoded (RGB: 3)
    ch_mult: tuple[int, ...]     # width multiplier per level; len - 1 = number of 2x resamplings ((1, 2, 4, 4): 8x)
    num_res_blocks: int          # ResnetBlocks per encoder level; the decoder has one more per level (2)
    z_channels: int              # latent channels (16)
    scale_factor: float          # z = scale_factor * (mean - shift_factor): latent scale (0.3611)
    shift_factor: float          # latent shift (0.1159)
    num_groups: int = 32         # groups of every GroupNorm (BFL hard-codes 32; diffusers' norm_num_groups)

    def __post_init__(self):
        check_field_types(self)
        self.ch_mult = tuple(self.ch_mult)
        if not self.ch_mult or min(self.ch_mult) < 1 or self.ch < 1 or self.num_res_blocks < 1:
            raise ValueError(f"ch, num_res_blocks and every ch_mult must be positive, got ch={self.ch}, "
                             f"ch_mult={list(self.ch_mult)}, num_res_blocks={self.num_res_blocks}")
        widths = sorted({self.ch} | {self.ch * m for m in self.ch_mult})
        if any(w % self.num_groups for w in widths):
            raise ValueError(f"every width {widths} (ch * ch_mult) must be divisible by num_groups {self.num_groups}")
        if self.scale_factor == 0:
            raise ValueError("scale_factor must be non-zero (decode divides by it)")

    @property
    def downsample(self) -> int:
        """f: pixels per latent cell along each side (8 for FLUX)."""
        return 2 ** (len(self.ch_mult) - 1)


AE_CONFIGS = {
    "flux": AutoEncoderParams(resolution=256, in_channels=3, ch=128, out_ch=3, ch_mult=(1, 2, 4, 4),
                              num_res_blocks=2, z_channels=16, scale_factor=0.3611, shift_factor=0.1159),
    # For tests and notebooks: the same architecture with 2 levels (f = 2), 16/32 channels, 8 groups.
    "tiny": AutoEncoderParams(resolution=32, in_channels=3, ch=16, out_ch=3, ch_mult=(1, 2), num_res_blocks=1,
                              z_channels=4, scale_factor=0.3611, shift_factor=0.1159, num_groups=8),
}


class ResnetBlock(nn.Module):
    """x + conv(swish(GN(conv(swish(GN(x)))))), the skip through a 1x1 conv when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # nn.Identity has no tensors, so blocks that keep their width have no nin_shortcut key, as in BFL.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h * w grid cells (only in the middle of each half).

    q, k, v and proj_out are 1x1 convolutions, as in the BFL checkpoint (diffusers stores them as
    Linear layers; `ae_diffusers_table` converts).
    """

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # One head of width C over the H * W cells: (B, C, H, W) -> (B, heads = 1, HW, C).
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), softmax(q k^T / sqrt(C)) v
        h = h.transpose(2, 3).reshape(B, C, H, W)    # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve the grid: pad one zero row and column at the bottom/right, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (LDM's choice): an even H maps to exactly H/2.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the grid: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, num_groups: int) -> nn.Module:
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution (`mid.block_1 / attn_1 / block_2`)."""
    mid = nn.Module()  # a bare container, so that the attribute names are the checkpoint's
    mid.block_1 = ResnetBlock(channels, channels, num_groups)
    mid.attn_1 = AttnBlock(channels, num_groups)
    mid.block_2 = ResnetBlock(channels, channels, num_groups)
    return mid


class AEEncoder(nn.Module):
    """Image (B, in_channels, H, W) -> posterior parameters (B, 2 z_channels, H/f, W/f) = [mean | logvar]."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        G = params.num_groups
        self.conv_in = nn.Conv2d(params.in_channels, params.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = params.ch
        for i, mult in enumerate(params.ch_mult):
            level = nn.Module()  # `down.{i}.block.{j}`, `down.{i}.downsample` as in BFL
            block_out = params.ch * mult
            level.block = nn.ModuleList(ResnetBlock(block_in if j == 0 else block_out, block_out, G)
                                        for j in range(params.num_res_blocks))
            block_in = block_out
            level.downsample = Downsample(block_in) if i != len(params.ch_mult) - 1 else nn.Identity()
            self.down.append(level)
        self.mid = _mid(block_in, G)
        self.norm_out = nn.GroupNorm(G, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, 2 * params.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class AEDecoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, f h, f w)."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        G = params.num_groups
        block_in = params.ch * params.ch_mult[-1]
        self.conv_in = nn.Conv2d(params.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, G)
        up = []
        for i in reversed(range(len(params.ch_mult))):  # built (and run) from the lowest resolution up
            level = nn.Module()  # `up.{i}.block.{j}`, `up.{i}.upsample` as in BFL
            block_out = params.ch * params.ch_mult[i]
            level.block = nn.ModuleList(ResnetBlock(block_in if j == 0 else block_out, block_out, G)
                                        for j in range(params.num_res_blocks + 1))
            block_in = block_out
            level.upsample = Upsample(block_in) if i != 0 else nn.Identity()
            up.insert(0, level)
        # BFL indexes the levels by resolution, up.0 = full resolution, though it runs them last to
        # first (diffusers' up_blocks are numbered in running order: up_blocks.0 = BFL up.{n-1}).
        self.up = nn.ModuleList(up)
        self.norm_out = nn.GroupNorm(G, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, params.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """The FLUX.1 autoencoder: `encode` images to flow latents, `decode` latents to images.

    Attribute names equal the BFL `ae.safetensors` keys (`decoder.up.3.block.0.norm1.weight`, ...).
    """

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = AEEncoder(params)
        self.decoder = AEDecoder(params)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image x (B, in_channels, H, W) in [-1, 1] -> flow latent z (B, z_channels, H/f, W/f).

        z = scale_factor * (mean - shift_factor) of the encoder's Gaussian posterior (flux.md sec. 3),
        deterministic like diffusers' `latent_dist.mean`. With a `generator`, a posterior draw
        mean + exp(logvar / 2) * eps replaces the mean (what BFL's `DiagonalGaussian` does by default).
        H and W must be multiples of f (8 for FLUX) so that `decode` returns the same size.
        """
        p = self.params
        if x.ndim != 4 or x.shape[1] != p.in_channels or x.shape[2] % p.downsample or x.shape[3] % p.downsample:
            raise ValueError(f"encode expects images (B, {p.in_channels}, H, W) with H and W multiples of "
                             f"{p.downsample}, got {tuple(x.shape)}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # 2 x (B, z_channels, h, w)
        latent = mean
        if generator is not None:
            eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
            latent = mean + torch.exp(0.5 * logvar) * eps.to(mean.device)
        return p.scale_factor * (latent - p.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Flow latent z (B, z_channels, h, w) -> image (B, out_ch, f h, f w), nominally in [-1, 1].

        The decoder sees z / scale_factor + shift_factor, the inverse of `encode`'s map. The output
        is not clamped (the FLUX pipelines clamp to [-1, 1] only when writing pixels), so gradients
        reach every pixel.
        """
        if z.ndim != 4 or z.shape[1] != self.params.z_channels:
            raise ValueError(f"decode expects latents (B, {self.params.z_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(z / self.params.scale_factor + self.params.shift_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)): the reconstruction of x (B, in_channels, H, W)."""
        return self.decode(self.encode(x))


# -----------------------------------------------------------------------------------------------
# Pixel latent: the embedded model's stand-in for the autoencoder
#
# The embedded mini-FLUX (train.py) has no pretrained autoencoder to borrow, so its "latent" is the
# image itself, rearranged: pixel_unshuffle moves each f x f block of pixels into channels, exactly
# invertible and linear. A 32x32 RGB image becomes a (12, 16, 16) latent, which FLUX's own 2x2 `pack`
# turns into 8 x 8 = 64 tokens of 48 channels, the way a real 1024^2 image becomes a (16, 128, 128)
# latent and 4096 tokens of 64 channels. It has the AutoEncoder's encode/decode interface, so the
# pipeline and the DPS gradient path do not care which one they hold.


class PixelLatent(nn.Module):
    """encode: (B, 3, H, W) in [-1, 1] -> (B, 3 f^2, H/f, W/f); decode is its exact inverse."""

    def __init__(self, factor: int = 2):
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor}")
        self.factor = factor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"expected (B, C, H, W) with H and W divisible by {self.factor}, got {tuple(x.shape)}")
        return F.pixel_unshuffle(x, self.factor)  # (B, C f^2, H/f, W/f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(z, self.factor)  # (B, C, H, W)
