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

import collections
import io
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import sentencepiece
import tokenizers
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
        weight_map = read_json(index).get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
            raise CheckpointError(f"{index}: expected a 'weight_map' object of tensor name -> shard file, "
                                  f"got {weight_map!r:.80}")
        return read_safetensors(folder / name for name in sorted(set(weight_map.values())))
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(
        f"{folder}: expected {single.name} or {index.name} (+ shards); found {found[:10]}"
    )


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


def has_sharded_weights(folder: Path, stem: str) -> bool:
    """Does `folder` hold `{stem}.safetensors` or `{stem}.safetensors.index.json` (what read_sharded_folder reads)?"""
    return any((folder / f"{stem}.safetensors{suffix}").is_file() for suffix in ("", ".index.json"))


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
    wrong_dtype = sorted(f"{k} ({state[k].dtype})" for k in expected.keys() & state.keys()
                         if expected[k].is_floating_point() != state[k].is_floating_point()
                         or (not expected[k].is_floating_point() and state[k].dtype != expected[k].dtype))
    if wrong_dtype:
        raise CheckpointError(f"{source}: {len(wrong_dtype)} tensors are integer or bool where "
                              f"{type(module).__name__} has floats: {_first(wrong_dtype, 3)}")
    relabelled = sorted(k for k in state if _looks_like_relabelled_bf16(state[k]))
    if relabelled:
        raise CheckpointError(f"{source}: {len(relabelled)} float16 matrices hold values that look like bfloat16 "
                              f"bits labelled float16 (nearly all magnitudes in [0.5, 2)): {_first(relabelled, 3)}")
    state = {k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
             for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    # Buffers that are computed, not stored (e.g. position ids), were left on the meta device.
    for name, buf in module.named_buffers():
        assert not buf.is_meta, f"buffer {name} was not restored after loading {source}"
    return module.eval()


def _looks_like_relabelled_bf16(t: torch.Tensor) -> bool:
    """A float16 matrix whose bytes are really bfloat16: every bfloat16 magnitude in [2^-15, 2) -- all
    of a trained weight matrix -- reads as a float16 magnitude in [0.5, 2). A genuine weight matrix
    (roughly Gaussian, small) never has 99% of its first 65536 non-zero entries there."""
    if t.dtype != torch.float16 or t.ndim < 2 or t.numel() < 256:
        return False
    sample = t.flatten()[:65536].float().abs()
    sample = sample[sample > 0]
    if len(sample) < 256:
        return False
    return bool(((sample >= 0.5) & (sample < 2)).float().mean() > 0.99)


def build_and_load(build: Callable[[], nn.Module], state: dict[str, torch.Tensor], source: str | Path, *,
                   device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """`build()` on the meta device (no memory, no init), then `load_checkpoint_into` adopts `state`."""
    with torch.device("meta"):
        module = build()
    return load_checkpoint_into(module, state, source, dtype=dtype, device=device)


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
        # e^(i angle) in complex64, or complex128 for a float64 model (apply_rope then computes in float64)
        rot = torch.polar(torch.ones_like(angles), angles).to(
            torch.complex128 if dtype == torch.float64 else torch.complex64)  # (n, L_txt + L_img, 1, Dh/2)

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


def _clip_pipeline(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
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

    backend: tokenizers.Tokenizer  # BPE model + CLIP cleaning / splitting (see _clip_pipeline)
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


def _component_folder(path: str | Path, subfolder: str, marker: str, expected: str) -> Path:
    """`path` if it holds `marker`, else `path/subfolder` if that does (path = a FLUX.1 repository root)."""
    path = Path(path)
    for folder in (path, path / subfolder):
        if (folder / marker).is_file():
            return folder
    found = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else "no such folder"
    raise CheckpointError(f"{path}: expected {expected}, or a FLUX.1 repository folder with {subfolder}/ "
                          f"holding them; found {found}")


def load_clip_tokenizer(path: str | Path, max_length: int = 77) -> CLIPTokenizer:
    """Read a CLIP tokenizer folder (vocab.json + merges.txt) or a FLUX.1 repository root (its tokenizer/)."""
    if max_length < 2:
        raise ValueError(f"max_length must leave room for <|startoftext|> and <|endoftext|>, got {max_length}")
    folder = _component_folder(path, "tokenizer", "vocab.json", "a CLIP tokenizer folder (vocab.json + merges.txt)")
    if not (folder / "merges.txt").is_file():
        raise CheckpointError(f"{folder}: has vocab.json but no merges.txt")
    try:
        bpe = tokenizers.models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                              unk_token=CLIP_EOS, end_of_word_suffix="</w>",
                                              continuing_subword_prefix="", fuse_unk=False)
    except Exception as e:  # the tokenizers library raises a bare Exception for unreadable files
        raise CheckpointError(f"{folder}: vocab.json / merges.txt are not a readable BPE vocabulary: "
                              f"{str(e).splitlines()[0]}") from None
    backend = _clip_pipeline(tokenizers.Tokenizer(bpe))
    bos_id, eos_id = backend.token_to_id(CLIP_BOS), backend.token_to_id(CLIP_EOS)
    if bos_id is None or eos_id is None:
        raise CheckpointError(f"{folder}/vocab.json has no {CLIP_BOS} or {CLIP_EOS}: not a CLIP vocabulary")
    # Specials written in a prompt map to their ids instead of being split into pieces (as transformers).
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in (CLIP_BOS, CLIP_EOS)])
    return CLIPTokenizer(backend, max_length, bos_id, eos_id)


