"""
The FLUX.1 text-to-image stack, from scratch, in one file.

    Flux          the MMDiT velocity network (double-stream + single-stream blocks)
    T5Encoder     T5 v1.1 encoder (the `txt` sequence FLUX attends to)
    CLIPText      CLIP ViT-L/14 text tower (the pooled `y` vector that modulates FLUX)
    AutoEncoder   the FLUX autoencoder (16 latent channels, scale 0.3611, shift 0.1159)
    tokenizers    CLIP BPE (`tokenizers`) and T5 SentencePiece (`sentencepiece`)
    loaders       load_flux / load_t5 / load_clip_text / load_autoencoder, reading the real
                  release files (BFL single files and Hugging Face / diffusers folders)

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

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# -----------------------------------------------------------------------------------------------
# Checkpoint utilities shared by every loader


class CheckpointError(ValueError):
    """A checkpoint file or folder that does not match the model it is loaded into."""


def read_safetensors(paths: str | Path | Iterable[str | Path]) -> dict[str, torch.Tensor]:
    """Read one or several (sharded) safetensors files into one state dict.

    The tensors are memory-mapped by safetensors, so reading costs no extra copy until a tensor
    is touched; `load_state_dict(assign=True)` then adopts them without copying again.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        try:
            shard = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file (corrupt or truncated?): {e}"
            ) from None
        duplicated = state.keys() & shard.keys()
        if duplicated:
            raise CheckpointError(f"{path} repeats tensors of another shard: {sorted(duplicated)[:5]}")
        state.update(shard)
    return state


def read_sharded_folder(folder: str | Path, stem: str) -> dict[str, torch.Tensor]:
    """Read `{stem}.safetensors`, or the shards listed in `{stem}.safetensors.index.json`.

    This is the Hugging Face / diffusers layout (`stem` = "model" for transformers,
    "diffusion_pytorch_model" for diffusers).
    """
    folder = Path(folder)
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return read_safetensors(folder / name for name in sorted(set(weight_map.values())))
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(
        f"{folder}: expected {single.name} or {index.name} (+ shards); found {found[:10]}"
    )


def _first(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_checkpoint_into(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path,
                         dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Strict `load_state_dict(assign=True)` with one readable error instead of torch's.

    `module` is normally built on the meta device; its parameters are replaced by the checkpoint
    tensors (cast to `dtype` and moved to `device`), so the weights exist once in memory.
    Missing, unexpected and wrongly shaped tensors are all listed in a single CheckpointError that
    names the file.
    """
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected.keys() & state.keys()
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong_shape:
        lines = [f"{source} does not match {type(module).__name__}:"]
        if missing:
            lines.append(f"  {len(missing)} missing: {_first(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected: {_first(unexpected)}")
        if wrong_shape:
            lines.append(f"  {len(wrong_shape)} wrong shape: {_first(wrong_shape, 3)}")
        lines.append("  Is this the right file for this model and config?")
        raise CheckpointError("\n".join(lines))
    state = {k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
             for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    # Buffers that are computed, not stored (e.g. position ids), were left on the meta device.
    for name, buf in module.named_buffers():
        assert not buf.is_meta, f"buffer {name} was not restored after loading {source}"
    return module.eval()


# -----------------------------------------------------------------------------------------------
# Flux MMDiT                                                        (section owner: flux helper)
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
    real products on the strided halves).
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, L, H, Dh/2), complex
    return torch.view_as_real(pairs * rot).flatten(-2).type_as(x)           # (B, L, H, Dh)


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
    """x / rms(x) * scale over the last dim, computed in float32 (the QK-norm of FLUX)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rrms = torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        return (x.float() * rrms).to(x.dtype) * self.scale


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
        rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)  # e^(i angle), same shape

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, rot)
        x = torch.cat((txt, img), dim=1)  # (B, L_txt + L_img, D)
        for block in self.single_blocks:
            x = block(x, vec, rot)
        return self.final_layer(x[:, L_txt:], vec)  # (B, L_img, out_channels)


