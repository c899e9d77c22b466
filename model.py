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
import os
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

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