def load_t5_tokenizer(path: str | Path, max_length: int = 256) -> T5Tokenizer:
    """Read a T5 tokenizer folder (spiece.model) or a FLUX.1 repository root (its tokenizer_2/)."""
    if max_length < 1:
        raise ValueError(f"max_length must leave room for </s>, got {max_length}")
    folder = _component_folder(path, "tokenizer_2", "spiece.model", "a T5 tokenizer folder (spiece.model)")
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.load(str(folder / "spiece.model"))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{folder / 'spiece.model'} is not a SentencePiece model: {e}") from None
    layout = (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id())
    if layout != (0, 1, 2, -1):
        raise CheckpointError(f"{folder / 'spiece.model'}: ids (pad, eos, unk, bos) = {layout}, but T5 uses "
                              f"(0, 1, 2, none)")
    return T5Tokenizer(sp, max_length)


def train_clip_bpe(corpus: list[str], vocab_size: int, folder: str | Path) -> Path:
    """Learn a CLIP-format BPE vocabulary of at most vocab_size tokens on `corpus`; write it to `folder`.

    Files: vocab.json, merges.txt ("#version: 0.2" + one merge per line), tokenizer_config.json and
    special_tokens_map.json, as in FLUX.1's tokenizer/, so `load_clip_tokenizer` and transformers'
    CLIPTokenizer read it. Vocabulary order as CLIP's: the 256 byte characters, their `</w>`
    forms, one token per merge in merge order, <|startoftext|>, <|endoftext|> (the largest id, which
    the argmax pooling of `CLIPText` relies on). To leave room for merges in a small vocabulary,
    only characters occurring in the corpus get a `</w>` form (CLIP has all 256); a word ending in
    another character encodes that piece as the unknown token <|endoftext|>. The merges are
    learned by the `tokenizers` BPE trainer on the corpus, cleaned and split exactly as at
    tokenization. The vocabulary is smaller than vocab_size when the corpus runs out of pairs.
    """
    byte_chars = list(clip_byte_alphabet().values())
    backend = _clip_pipeline(tokenizers.Tokenizer(tokenizers.models.BPE(end_of_word_suffix="</w>")))
    seen = {c for text in corpus for word, _ in backend.pre_tokenizer.pre_tokenize_str(
        backend.normalizer.normalize_str(text)) for c in word}
    vocab = {token: i for i, token in enumerate(byte_chars + [c + "</w>" for c in byte_chars if c in seen])}
    if vocab_size < len(vocab) + 2:
        raise ValueError(f"vocab_size {vocab_size} is too small: this corpus needs {len(vocab)} byte tokens + 2 "
                         f"specials before any merge (256 bytes + {len(vocab) - 256} word-end forms)")
    # The trainer's size counts its own alphabet (at most 256 bytes + 256 word-end forms) too, so
    # 512 + vocab_size lets it learn at least as many merges as can be kept; BPE is greedy, so the
    # first k merges of a longer run are the merges of a run stopped at k.
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=512 + vocab_size, show_progress=False,
                                             initial_alphabet=byte_chars, end_of_word_suffix="</w>")
    backend.train_from_iterator(corpus, trainer)
    learned = json.loads(backend.to_str())["model"]["merges"]  # in learning order = application rank
    merges = []
    for pair in learned:
        if len(vocab) == vocab_size - 2:
            break
        left, right = pair.split(" ") if isinstance(pair, str) else pair
        assert left in vocab and right in vocab, f"merge {pair} uses a token outside the vocabulary"
        merges.append(f"{left} {right}")
        vocab.setdefault(left + right, len(vocab))
    vocab[CLIP_BOS], vocab[CLIP_EOS] = len(vocab), len(vocab) + 1

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "add_prefix_space": False, "errors": "replace", **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return folder