def _check_shape(name: str, x: torch.Tensor, shape: tuple[int | None, ...]) -> None:
    """ValueError unless x has `shape` (None matches any size)."""
    if x.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape ({want}), got {tuple(x.shape)}")


# -----------------------------------------------------------------------------------------------
# T5 v1.1 encoder                                                   (section owner: text helper)

# -----------------------------------------------------------------------------------------------
# CLIP text encoder                                                 (section owner: text helper)

# -----------------------------------------------------------------------------------------------
# Tokenizers                                                        (section owner: text helper)

# -----------------------------------------------------------------------------------------------
# Autoencoder                                                       (section owner: ae helper)

# -----------------------------------------------------------------------------------------------
# Loaders for the real release files                   (each helper adds its own load_* function)


# Flux: BFL single files and diffusers folders --------------------------------------------------

_COMFY_PREFIX = "model.diffusion_model."  # ComfyUI-style files nest the transformer under this


def flux_diffusers_table(params: FluxParams) -> dict[str, str | list[tuple[str, int, int]]]:
    """The one BFL <-> diffusers name table for the Flux transformer, module by module.

    BFL module -> diffusers module (same weight and bias), or -> parts [(diffusers module, start,
    stop), ...]: the BFL tensor is the concatenation along dim 0 of `diffusers[start:stop]` over
    the parts. That covers the three differences between the formats: BFL fuses q|k|v (and, in
    single blocks, q|k|v|mlp-in) into one Linear, and orders the final adaLN output (shift, scale)
    where diffusers' AdaLayerNormContinuous has (scale, shift). The RMSNorm gain is `scale` in
    BFL and `weight` in diffusers. Row counts come from `params`, so any size converts (diffusers'
    own converter hard-codes 3072).
    """
    D, M = params.hidden_size, int(params.hidden_size * params.mlp_ratio)
    table: dict[str, str | list[tuple[str, int, int]]] = {
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.linear": "proj_out",
        "final_layer.adaLN_modulation.1": [("norm_out.linear", D, 2 * D), ("norm_out.linear", 0, D)],
    }
    for i in range(params.depth):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        table |= {
            f"{b}.img_mod.lin": f"{d}.norm1.linear",
            f"{b}.img_attn.qkv": [(f"{d}.attn.to_q", 0, D), (f"{d}.attn.to_k", 0, D), (f"{d}.attn.to_v", 0, D)],
            f"{b}.img_attn.norm.query_norm": f"{d}.attn.norm_q",
            f"{b}.img_attn.norm.key_norm": f"{d}.attn.norm_k",
            f"{b}.img_attn.proj": f"{d}.attn.to_out.0",
            f"{b}.img_mlp.0": f"{d}.ff.net.0.proj",
            f"{b}.img_mlp.2": f"{d}.ff.net.2",
            f"{b}.txt_mod.lin": f"{d}.norm1_context.linear",
            f"{b}.txt_attn.qkv": [(f"{d}.attn.add_q_proj", 0, D), (f"{d}.attn.add_k_proj", 0, D),
                                  (f"{d}.attn.add_v_proj", 0, D)],
            f"{b}.txt_attn.norm.query_norm": f"{d}.attn.norm_added_q",
            f"{b}.txt_attn.norm.key_norm": f"{d}.attn.norm_added_k",
            f"{b}.txt_attn.proj": f"{d}.attn.to_add_out",
            f"{b}.txt_mlp.0": f"{d}.ff_context.net.0.proj",
            f"{b}.txt_mlp.2": f"{d}.ff_context.net.2",
        }
    for i in range(params.depth_single_blocks):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        table |= {
            f"{b}.linear1": [(f"{d}.attn.to_q", 0, D), (f"{d}.attn.to_k", 0, D), (f"{d}.attn.to_v", 0, D),
                             (f"{d}.proj_mlp", 0, M)],
            f"{b}.linear2": f"{d}.proj_out",
            f"{b}.norm.query_norm": f"{d}.attn.norm_q",
            f"{b}.norm.key_norm": f"{d}.attn.norm_k",
            f"{b}.modulation.lin": f"{d}.norm.linear",
        }
    return table


