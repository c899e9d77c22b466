"""
Checkpoints: reading and writing the FLUX.1 stack's release files, for the architectures of model.py.

    read_safetensors / read_sharded_folder / load_checkpoint_into / build_and_load
                  safetensors files and sharded folders, loaded with strict key and shape checks
                  (every missing, unexpected or misshapen tensor is listed) into a model built on
                  the meta device, so the weights are memory-mapped and never held twice
    tokenizers    load_clip_tokenizer (vocab.json + merges.txt), load_t5_tokenizer (spiece.model)
    Flux          BFL single files (flux1-schnell.safetensors, ComfyUI-style prefixed ones) and
                  diffusers transformer/ folders, through one name table (flux_diffusers_table)
    T5, CLIP      Hugging Face transformers folders (text_encoder_2/, text_encoder/, CLIP ViT-L/14)
    AutoEncoder   BFL ae.safetensors and diffusers vae/ folders (ae_diffusers_table)
    save_*        the writers of the same layouts (the embedded models, the tests' tiny repositories)

Module attribute names in model.py equal the checkpoint keys of one format (BFL's for Flux and the
autoencoder, transformers' for T5 and CLIP), so a load is `load_state_dict(strict=True, assign=True)`;
where two file formats disagree, the remap is one explicit table here.

References:
  [1] Black Forest Labs, FLUX.1 reference code, github.com/black-forest-labs/flux (BFL file layout)
  [2] diffusers' FluxTransformer2DModel and AutoencoderKL, transformers' T5EncoderModel and
      CLIPTextModel / CLIPModel (the Hugging Face layouts and their config.json fields)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import sentencepiece
import tokenizers
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import (AE_CONFIGS, CLIP, CLIP_BOS, CLIP_EOS, FLUX_CONFIGS, AutoEncoder, AutoEncoderParams, CLIPText, CLIPTextConfig,
                   CLIPTokenizer, CLIPVision, CLIPVisionConfig, Flux, FluxParams, T5Config, T5Encoder, T5Tokenizer,
                   clip_pipeline)

# -----------------------------------------------------------------------------------------------
# 1. Reading safetensors files and folders, loading a state dict into a model built on the meta device


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
    backend = clip_pipeline(tokenizers.Tokenizer(bpe))
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


def _named_config(config, table: dict, what: str):
    """A config given by name is looked up in `table` (ValueError naming the known ones); others pass."""
    if isinstance(config, str):
        if config not in table:
            raise ValueError(f"unknown {what} config {config!r}; known: {sorted(table)}")
        return table[config]
    return config


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
    config = _named_config(config, FLUX_CONFIGS, "Flux")
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
    config = _named_config(config, AE_CONFIGS, "autoencoder")
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