def train_t5_sentencepiece(corpus: list[str], vocab_size: int, folder: str | Path) -> Path:
    """Learn a T5-layout SentencePiece unigram model of about vocab_size pieces; write folder/spiece.model.

    Ids as T5's: <pad> 0, </s> 1, <unk> 2, no <s>. Same normaliser as T5 (nmt_nfkc) and every
    corpus character kept (character_coverage=1.0), so every corpus word encodes without <unk>.
    vocab_size is a soft limit (hard_vocab_limit=False): a small corpus may support fewer pieces,
    and the model then has fewer (`load_t5_tokenizer(...).vocab_size` tells). Also writes
    tokenizer_config.json / special_tokens_map.json (with no sentinel <extra_id_*> tokens), so
    transformers' T5Tokenizer reads the folder. Meant for small corpora (it seeds, see below).
    """
    if vocab_size < 4:
        raise ValueError(f"vocab_size must exceed the 3 special pieces, got {vocab_size}")
    # The unigram trainer starts from a large seed vocabulary and prunes it by EM (Kudo 2018,
    # Sec. 3.2). SentencePiece's own seeds are the repeats found by a suffix array that can be
    # extended in more than one way; in a small synthetic corpus every word is always followed by a
    # space, so whole words are never proposed and the model falls back to letters (measured on
    # the shape-world prompts: up to 50 pieces per prompt of at most 17 words). So we seed with every
    # substring of "▁word" up to 16 characters (SentencePiece's longest piece), weighted by frequency.
    word_counts = collections.Counter(w for text in corpus for w in text.split())
    seeds = collections.Counter()
    for word, n in word_counts.items():
        word = "\u2581" + word
        for i in range(len(word)):
            for j in range(i + 2, min(len(word), i + 16) + 1):
                seeds[word[i:j]] += n
    model = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        seed_file = Path(tmp) / "seeds.tsv"
        seed_file.write_text("".join(f"{piece}\t{n}\n" for piece, n in seeds.most_common()), encoding="utf-8")
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0,
            seed_sentencepieces_file=str(seed_file), num_threads=1, minloglevel=2)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0,
              "additional_special_tokens": [], **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return folder


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
# Loaders for the real release files


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


def read_json(path: Path) -> dict:
    """A JSON file that must hold an object; CheckpointError (a ValueError) naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable JSON file: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got a {type(data).__name__}")
    return data


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
    for name, value in (("num_attention_heads", heads), ("attention_head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{source}: {name} must be an int >= 1, got {value!r}")
    try:
        return FluxParams(**fields, hidden_size=heads * head_dim, mlp_ratio=4.0, theta=10_000, qkv_bias=True)
    except (TypeError, ValueError) as e:
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
        has_weights = has_sharded_weights(folder, "diffusion_pytorch_model")
        if (folder / "config.json").is_file() and (has_weights or not singles):
            params = config or _flux_params_from_diffusers_config(read_json(folder / "config.json"),
                                                                 folder / "config.json")
            state = flux_from_diffusers(read_sharded_folder(folder, "diffusion_pytorch_model"), params, folder)
            return build_and_load(lambda: Flux(params), state, folder, device=device, dtype=dtype)
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
    file_config = read_json(beside) if beside.is_file() else None
    if "x_embedder.weight" in state:  # a diffusers-named single file
        if config is None and file_config is None:
            raise CheckpointError(f"{path} has diffusers tensor names: put its config.json next to it, "
                                  f"or pass config=")
        params = config or _flux_params_from_diffusers_config(file_config, beside)
        return build_and_load(lambda: Flux(params), flux_from_diffusers(state, params, path), path,
                              device=device, dtype=dtype)
    if config is None:
        file_config = file_config or {}
        axes_dim = file_config.get("axes_dim", file_config.get("axes_dims_rope"))
        config = _flux_params_from_shapes(state, path, axes_dim, file_config.get("theta", 10_000))
    return build_and_load(lambda: Flux(config), state, path, device=device, dtype=dtype)



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


# T5 and CLIP: Hugging Face transformers folders --------------------------------------------------


def _config_from_json(cls, config: dict, source: Path):
    """T5Config / CLIPTextConfig from a transformers config.json (its field names are ours)."""
    names = list(cls.__dataclass_fields__)
    missing = [n for n in names if n not in config]
    if missing:
        raise CheckpointError(f"{source}: missing {cls.__name__} fields {missing}")
    try:
        return cls(**{n: config[n] for n in names})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid {cls.__name__}: {e}") from None


def t5_config_from_json(config: dict, source: Path) -> T5Config:
    """A transformers T5 config.json -> T5Config; only v1.1 encoders (gated GELU) are supported."""
    activation = config.get("feed_forward_proj", "relu")
    if activation != "gated-gelu" or config.get("dense_act_fn", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{source}: feed_forward_proj={activation!r}, dense_act_fn="
                              f"{config.get('dense_act_fn')!r}; only T5 v1.1's 'gated-gelu' (tanh GELU) is "
                              f"implemented (the original T5 uses 'relu' and other weight names)")
    return _config_from_json(T5Config, config, source)


def clip_text_config_from_json(config: dict, source: Path) -> CLIPTextConfig:
    """A transformers CLIPTextModel config.json -> CLIPTextConfig; only quick_gelu towers (OpenAI CLIP)."""
    if "text_config" in config:
        raise CheckpointError(f"{source} is a full CLIPModel config; point to a CLIPTextModel folder "
                              f"(FLUX.1's text_encoder/)")
    if config.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise CheckpointError(f"{source}: hidden_act={config['hidden_act']!r}; only OpenAI CLIP's "
                              f"'quick_gelu' is implemented")
    return _config_from_json(CLIPTextConfig, config, source)


def t5_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one remap of T5 files: `encoder.embed_tokens.weight` is `shared.weight` (tied in
    transformers). Files normally store only `shared.weight`; some store both, or only the former."""
    embed_tokens = state.pop("encoder.embed_tokens.weight", None)
    if embed_tokens is not None:
        state.setdefault("shared.weight", embed_tokens)
    return state