def _flux_tensor_parts(bfl_key: str, table: dict) -> list[tuple[str, int | None, int | None]]:
    """`flux_diffusers_table` for one tensor: BFL tensor name -> [(diffusers tensor, start, stop)]."""
    module, leaf = bfl_key.rsplit(".", 1)
    leaf = "weight" if leaf == "scale" else leaf
    entry = table[module]
    if isinstance(entry, str):
        return [(f"{entry}.{leaf}", None, None)]
    return [(f"{name}.{leaf}", start, stop) for name, start, stop in entry]


def flux_from_diffusers(state: dict[str, torch.Tensor], params: FluxParams,
                        source: str | Path = "state dict") -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel tensors -> BFL names (consumes `state` as it goes).

    Tensors the table does not know, or whose parts are incomplete, are passed through under their
    diffusers names, so that the strict load reports them as unexpected (and the BFL ones as missing).
    """
    table = flux_diffusers_table(params)
    with torch.device("meta"):
        bfl_keys = list(Flux(params).state_dict())
    out = {}
    for key in bfl_keys:
        parts = _flux_tensor_parts(key, table)
        if not all(name in state for name, _, _ in parts):
            continue
        pieces = []
        for name, start, stop in parts:
            t = state[name]
            expected_rows = max(s for n, _, s in parts if n == name) if stop is not None else len(t)
            if t.ndim == 0 or len(t) != expected_rows:
                raise CheckpointError(f"{source}: {name} has shape {tuple(t.shape)}, expected {expected_rows} "
                                      f"rows for {key} of this config; does config.json match the weights?")
            pieces.append(t if stop is None else t[start:stop])
        try:
            out[key] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        except RuntimeError:
            raise CheckpointError(f"{source}: cannot concatenate {[n for n, _, _ in parts]} into {key}: "
                                  f"shapes {[tuple(p.shape) for p in pieces]}") from None
        for name in {n for n, _, _ in parts}:
            del state[name]
    out.update(state)  # leftovers: reported as unexpected by the strict load
    return out


def flux_to_diffusers(state: dict[str, torch.Tensor], params: FluxParams) -> dict[str, torch.Tensor]:
    """BFL-named Flux tensors -> diffusers names: the inverse of `flux_from_diffusers`."""
    table = flux_diffusers_table(params)
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, t in state.items():
        offset = 0
        for name, start, stop in _flux_tensor_parts(key, table):
            rows = len(t) if stop is None else stop - start
            pieces.setdefault(name, []).append((start or 0, t[offset:offset + rows]))
            offset += rows
        assert offset == len(t), f"{key} {tuple(t.shape)} does not split as {_flux_tensor_parts(key, table)}"
    return {name: torch.cat([piece for _, piece in sorted(parts, key=lambda p: p[0])]).contiguous()
            for name, parts in pieces.items()}


# diffusers' FluxTransformer2DModel config.json fields -> FluxParams fields. diffusers fixes the
# rest: mlp_ratio 4, theta 10000, qkv_bias True (and packs outside the model: patch_size 1).
_DIFFUSERS_FLUX_FIELDS = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "pooled_projection_dim": "vec_in_dim",
    "joint_attention_dim": "context_in_dim",
    "num_attention_heads": "num_heads",
    "num_layers": "depth",
    "num_single_layers": "depth_single_blocks",
    "axes_dims_rope": "axes_dim",
    "guidance_embeds": "guidance_embed",
}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable JSON file: {e}") from None


def _flux_params_from_diffusers_config(config: dict, source: Path) -> FluxParams:
    """A diffusers transformer config.json -> FluxParams (missing fields take diffusers' defaults,
    which are FLUX.1's)."""
    unknown = sorted(k for k in config if not k.startswith("_")
                     and k not in _DIFFUSERS_FLUX_FIELDS and k not in ("attention_head_dim", "patch_size"))
    if unknown or config.get("patch_size", 1) != 1:
        raise CheckpointError(f"{source}: not a FluxTransformer2DModel config with patch_size 1 "
                              f"(unknown fields {unknown}, patch_size {config.get('patch_size', 1)})")
    defaults = FLUX_CONFIGS["flux-schnell"]
    fields = {ours: config.get(theirs, getattr(defaults, ours)) for theirs, ours in _DIFFUSERS_FLUX_FIELDS.items()}
    heads, head_dim = fields["num_heads"], config.get("attention_head_dim", 128)
    try:
        return FluxParams(**fields, hidden_size=heads * head_dim, mlp_ratio=4.0, theta=10_000, qkv_bias=True)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _flux_params_from_shapes(state: dict[str, torch.Tensor], source: Path,
                             axes_dim: tuple[int, ...] | None, theta: int) -> FluxParams:
    """Infer FluxParams from the tensor shapes of a BFL-named state dict (all but RoPE's axes_dim)."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{source}: no tensor {key}, cannot infer the Flux config "
                                  f"(is this a FLUX transformer file? pass config= to load it anyway)")
        return tuple(state[key].shape)

    def count(prefix: str) -> int:
        return len({k.split(".")[1] for k in state if k.startswith(prefix)})

    D, in_channels = shape("img_in.weight")
    depth, depth_single = count("double_blocks."), count("single_blocks.")
    if depth:
        (head_dim,) = shape("double_blocks.0.img_attn.norm.query_norm.scale")
        mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0]
    else:
        (head_dim,) = shape("single_blocks.0.norm.query_norm.scale")
        mlp_hidden = shape("single_blocks.0.linear1.weight")[0] - 3 * D
    if axes_dim is None:
        if head_dim != 128:
            raise CheckpointError(
                f"{source}: cannot infer the RoPE axes_dim for head dim {head_dim} from tensor shapes "
                f"(only FLUX.1's head dim 128 implies (16, 56, 56)); pass config=FluxParams(...) or put "
                f"a config.json with axes_dim (or diffusers' axes_dims_rope) next to the file")
        axes_dim = (16, 56, 56)
    try:
        return FluxParams(in_channels=in_channels, out_channels=shape("final_layer.linear.weight")[0],
                          vec_in_dim=shape("vector_in.in_layer.weight")[1],
                          context_in_dim=shape("txt_in.weight")[1], hidden_size=D,
                          mlp_ratio=mlp_hidden / D, num_heads=D // head_dim, depth=depth,
                          depth_single_blocks=depth_single, axes_dim=axes_dim, theta=theta,
                          qkv_bias=depth == 0 or "double_blocks.0.img_attn.qkv.bias" in state,
                          guidance_embed="guidance_in.in_layer.weight" in state)
    except ValueError as e:
        raise CheckpointError(f"{source}: inferred an invalid Flux config: {e}") from None


def load_flux(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
              config: FluxParams | str | None = None) -> Flux:
    """Load a Flux transformer from any of the FLUX.1 release layouts.

    path is one of
      - a BFL single file (`flux1-dev.safetensors`; keys may carry ComfyUI's `model.diffusion_model.`
        prefix, then only those keys are read). The config is inferred from the tensor shapes;
        RoPE's axes_dim (and theta) come from `config=`, else from a config.json next to the file
        (BFL or diffusers field names), else (16, 56, 56) when the head dim is FLUX.1's 128.
      - a diffusers `transformer/` folder: config.json + diffusion_pytorch_model.safetensors (or
        .safetensors.index.json + shards); names are converted by `flux_diffusers_table`.
      - a whole FLUX.1 repository folder (it has `transformer/`), or a folder with one flux1-*.safetensors.
    config (a FluxParams or a FLUX_CONFIGS name) overrides what the files say; the load is strict
    either way. The model is built on the meta device and adopts the file's tensors (cast to
    `dtype` if given, moved to `device`).
    """
    path = Path(path)
    if isinstance(config, str):
        if config not in FLUX_CONFIGS:
            raise ValueError(f"unknown Flux config {config!r}; known: {sorted(FLUX_CONFIGS)}")
        config = FLUX_CONFIGS[config]
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        singles = sorted(path.glob("flux1-*.safetensors"))
        has_weights = any((folder / f"diffusion_pytorch_model.safetensors{suffix}").is_file()
                          for suffix in ("", ".index.json"))
        if (folder / "config.json").is_file() and (has_weights or not singles):
            params = config or _flux_params_from_diffusers_config(_read_json(folder / "config.json"),
                                                                 folder / "config.json")
            state = flux_from_diffusers(read_sharded_folder(folder, "diffusion_pytorch_model"), params, folder)
            return _load_flux_state(params, state, folder, device, dtype)
        if len(singles) != 1:
            found = sorted(p.name for p in path.iterdir())
            raise CheckpointError(
                f"{path}: not a Flux checkpoint folder. Expected a diffusers transformer folder "
                f"(config.json + diffusion_pytorch_model.safetensors, or "
                f"diffusion_pytorch_model.safetensors.index.json + shards), a repository folder with "
                f"transformer/, or one BFL flux1-*.safetensors file; found {found[:10]}")
        path = singles[0]
    if not path.is_file():
        raise CheckpointError(f"Flux checkpoint not found: {path}")

    state = read_safetensors(path)
    if any(k.startswith(_COMFY_PREFIX) for k in state):
        state = {k[len(_COMFY_PREFIX):]: v for k, v in state.items() if k.startswith(_COMFY_PREFIX)}
    beside = path.parent / "config.json"
    file_config = _read_json(beside) if beside.is_file() else None
    if "x_embedder.weight" in state:  # a diffusers-named single file
        if config is None and file_config is None:
            raise CheckpointError(f"{path} has diffusers tensor names: put its config.json next to it, "
                                  f"or pass config=")
        params = config or _flux_params_from_diffusers_config(file_config, beside)
        return _load_flux_state(params, flux_from_diffusers(state, params, path), path, device, dtype)
    if config is None:
        file_config = file_config or {}
        axes_dim = file_config.get("axes_dim", file_config.get("axes_dims_rope"))
        config = _flux_params_from_shapes(state, path, axes_dim, file_config.get("theta", 10_000))
    return _load_flux_state(config, state, path, device, dtype)


def _load_flux_state(params: FluxParams, state: dict[str, torch.Tensor], source: Path,
                     device: str | torch.device, dtype: torch.dtype | None) -> Flux:
    with torch.device("meta"):
        model = Flux(params)
    return load_checkpoint_into(model, state, source, dtype=dtype, device=device)


def save_flux(model: Flux, folder: str | Path) -> None:
    """Write `model` as a diffusers transformer folder: config.json + diffusion_pytorch_model.safetensors.

    The files are in the real FLUX.1 release format: `load_flux` and diffusers'
    `FluxTransformer2DModel.from_pretrained` both read them.
    """
    p = model.params
    if p.mlp_ratio != 4.0 or p.theta != 10_000 or not p.qkv_bias:
        raise ValueError(f"diffusers' FluxTransformer2DModel fixes mlp_ratio=4, theta=10000, qkv_bias=True; "
                         f"this model has {p.mlp_ratio}, {p.theta}, {p.qkv_bias}")
    config = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1", "patch_size": 1,
              "attention_head_dim": p.hidden_size // p.num_heads}
    config |= {theirs: getattr(p, ours) for theirs, ours in _DIFFUSERS_FLUX_FIELDS.items()}
    config["axes_dims_rope"] = list(p.axes_dim)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_file(flux_to_diffusers(state, p), str(folder / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})


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