def clip_text_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one remap of CLIP text files: keys get the `text_model.` prefix when they lack it
    (transformers 5 saves CLIPTextModel without it, 4.x and the FLUX.1 release with it), and the
    `position_ids` buffer some old files stored (it is arange(77), recomputed here) is dropped."""
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    state.pop("text_model.embeddings.position_ids", None)
    return state


def load_t5(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> T5Encoder:
    """Load a T5 v1.1 encoder from a transformers folder (FLUX.1's text_encoder_2/: config.json +
    model.safetensors, or model.safetensors.index.json + shards) or a FLUX.1 repository root.

    Strict: every tensor must match (see `load_checkpoint_into`); built on the meta device, the file's
    tensors are adopted (cast to `dtype` if given, e.g. torch.bfloat16 as BFL runs it).
    """
    folder = _component_folder(path, "text_encoder_2", "config.json",
                               "a T5 encoder folder (config.json + model.safetensors or model.safetensors.index.json)")
    cfg = t5_config_from_json(read_json(folder / "config.json"), folder / "config.json")
    state = t5_from_transformers(read_sharded_folder(folder, "model"))
    return build_and_load(lambda: T5Encoder(cfg), state, folder, device=device, dtype=dtype)


def load_clip_text(path: str | Path, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> CLIPText:
    """Load a CLIP text tower from a transformers folder (FLUX.1's text_encoder/: config.json +
    model.safetensors, or an index + shards) or a FLUX.1 repository root. Strict, meta-device, as load_t5."""
    folder = _component_folder(path, "text_encoder", "config.json",
                               "a CLIP text encoder folder (config.json + model.safetensors or "
                               "model.safetensors.index.json)")
    cfg = clip_text_config_from_json(read_json(folder / "config.json"), folder / "config.json")
    state = clip_text_from_transformers(read_sharded_folder(folder, "model"))
    return build_and_load(lambda: CLIPText(cfg), state, folder, device=device, dtype=dtype)


def _save_transformers_folder(model: nn.Module, config: dict, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def save_t5(model: T5Encoder, folder: str | Path) -> None:
    """Write `model` as FLUX.1's text_encoder_2/ (config.json + model.safetensors), which `load_t5` and
    transformers' T5EncoderModel.from_pretrained both read. Only `shared.weight` is stored for the
    tied embedding, as transformers does."""
    config = {"architectures": ["T5EncoderModel"], "model_type": "t5", **asdict(model.cfg),
              "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
              "is_encoder_decoder": False, "use_cache": False, "dropout_rate": 0.0, "tie_word_embeddings": False,
              "pad_token_id": 0, "eos_token_id": 1, "dtype": str(model.shared.weight.dtype).removeprefix("torch.")}
    _save_transformers_folder(model, config, folder)


def save_clip_text(model: CLIPText, folder: str | Path) -> None:
    """Write `model` as FLUX.1's text_encoder/ (config.json + model.safetensors, keys prefixed
    `text_model.` as in the release), which `load_clip_text` and transformers' CLIPTextModel read.

    The config carries OpenAI's legacy eos_token_id = 2 on purpose: with it, transformers pools at
    argmax(input_ids), exactly as `CLIPText` does, for any vocabulary size.
    """
    config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **asdict(model.cfg),
              "hidden_act": "quick_gelu", "projection_dim": model.cfg.hidden_size, "attention_dropout": 0.0,
              "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
              "dtype": str(model.text_model.final_layer_norm.weight.dtype).removeprefix("torch.")}
    _save_transformers_folder(model, config, folder)


# CLIP vision tower and full CLIP: Hugging Face transformers folders -------------------------------

# Fields an old config.json may omit; transformers then uses these defaults (its CLIPVisionConfig's).
_CLIP_VISION_DEFAULTS = {"num_channels": 3, "layer_norm_eps": 1e-5}
_CLIP_TEXT_KEYS = ("text_model.", "text_projection.", "logit_scale")  # the text side of a CLIPModel file


def _clip_folder(path: str | Path, what: str) -> tuple[Path, dict]:
    """A transformers CLIP folder and its config.json (a CLIPVisionModelWithProjection or a CLIPModel)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        found = sorted(p.name for p in folder.iterdir())[:12] if folder.is_dir() else "no such folder"
        raise CheckpointError(f"{folder}: expected {what} (config.json + model.safetensors or "
                              f"model.safetensors.index.json + shards); found {found}")
    config = read_json(folder / "config.json")
    if config.get("model_type") not in ("clip", "clip_vision_model"):
        raise CheckpointError(f"{folder / 'config.json'}: model_type {config.get('model_type')!r} is neither a "
                              f"CLIPModel ('clip') nor a CLIPVisionModelWithProjection ('clip_vision_model')")
    return folder, config


def clip_vision_config_from_json(config: dict, source: Path) -> CLIPVisionConfig:
    """CLIPVisionConfig from a CLIPVisionModelWithProjection config.json, or from the vision_config of a
    CLIPModel config.json (whose projection_dim is the top-level one: it sizes both projections)."""
    if "vision_config" in config:
        vision = config["vision_config"] | {"projection_dim": config.get("projection_dim", 512)}
    else:
        vision = config
    if vision.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise CheckpointError(f"{source}: hidden_act={vision['hidden_act']!r}; only OpenAI CLIP's 'quick_gelu' "
                              f"is implemented")
    return _config_from_json(CLIPVisionConfig, _CLIP_VISION_DEFAULTS | vision, source)


def clip_vision_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one remap of CLIP vision files: the `position_ids` buffer old files stored (arange of the
    positions, recomputed here) is dropped. Names are otherwise ours."""
    state.pop("vision_model.embeddings.position_ids", None)
    return state


def clip_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one remap of full CLIPModel files onto `CLIP`: the towers' flat names get their tower's
    attribute as prefix,

        text_model.*                          -> text.text_model.*
        vision_model.*, visual_projection.*   -> vision.vision_model.*, vision.visual_projection.*
        text_projection.weight, logit_scale   -> unchanged

    and the old `position_ids` buffers of both towers are dropped."""
    state = clip_vision_from_transformers(state)
    state.pop("text_model.embeddings.position_ids", None)
    out = {}
    for k, v in state.items():
        if k.startswith("text_model."):
            k = "text." + k
        elif k.startswith(("vision_model.", "visual_projection.")):
            k = "vision." + k
        out[k] = v
    return out


def load_clip_vision(path: str | Path, *, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None) -> CLIPVision:
    """Load a CLIP image tower + visual_projection from a transformers folder: a CLIPVisionModelWithProjection
    (config.json with model_type "clip_vision_model") or a full CLIPModel such as openai/clip-vit-large-patch14
    (config.json with vision_config; its text tensors are skipped). Weights in model.safetensors or
    model.safetensors.index.json + shards. Strict, meta-device, as load_clip_text: a missing, unknown or
    wrongly shaped vision tensor is a CheckpointError."""
    folder, config = _clip_folder(path, "a CLIPVisionModelWithProjection or CLIPModel folder")
    cfg = clip_vision_config_from_json(config, folder / "config.json")
    state = clip_vision_from_transformers(read_sharded_folder(folder, "model"))
    if "vision_config" in config:  # a CLIPModel file: set its text side aside, anything else stays and is reported
        state = {k: v for k, v in state.items() if not k.startswith(_CLIP_TEXT_KEYS)}
    return build_and_load(lambda: CLIPVision(cfg), state, folder, device=device, dtype=dtype)


def load_clip(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> CLIP:
    """Load a full CLIPModel folder (e.g. openai/clip-vit-large-patch14: config.json with text_config and
    vision_config, model.safetensors or an index + shards) into `CLIP`, strictly. Its tokenizer files
    (vocab.json + merges.txt) sit in the same folder: `load_clip_tokenizer(path)`.

    The text tower pools at argmax(input_ids), i.e. the first <|endoftext|> (see CLIPText); transformers
    does the same for CLIP's real vocabulary whatever the config's eos_token_id says."""
    folder, config = _clip_folder(path, "a full CLIPModel folder")
    if "text_config" not in config or "vision_config" not in config:
        raise CheckpointError(f"{folder / 'config.json'} is not a full CLIPModel config (no text_config / "
                              f"vision_config); CLIPScore needs both towers and both projections, e.g. "
                              f"openai/clip-vit-large-patch14")
    text_cfg = clip_text_config_from_json(config["text_config"], folder / "config.json")
    vision_cfg = clip_vision_config_from_json(config, folder / "config.json")
    state = clip_from_transformers(read_sharded_folder(folder, "model"))
    return build_and_load(lambda: CLIP(text_cfg, vision_cfg), state, folder, device=device, dtype=dtype)


# Autoencoder: BFL ae.safetensors and diffusers vae/ folders -------------------------------------

# BFL's mid-block attention projections are 1x1 Conv2d, weight (C, C, 1, 1); diffusers' are Linear, (C, C).
_AE_ATTENTION_PROJECTIONS = ("q", "k", "v", "proj_out")


def ae_diffusers_table(params: AutoEncoderParams) -> dict[str, str]:
    """The one BFL <-> diffusers name table for the autoencoder: BFL module -> diffusers module.

    Weights and biases keep their leaf names. The formats differ in three ways: diffusers groups a
    level's blocks as `down_blocks.{i}.resnets.{j}` / `downsamplers.0` and numbers the decoder's
    levels in running order (BFL `up.{i}` = diffusers `up_blocks.{n-1-i}`); a few modules are
    renamed (nin_shortcut, norm_out, the mid block, the attention projections); and the attention
    projections are Linear in diffusers but 1x1 convs in BFL (`_AE_ATTENTION_PROJECTIONS`, reshaped
    by `ae_from_diffusers` / `ae_to_diffusers`). Every ResnetBlock is listed with a shortcut; only
    those that change width have one.
    """
    n = len(params.ch_mult)

    def resnet(bfl: str, diffusers: str) -> dict[str, str]:
        return {f"{bfl}.{a}": f"{diffusers}.{b}" for a, b in (
            ("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
            ("nin_shortcut", "conv_shortcut"))}

    table: dict[str, str] = {}
    for side in ("encoder", "decoder"):
        table |= {
            f"{side}.conv_in": f"{side}.conv_in",
            f"{side}.norm_out": f"{side}.conv_norm_out",
            f"{side}.conv_out": f"{side}.conv_out",
            f"{side}.mid.attn_1.norm": f"{side}.mid_block.attentions.0.group_norm",
            f"{side}.mid.attn_1.q": f"{side}.mid_block.attentions.0.to_q",
            f"{side}.mid.attn_1.k": f"{side}.mid_block.attentions.0.to_k",
            f"{side}.mid.attn_1.v": f"{side}.mid_block.attentions.0.to_v",
            f"{side}.mid.attn_1.proj_out": f"{side}.mid_block.attentions.0.to_out.0",
        }
        table |= resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        table |= resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")
    for i in range(n):
        for j in range(params.num_res_blocks):
            table |= resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i != n - 1:
            table[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        for j in range(params.num_res_blocks + 1):
            table |= resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{n - 1 - i}.resnets.{j}")
        if i != 0:
            table[f"decoder.up.{i}.upsample.conv"] = f"decoder.up_blocks.{n - 1 - i}.upsamplers.0.conv"
    return table


def _is_attention_projection(bfl_key: str) -> bool:
    module, leaf = bfl_key.rsplit(".", 1)
    return leaf == "weight" and ".mid.attn_1." in bfl_key and module.rsplit(".", 1)[1] in _AE_ATTENTION_PROJECTIONS


def ae_from_diffusers(state: dict[str, torch.Tensor], params: AutoEncoderParams) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL tensors -> BFL names (consumes `state` as it goes).

    Tensors the table does not know are passed through under their diffusers names, so that the
    strict load reports them as unexpected (and the BFL tensors they should have been as missing).
    """
    table = ae_diffusers_table(params)
    with torch.device("meta"):
        bfl_keys = list(AutoEncoder(params).state_dict())
    out = {}
    for key in bfl_keys:
        module, leaf = key.rsplit(".", 1)
        name = f"{table[module]}.{leaf}"
        if name not in state:
            continue
        t = state.pop(name)
        if _is_attention_projection(key) and t.ndim == 2:
            t = t[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[key] = t
    out.update(state)  # leftovers: reported as unexpected by the strict load
    return out


def ae_to_diffusers(state: dict[str, torch.Tensor], params: AutoEncoderParams) -> dict[str, torch.Tensor]:
    """BFL-named autoencoder tensors -> diffusers names: the inverse of `ae_from_diffusers`."""
    table = ae_diffusers_table(params)
    out = {}
    for key, t in state.items():
        module, leaf = key.rsplit(".", 1)
        if _is_attention_projection(key):
            assert t.shape[2:] == (1, 1), f"{key} should be a 1x1 conv weight, got {tuple(t.shape)}"
            t = t[:, :, 0, 0]  # 1x1 conv (C, C, 1, 1) -> Linear (C, C)
        out[f"{table[module]}.{leaf}"] = t.contiguous()
    return out


# Every field of diffusers' AutoencoderKL config.json. Those not in this list are an error; the
# ones FLUX's architecture fixes are checked in `_ae_params_from_diffusers_config`.
_DIFFUSERS_AE_FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                        "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
                        "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
                        "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


def _ae_params_from_diffusers_config(config: dict, source: Path) -> AutoEncoderParams:
    """A diffusers AutoencoderKL config.json -> AutoEncoderParams.

    Missing fields take diffusers' defaults (which are Stable Diffusion's, not FLUX's: a config
    without `use_quant_conv: false` describes a VAE with quant convs, which FLUX does not have).
    """
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_AE_FIELDS)
    block_out = config.get("block_out_channels", [64])
    if not (isinstance(block_out, list) and block_out
            and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block_out)):
        raise CheckpointError(f"{source}: block_out_channels must be a list of ints >= 1, got {block_out!r}")
    n = len(block_out)
    problems = [f"unknown fields {unknown}"] if unknown else []
    expected = {"act_fn": "silu", "use_quant_conv": False, "use_post_quant_conv": False,
                "mid_block_add_attention": True, "latents_mean": None, "latents_std": None,
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
    defaults = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
                "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"]}
    for field, value in expected.items():
        got = config.get(field, defaults.get(field))
        if (list(got) if isinstance(got, (list, tuple)) else got) != value:
            problems.append(f"{field} = {got!r} (FLUX's autoencoder needs {value!r})")
    if any(b % block_out[0] for b in block_out):
        problems.append(f"block_out_channels {block_out} are not multiples of the first")
    if problems:
        raise CheckpointError(f"{source}: not a FLUX-style AutoencoderKL config: " + "; ".join(problems))
    shift = config.get("shift_factor")
    try:
        return AutoEncoderParams(resolution=config.get("sample_size", 32), in_channels=config.get("in_channels", 3),
                                 ch=block_out[0], out_ch=config.get("out_channels", 3),
                                 ch_mult=tuple(b // block_out[0] for b in block_out),
                                 num_res_blocks=config.get("layers_per_block", 1),
                                 z_channels=config.get("latent_channels", 4),
                                 scale_factor=config.get("scaling_factor", 0.18215),
                                 shift_factor=0.0 if shift is None else shift,
                                 num_groups=config.get("norm_num_groups", 32))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def _ae_params_from_shapes(state: dict[str, torch.Tensor], source: Path) -> AutoEncoderParams:
    """Infer AutoEncoderParams from the tensor shapes of a BFL `ae.safetensors`.

    The shapes fix every width and depth; the GroupNorm group count and the latent scale and
    shift are not stored in the file, so they are FLUX.1's (32, 0.3611, 0.1159).
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{source}: no tensor {key}, cannot infer the autoencoder config "
                                  f"(is this a FLUX ae.safetensors? pass config= to load it anyway)")
        return tuple(state[key].shape)

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = len({k.split(".")[2] for k in state if k.startswith("encoder.down.")})
    widths = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(max(levels, 1))]
    if any(w % ch for w in widths):
        raise CheckpointError(f"{source}: level widths {widths} are not multiples of conv_in's {ch} channels")
    num_res_blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
    flux = AE_CONFIGS["flux"]
    try:
        return AutoEncoderParams(resolution=flux.resolution, in_channels=in_channels, ch=ch,
                                 out_ch=shape("decoder.conv_out.weight")[0], ch_mult=tuple(w // ch for w in widths),
                                 num_res_blocks=num_res_blocks,
                                 z_channels=shape("decoder.conv_in.weight")[1], scale_factor=flux.scale_factor,
                                 shift_factor=flux.shift_factor, num_groups=flux.num_groups)
    except ValueError as e:
        raise CheckpointError(f"{source}: inferred an invalid autoencoder config: {e}") from None


def load_autoencoder(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     config: AutoEncoderParams | str | None = None) -> AutoEncoder:
    """Load the FLUX autoencoder from any of the FLUX.1 release layouts.

    path is one of
      - a BFL single file (`ae.safetensors`). The widths and depths are inferred from the tensor
        shapes; GroupNorm groups, scale and shift come from `config=`, else from a diffusers
        AutoencoderKL config.json next to the file, else are FLUX.1's (32, 0.3611, 0.1159).
      - a diffusers `vae/` folder: config.json + diffusion_pytorch_model.safetensors (or
        .safetensors.index.json + shards), names converted by `ae_diffusers_table`. A
        diffusion_pytorch_model.safetensors file given directly is read with the config.json beside it.
      - a whole FLUX.1 repository folder (it has `vae/` or `ae.safetensors`; `vae/` wins).
    config (an AutoEncoderParams or an AE_CONFIGS name) overrides what the files say; the load is
    strict either way. The model is built on the meta device and adopts the file's tensors (cast to
    `dtype` if given, moved to `device`).
    """
    path = Path(path)
    if isinstance(config, str):
        if config not in AE_CONFIGS:
            raise ValueError(f"unknown autoencoder config {config!r}; known: {sorted(AE_CONFIGS)}")
        config = AE_CONFIGS[config]
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        single = path / "ae.safetensors"
        has_weights = has_sharded_weights(folder, "diffusion_pytorch_model")
        if (folder / "config.json").is_file() and (has_weights or not single.is_file()):
            params = config or _ae_params_from_diffusers_config(read_json(folder / "config.json"),
                                                               folder / "config.json")
            state = ae_from_diffusers(read_sharded_folder(folder, "diffusion_pytorch_model"), params)
            return build_and_load(lambda: AutoEncoder(params), state, folder, device=device, dtype=dtype)
        if not single.is_file():
            found = sorted(p.name for p in path.iterdir())
            raise CheckpointError(
                f"{path}: not an autoencoder checkpoint folder. Expected a diffusers vae folder "
                f"(config.json + diffusion_pytorch_model.safetensors, or "
                f"diffusion_pytorch_model.safetensors.index.json + shards), a repository folder with "
                f"vae/, or a BFL ae.safetensors; found {found[:10]}")
        path = single
    if not path.is_file():
        raise CheckpointError(f"autoencoder checkpoint not found: {path}")

    state = read_safetensors(path)
    beside = path.parent / "config.json"
    # Only an AutoencoderKL config counts: the same folder may hold another model's config.json.
    file_config = read_json(beside) if beside.is_file() else {}
    if file_config.get("_class_name") != "AutoencoderKL":
        file_config = None
    if "decoder.conv_norm_out.weight" in state:  # a diffusers-named single file
        if config is None and file_config is None:
            raise CheckpointError(f"{path} has diffusers tensor names: put its AutoencoderKL config.json "
                                  f"next to it, or pass config=")
        params = config or _ae_params_from_diffusers_config(file_config, beside)
        return build_and_load(lambda: AutoEncoder(params), ae_from_diffusers(state, params), path,
                              device=device, dtype=dtype)
    if config is None:
        config = (_ae_params_from_diffusers_config(file_config, beside) if file_config is not None
                  else _ae_params_from_shapes(state, path))
    return build_and_load(lambda: AutoEncoder(config), state, path, device=device, dtype=dtype)



def save_autoencoder(model: AutoEncoder, folder: str | Path) -> None:
    """Write `model` as a diffusers vae folder: config.json + diffusion_pytorch_model.safetensors.

    The files are in the real FLUX.1 release format: `load_autoencoder` and diffusers'
    `AutoencoderKL.from_pretrained` both read them.
    """
    p = model.params
    if p.ch_mult[0] != 1:
        raise ValueError(f"diffusers' AutoencoderKL has no conv_in -> first level width change: ch_mult must "
                         f"start with 1, got {list(p.ch_mult)}")
    n = len(p.ch_mult)
    config = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1",
              "in_channels": p.in_channels, "out_channels": p.out_ch,
              "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
              "block_out_channels": [p.ch * m for m in p.ch_mult], "layers_per_block": p.num_res_blocks,
              "act_fn": "silu", "latent_channels": p.z_channels, "norm_num_groups": p.num_groups,
              "sample_size": p.resolution, "scaling_factor": p.scale_factor, "shift_factor": p.shift_factor,
              "latents_mean": None, "latents_std": None, "force_upcast": True,
              "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_file(ae_to_diffusers(state, p), str(folder / "diffusion_pytorch_model.safetensors"),
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
