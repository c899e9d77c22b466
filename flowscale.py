"""
flowscale: inference-time scaling for flow models, end to end.

Kim, Yoon, Hwang, Sung 2025, "Inference-Time Scaling for Flow Models via Stochastic Generation and
Rollover Budget Forcing", arXiv 2503.19385. This file is the pipeline and the command line; the
paper's ideas live in sde.py (SDE and interpolant conversion, Secs. 4.2-4.3) and search.py (Rollover
Budget Forcing and its baselines, Sec. 6, Alg. 2).

    python flowscale.py demo [--out DIR]
        the main job on the embedded mini-FLUX: a few held-out prompts, the plain sampler vs RBF on
        VP-SDE, an image grid, a table of rewards, summary.json
    python flowscale.py generate --prompt P [--method rbf] [--dynamics vp-sde] [--nfe 200] ...
        one prompt, one search; writes image.png and result.json
    python flowscale.py bench --task counting --nfe 50,100,200,500 --prompts 16 --seeds 2 --out DIR
        the paper's tables and figures in miniature (experiments.py, which imports this module and
        owns the options of `bench`); resumable, torchrun-shardable

One generate call:

    prompt -> CLIP / T5 tokenizers -> CLIP pooled `y` (P, Dy) and T5 states `txt` (P, L, D)
           -> velocity(x, t, prompt) of the latents, one NFE per latent (search.py counts them)
           -> search.run(method, Problem(dynamics = linear-ode | linear-sde | vp-sde))
                  proposals by ODE / SDE steps (sde.py), value = reward(decode(x0_hat))
           -> best x0_hat -> decode -> PNG + JSON

The default model is the embedded mini-FLUX.1-schnell (weights/mini-flux-schnell, distilled by
train.py from weights/mini-flux-dev on the shape world; the paper and its official code run
FLUX.1-schnell); `--model` takes the other embedded model, or a real FLUX.1 [schnell] or [dev]
folder in the Hugging Face layout.
"""

from __future__ import annotations

if __name__ == "__main__":
    # Run as a script: hand over to the module `flowscale`, so that the file is defined once. Otherwise
    # experiments.py's `import flowscale` (the bench command) would load a second copy next to
    # __main__, with its own Pipeline, Generation, ... classes.
    import sys

    import flowscale

    sys.exit(flowscale.main())

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

import checkpoints

import model as M

import rewards as R
import sde
import search
import toyworld

DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "mini-flux-schnell"
# torch's CPU generator (mt19937) keeps only the low 32 bits of a seed: 0 and 2**32 are the same
# noise. So a seed is an integer in [0, 2**32) and anything else is refused.
MAX_SEED = 2**32 - 1
MAX_PROMPTS = 1000  # held-out prompts one command may ask for (the pool holds a few thousand per task)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}  # --dtype

# -----------------------------------------------------------------------------------------------
# Devices and dtypes (--device, --dtype): checked before anything is loaded


def resolve_device(spec: str | torch.device) -> torch.device:
    """--device: cpu, cuda (= cuda:0), cuda:N or mps, checked against this machine (ValueError)."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {spec!r}; choose cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device {spec}: CUDA is not available here (torch {torch.__version__}, {build}); "
                             f"use --device cpu, or install a CUDA build of torch on a machine with a GPU")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {spec}: Apple's MPS backend is not available here; use --device cpu")
        return device
    raise ValueError(f"unknown device {spec!r}; choose cpu, cuda, cuda:N or mps")


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """--dtype (bfloat16, float16, float32) of the networks, checked against the device (ValueError).
    A GPU without native bfloat16 (before NVIDIA's Ampere, e.g. V100 or T4) would emulate it slowly, so it
    is refused and float16 named (T5 is known to overflow in float16: float32 is the safe choice there)."""
    dtype = name if isinstance(name, torch.dtype) else DTYPES.get(name)
    # the API also takes any floating torch.dtype (float64 for gradient checks); the CLI takes the names
    if dtype is None or not dtype.is_floating_point:
        raise ValueError(f"unknown dtype {name!r}; choose {', '.join(DTYPES)}")
    label = str(dtype).removeprefix("torch.")
    if device.type == "cuda" and dtype == torch.bfloat16 and not _native_bf16(device):
        raise ValueError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no native bfloat16; use "
                         f"--dtype float16 or float32")
    try:  # what the device cannot run at all fails here, in one line, before minutes of loading
        a = torch.ones(2, 2, dtype=dtype, device=device)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--dtype {label} does not run on {device}: {str(e).splitlines()[0]}") from None
    return dtype


def _native_bf16(device: torch.device) -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation argument
        return torch.cuda.is_bf16_supported()

# -----------------------------------------------------------------------------------------------
# Loading a model: the embedded mini-FLUX or a real FLUX.1 folder


@dataclass
class Pipeline:
    """Everything one text-to-image flow model needs at inference."""

    flux: M.Flux                                    # the velocity network
    t5: M.T5Encoder                                 # prompt -> txt (B, L_txt, context_in_dim)
    clip: M.CLIPText                                # prompt -> pooled y (B, vec_in_dim)
    t5_tokenizer: M.T5Tokenizer
    clip_tokenizer: M.CLIPTokenizer
    latent: M.AutoEncoder | M.PixelLatent           # decode(z) -> image in [-1, 1]
    latent_shape: tuple[int, int, int]              # (C, H, W) of one latent
    shape_world: bool                               # prompts must be shape-world prompts (embedded model)
    guidance: float | None = None                   # distilled guidance scale (flux-dev), None for schnell
    name: str = ""                                  # where it was loaded from
    counter: R.LearnedCounter | None = None         # shape world: the second counter of the held-out metrics
    lowercase: bool = False                         # T5's vocabulary has no capitals: prompts are lower-cased
    device: torch.device = torch.device("cpu")      # where the velocity network and the particles live
    offload: bool = False                           # text encoders and autoencoder wait on the CPU between uses
    time_shift: float | None = None                 # FLUX.1-dev: BFL's resolution shift of the time grid


def load_pipeline(path: str | Path | None = None, *, height: int = 1024, width: int = 1024,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None, guidance: float = 3.5,
                  offload: bool = False, compile: bool = False) -> Pipeline:
    """Load the embedded model (path None) or a FLUX.1 repository folder.

    The embedded model's folder has the FLUX.1 layout plus `flowscale.json` (written by train.py),
    which says that it works in pixel space and at what size. A real FLUX.1 folder has vae/ (or
    ae.safetensors); `height` and `width` (multiples of 16) then fix the latent size.

    `device` holds the velocity network (and the particles of every search). With `offload` the text
    encoders (9.5 GB for FLUX.1's T5-XXL in bf16) and the autoencoder stay on the CPU and visit the
    device only to encode the prompts (once per search) and to decode (once per reward call), so FLUX.1
    fits next to a reward model on one GPU. `compile` wraps the velocity network in torch.compile.
    A FLUX.1-dev folder gets BFL's time shift for its image size (`time_shift`, see sde.flux_shift).
    """
    device = resolve_device(device)
    path = Path(path) if path is not None else DEFAULT_MODEL
    if not path.is_dir():
        hint = " (run `python train.py` to train the embedded model)" if path == DEFAULT_MODEL else ""
        raise ValueError(f"model folder not found: {path}{hint}")
    meta_file = path / "flowscale.json"
    # Both the embedded models and the real FLUX.1 are stored and run in bf16, as the release is
    # used; the search math (noise, SDE steps, Tweedie, rewards) stays float32 (make_velocity).
    # dtype=torch.float32 runs the network in float32 (about half the NFE/s here, see benchmarks/).
    dtype = resolve_dtype(dtype or torch.bfloat16, device)
    parked = torch.device("cpu") if offload else device  # where the encoders and the autoencoder wait
    # checked before loading anything (a real FLUX.1 takes minutes to load)
    if not meta_file.is_file() and (height % 16 or width % 16):
        raise ValueError(f"FLUX.1 needs height and width divisible by 16, got {height}x{width}")
    meta = read_meta(meta_file) if meta_file.is_file() else None  # checked before the weights are read
    flux = checkpoints.load_flux(path, device=device, dtype=dtype)
    t5 = checkpoints.load_t5(path, device=parked, dtype=dtype)
    clip = checkpoints.load_clip_text(path, device=parked, dtype=dtype)
    clip_tokenizer = checkpoints.load_clip_tokenizer(path)
    if meta is not None:
        factor = meta["latent_factor"]
        latent = M.PixelLatent(factor)
        shape = (meta["channels"] * factor ** 2, meta["height"] // factor, meta["width"] // factor)
        if flux.params.in_channels != shape[0] * 4:  # FLUX packs 2x2 latent pixels into one token
            raise ValueError(f"{meta_file}: channels {meta['channels']} and latent_factor {factor} make "
                             f"{shape[0] * 4} token channels, but the transformer takes {flux.params.in_channels}")
        t5_tokenizer = checkpoints.load_t5_tokenizer(path, max_length=meta["t5_max_length"])
        shape_world = meta.get("world") == "shapes"
        pipe = Pipeline(flux, t5, clip, t5_tokenizer, clip_tokenizer, latent, shape, shape_world=shape_world,
                        name=str(path), counter=R.load_counter() if shape_world else None)
    else:
        latent = checkpoints.load_autoencoder(path, device=parked, dtype=dtype)
        is_dev = flux.params.guidance_embed
        # BFL's sequence lengths: 256 T5 tokens for schnell, 512 for dev.
        t5_tokenizer = checkpoints.load_t5_tokenizer(path, max_length=512 if is_dev else 256)
        # f = 8 for FLUX.1's autoencoder; read from its config so that other autoencoders get the right latent
        z, f = latent.params.z_channels, latent.params.downsample
        # BFL samples dev with get_schedule(num_steps, image_seq_len, shift=True) and schnell with
        # shift=False; the image tokens are the 2x2-packed latent pixels
        shift = sde.flux_shift((height // f // 2) * (width // f // 2)) if is_dev else None
        pipe = Pipeline(flux, t5, clip, t5_tokenizer, clip_tokenizer, latent, (z, height // f, width // f),
                        shape_world=False, guidance=guidance if is_dev else None, name=str(path), time_shift=shift)
    pipe.device, pipe.offload = device, offload
    if compile:
        # the wrapper forwards attributes (params, img_in) to the network; shapes that vary with the
        # number of rows per call cost one recompile, after which torch compiles a dynamic graph
        pipe.flux = torch.compile(flux)
    check_tokenizers(pipe, path)
    # A T5 vocabulary without capitals (the embedded model's, trained on lower-case prompts) would turn
    # "THREE" into unknown pieces; such models get their prompts lower-cased (CLIP lower-cases anyway).
    pipe.lowercase = not any(c.isupper() for i in range(t5_tokenizer.vocab_size)
                             for c in t5_tokenizer.sp.id_to_piece(i) if not t5_tokenizer.sp.is_control(i))
    return pipe


META_FIELDS = {"latent_factor": int, "height": int, "width": int, "channels": int, "t5_max_length": int}


def read_meta(meta_file: Path) -> dict:
    """flowscale.json of an embedded model (written by train.py), checked field by field: ValueError
    naming the file and the field."""
    meta = checkpoints.read_json(meta_file)
    for name, kind in META_FIELDS.items():
        value = meta.get(name)
        if not (isinstance(value, kind) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{meta_file}: {name} must be an integer >= 1, got {value!r}")
    factor = meta["latent_factor"]
    for side in ("height", "width"):
        if meta[side] % (2 * factor):
            raise ValueError(f"{meta_file}: {side} {meta[side]} must be a multiple of {2 * factor} "
                             f"(latent_factor {factor}, then FLUX's 2x2 packing)")
    trained = meta.get("train", {}).get("image_size") if isinstance(meta.get("train"), dict) else None
    if trained is not None and (meta["height"], meta["width"]) != (trained, trained):
        raise ValueError(f"{meta_file}: height x width {meta['height']}x{meta['width']}, but the model was "
                         f"trained at {trained}x{trained} (train.image_size)")
    return meta


def check_tokenizers(pipe: Pipeline, path: Path) -> None:
    """The tokenizers must fit their encoders: no id beyond the embedding, and (T5) no fewer pieces
    than the embedding minus T5's 128 sentinel / padding rows (a truncated spiece.model loads but
    knows fewer pieces). ValueError naming the files."""
    t5_rows, sp_pieces = pipe.t5.cfg.vocab_size, pipe.t5_tokenizer.vocab_size
    if not t5_rows - 128 <= sp_pieces <= t5_rows:
        raise ValueError(f"{path}: the T5 tokenizer (spiece.model) has {sp_pieces} pieces but the T5 encoder's "
                         f"embedding has {t5_rows} rows: they do not belong together (a damaged or truncated "
                         f"spiece.model?)")
    clip_rows = pipe.clip.cfg.vocab_size
    if pipe.clip_tokenizer.vocab_size > clip_rows:
        raise ValueError(f"{path}: the CLIP tokenizer (vocab.json) has {pipe.clip_tokenizer.vocab_size} tokens "
                         f"but the CLIP text encoder's embedding has {clip_rows} rows")
    if pipe.shape_world:  # every word of the shape world must be known to both tokenizers
        t5 = pipe.t5_tokenizer
        for name, tokenizer_unknown in (
                ("tokenizer_2/spiece.model", lambda w: t5.sp.unk_id() in t5.encode(w)),
                ("tokenizer/vocab.json", lambda w: pipe.clip_tokenizer.eos_id in
                 pipe.clip_tokenizer.backend.encode(w, add_special_tokens=False).ids)):
            unknown = [w for w in toyworld.VOCABULARY if tokenizer_unknown(w)]
            if unknown:
                raise ValueError(f"{path / name} does not know the shape-world words {unknown}: a damaged or "
                                 f"truncated tokenizer file?")


# -----------------------------------------------------------------------------------------------
# Conditioning, the velocity function and decoding


@dataclass
class Conditioning:
    """The text conditioning of P prompts, computed once per search."""

    prompts: list[str]
    txt: torch.Tensor       # (P, L_txt, context_in_dim) T5 states
    y: torch.Tensor         # (P, vec_in_dim) CLIP pooled vector


def normalise_prompts(pipe: Pipeline, prompts: list[str]) -> list[str]:
    """The prompts as the model reads them. The embedded model's tokenizers know only the shape
    world's lower-case words: its prompts become the words its grammar reads (lower case, commas and a
    final full stop dropped, single spaces), so "Three red circles." is "three red circles". A model
    whose T5 vocabulary has no capitals gets lower-cased prompts; any other model reads them as given.
    generate() and the rewards see the normalised prompts."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a list of strings, got {prompts!r:.80}")
    if pipe.shape_world:
        return [" ".join(p.lower().replace(",", " ").strip().rstrip(".").split()) for p in prompts]
    return [p.lower() for p in prompts] if pipe.lowercase else list(prompts)


def unknown_words(pipe: Pipeline, prompt: str) -> list[str]:
    """The words of `prompt` that a tokenizer can only map to its unknown token (T5's <unk>; CLIP's
    unknown token is its <|endoftext|>)."""
    t5, clip = pipe.t5_tokenizer, pipe.clip_tokenizer
    bad = []
    for word in prompt.split():
        t5_unknown = t5.sp.unk_id() in t5.encode(word) and "<unk>" not in word
        clip_ids = clip.backend.encode(word, add_special_tokens=False).ids
        clip_unknown = clip.eos_id in clip_ids and M.CLIP_EOS not in word
        if t5_unknown or clip_unknown:
            bad.append(word)
    return bad


def check_prompts(pipe: Pipeline, prompts: list[str], grammar: bool = True) -> None:
    """ValueError for a prompt the model cannot take: empty, with words its tokenizers do not know, or
    (embedded model) outside the shape world. Checks the prompts as given: normalise_prompts first."""
    if not prompts:
        raise ValueError("give at least one prompt")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise ValueError(f"prompts must be strings, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("empty prompt")
        if pipe.shape_world and grammar:
            toyworld.parse_prompt(prompt)  # raises ValueError naming the unknown words
        unknown = unknown_words(pipe, prompt)
        if unknown:
            case = "; this model's vocabulary is lower-case" if pipe.lowercase else ""
            raise ValueError(f"prompt {prompt!r}: the tokenizers of {Path(pipe.name).name or 'the model'} do not "
                             f"know {unknown} (they would read them as unknown tokens){case}")


@contextlib.contextmanager
def visiting(pipe: Pipeline, *modules: torch.nn.Module):
    """With offload, the modules come to pipe.device for the block and go back to the CPU after it
    (also on an error); without, nothing moves."""
    if not pipe.offload:
        yield
        return
    for module in modules:
        module.to(pipe.device)
    try:
        yield
    finally:
        for module in modules:
            module.to("cpu")


@torch.no_grad()
def encode_prompts(pipe: Pipeline, prompts: list[str]) -> Conditioning:
    prompts = normalise_prompts(pipe, prompts)
    check_prompts(pipe, prompts)
    dtype = pipe.flux.img_in.weight.dtype
    device = pipe.device
    with visiting(pipe, pipe.t5, pipe.clip):  # once per search: the states stay on the device
        txt = pipe.t5(pipe.t5_tokenizer(prompts).to(device)).to(device, dtype)         # (P, L_txt, D_t5)
        y = pipe.clip(pipe.clip_tokenizer(prompts).to(device))[1].to(device, dtype)     # (P, D_clip)
    return Conditioning(prompts, txt, y)


def make_velocity(pipe: Pipeline, cond: Conditioning) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's velocity u_t(x) on the linear path, for latents of several prompts at once.

    velocity(x (B, C, H, W), t (B,), prompt (B,) long) -> u (B, C, H, W). One row is one NFE;
    search.py does the counting. Gradients flow through it when enabled (DPS).
    """
    C, H, W = pipe.latent_shape
    device = pipe.device
    img_ids = M.image_ids(1, H, W, device=device)                         # (1, H/2 * W/2, 3)
    txt_ids = M.text_ids(1, cond.txt.shape[1], device=device)             # (1, L_txt, 3)
    dtype = pipe.flux.img_in.weight.dtype

    def velocity(x: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        guidance = None if pipe.guidance is None else torch.full((B,), pipe.guidance, device=device)
        u = pipe.flux(img=M.pack(x.to(dtype)), img_ids=img_ids, txt=cond.txt[prompt], txt_ids=txt_ids,
                      timesteps=t.to(dtype), y=cond.y[prompt], guidance=guidance)  # (B, H/2 * W/2, 4C)
        return M.unpack(u, H, W).to(x.dtype)                              # (B, C, H, W)

    return velocity


def decode(pipe: Pipeline, z: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, H, W) -> images (B, 3, H', W') in [0, 1], in z's dtype (differentiable)."""
    # The autoencoder may hold another dtype than the search's latents (bf16 for FLUX.1, float32
    # latents): decode in its dtype and hand back z's, as make_velocity does.
    weight = next(pipe.latent.parameters(), None)  # None for the embedded model's PixelLatent
    with visiting(pipe, pipe.latent):  # with offload: 168 MB each way per reward call for FLUX.1's autoencoder
        x = pipe.latent.decode(z if weight is None else z.to(weight.dtype)).to(z.dtype)
    return ((x + 1) / 2).clamp(0, 1)


def make_problem(pipe: Pipeline, cond: Conditioning, reward, *, dynamics: str = "vp-sde",
                 num_steps: int = 10, max_batch: int = search.MAX_BATCH, lookahead: str = "tweedie") -> search.Problem:
    """The search problem of P prompts: the counted velocity and reward(decode(x0_hat))."""
    prompts = cond.prompts

    def reward_fn(x0: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        # prompt: the rows' prompt ids on the CPU (search.py keeps them there), so no device read here
        return reward(decode(pipe, x0), [prompts[i] for i in prompt.tolist()])

    return search.Problem(velocity=make_velocity(pipe, cond), reward=reward_fn, reward_name=reward.name,
                          differentiable=reward.differentiable, shape=pipe.latent_shape,
                          num_prompts=len(prompts), dynamics=dynamics, num_steps=num_steps,
                          max_batch=max_batch, lookahead=lookahead, device=pipe.device,
                          time_shift=pipe.time_shift)


# -----------------------------------------------------------------------------------------------
# Generating: one search over P prompts, plus the held-out metrics


@dataclass
class Generation:
    """What one search produced for P prompts."""

    prompts: list[str]
    method: str
    dynamics: str
    nfe: int                       # the budget per prompt
    images: torch.Tensor           # (P, 3, H, W) in [0, 1]
    reward: list[float]            # the given reward of each image
    nfe_used: list[int]            # per prompt, never above `nfe`
    seconds: float                 # wall time of the search
    metrics: list[dict] = field(default_factory=list)   # held-out metrics per image (shape world)
    result: search.SearchResult | None = None


def heldout_metrics(images: torch.Tensor, prompts: list[str], counter: R.LearnedCounter | None = None) -> list[dict]:
    """Shape-world metrics of each image, reported beside the given reward:
      rss, accuracy, composition   the exact detector's counting RSS, exact-count accuracy and
                                   fraction of facts (the counterparts of GroundingDINO -RSS and
                                   VQAScore in the paper's Sec. 7)
      fidelity                     match to a clean re-render of the detected scene (toyworld.fidelity),
                                   in the role of the paper's aesthetic score: blur and ghosts lower it
      counter_accuracy             exact counts by the learned counter (a convolutional network that
                                   shares none of the detector's machinery), if given: reward hacking
                                   of one counter shows as disagreement with the other
    """
    R.check_inputs(images, prompts, "held-out metrics")
    found = toyworld.detect(images)  # once, for the three detector-based metrics
    rss = [R.rss_of(p, f) for p, f in zip(prompts, found)]
    comp = [float(np.mean(R.composition_facts(toyworld.parse_prompt(p), f))) for p, f in zip(prompts, found)]
    fid = toyworld.fidelity(images, found)
    learned = [float("nan")] * len(prompts)
    if counter is not None:
        with torch.no_grad():
            learned = R.learned_counter_accuracy(counter, images, prompts).tolist()
    return [{"rss": float(r), "accuracy": float(r == 0), "composition": float(c), "fidelity": float(f),
             "counter_accuracy": float(a)} for r, c, f, a in zip(rss, comp, fid, learned)]


def generate(pipe: Pipeline, prompts: list[str], *, method: str = "rbf", dynamics: str = "vp-sde",
             nfe: int = 200, num_steps: int = 10, reward: str | R.Reward = "counting", seed: int = 0,
             callback=None, progress: bool = False, lookahead: str = "tweedie", max_batch: int = search.MAX_BATCH,
             **knobs) -> Generation:
    """Run one search method for each prompt with a budget of `nfe` velocity evaluations per prompt.

    reward is a name of rewards.get_reward (the shape-world ones need no files) or a reward object
    (e.g. rewards.get_reward("aesthetic", weights=..., clip=...) for real images). `callback`
    receives search.StepInfo after every step; `progress` shows a tqdm bar of the NFE spent.
    `lookahead` is search.Problem's ("tweedie" or "ode:K"); knobs go to the method (e.g. allocation).
    `max_batch` caps the latents per velocity call (the activation memory of a real FLUX.1).
    The search runs on pipe.device; the images come back on the CPU.
    """
    if method not in search.METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(search.METHODS)}")
    if dynamics not in search.ALL_DYNAMICS:
        raise ValueError(f"unknown dynamics {dynamics!r}; choose one of {', '.join(search.ALL_DYNAMICS)}")
    check_seed(seed)
    reward_fn = R.get_reward(reward) if isinstance(reward, str) else reward
    check_reward_for(method, reward_fn)
    cond = encode_prompts(pipe, prompts)
    prompts = cond.prompts
    problem = make_problem(pipe, cond, reward_fn, dynamics=dynamics, num_steps=num_steps, lookahead=lookahead,
                           max_batch=max_batch)
    generator = torch.Generator().manual_seed(seed)
    bars = []  # the progress bar appears with the first step, after the search has checked its inputs

    def on_step(info: search.StepInfo) -> None:
        if not bars:
            bars.append(tqdm(total=nfe * len(prompts), desc=f"{method} {dynamics}", unit="NFE",
                             disable=not progress, dynamic_ncols=True, leave=False))
        bars[0].update(int(info.nfe.sum()))
        if callback is not None:
            callback(info)

    start = time.perf_counter()
    try:
        result = search.run(method, problem, nfe, generator=generator, callback=on_step, **knobs)
    finally:  # also on an error, so that its message starts on a line of its own
        for bar in bars:
            bar.close()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        images = decode(pipe, result.x0).cpu()
    out = Generation(prompts, method, dynamics, nfe, images, result.reward.tolist(), result.nfe_used.tolist(),
                     seconds, result=result)
    if pipe.shape_world:
        out.metrics = heldout_metrics(images, prompts, pipe.counter)
    return out


# -----------------------------------------------------------------------------------------------
# Rewards: a built-in name, or the user's own (--reward module:NAME, --reward path/to/file.py:NAME)


class PluginReward:
    """A reward from outside this repository, following the protocol of rewards.Reward: images (B, 3, H, W)
    in [0, 1] on the pipeline's device and B prompts -> (B,) float tensor, higher is better, with `name`
    and `differentiable`. What it raises becomes one ValueError line naming it (the search checks the
    shape and finiteness of what it returns)."""

    def __init__(self, reward, source: str):
        self.reward, self.source = reward, source
        self.name, self.differentiable = reward.name, reward.differentiable

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        try:
            return self.reward(images, prompts)
        except Exception as e:  # the user's code: any error is reported in one line, with its origin
            raise ValueError(f"reward {self.name!r} ({self.source}) raised {type(e).__name__}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else "(no message)"


def load_reward_plugin(spec: str) -> PluginReward:
    """--reward module:NAME or path/to/file.py:NAME. NAME is a reward object, or a function (or class) of
    no arguments that returns one. ValueError, one line, for every way this can fail."""
    source, _, name = spec.rpartition(":")
    if not source or not name.isidentifier():
        raise ValueError(f"--reward {spec!r}: a plugin reward is module:NAME or path/to/file.py:NAME")
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"--reward {spec!r}: reward file not found: {path}")
        # a module name of its own per file, so that two plugin files never share one
        module_name = "flowscale_reward_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        loader = importlib.util.spec_from_file_location(module_name, path)
    try:
        if source.endswith(".py"):
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
    except Exception as e:  # the plugin's own import failed (a missing package, a syntax error, ...)
        raise ValueError(f"--reward {spec!r}: importing {source} raised {type(e).__name__}: {_first_line(e)}") from e
    if not hasattr(module, name):
        raise ValueError(f"--reward {spec!r}: {source} has no {name!r}")
    obj = getattr(module, name)
    if isinstance(obj, type) or not _is_reward(obj):  # a class or a factory of no arguments
        if not callable(obj):
            raise ValueError(f"--reward {spec!r}: {name} is a {type(obj).__name__}, not a reward or a function")
        if _required_arguments(obj):
            raise ValueError(f"--reward {spec!r}: {name} takes arguments, so it is not a factory of no arguments, and "
                             f"it is not a reward: a reward is callable as reward(images, prompts) and has name "
                             f"(str) and differentiable (bool)")
        try:
            obj = obj()
        except Exception as e:
            raise ValueError(f"--reward {spec!r}: {name}() raised {type(e).__name__}: {_first_line(e)}") from e
    if not _is_reward(obj):
        raise ValueError(f"--reward {spec!r}: {name} gives a {type(obj).__name__}, which is not a reward: a reward is "
                         f"callable as reward(images, prompts) and has name (str) and differentiable (bool)")
    return PluginReward(obj, spec)


def _required_arguments(fn) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return False
    return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               for p in parameters)


def _is_reward(obj) -> bool:
    return (callable(obj) and not isinstance(obj, type) and isinstance(getattr(obj, "name", None), str)
            and bool(obj.name) and isinstance(getattr(obj, "differentiable", None), bool))


def load_reward(spec: str, *, weights=None, clip=None, device: str | torch.device = "cpu"):
    """A reward by --reward: a rewards.REWARD_NAMES name or a plugin (module:NAME, path/to/file.py:NAME).
    The built-in real-image rewards are loaded on `device`."""
    if spec not in R.REWARD_NAMES and ":" in spec:
        return load_reward_plugin(spec)
    reward = R.get_reward(spec, weights=weights, clip=clip, device=str(device))
    if isinstance(reward, R.LearnedCounter):  # the shape world's differentiable counter runs beside the model
        reward = reward.to(device)
    return reward


def check_seed(seed) -> int:
    """A seed is an integer in [0, 2**32): torch's generator ignores the higher bits (see MAX_SEED)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to 2**32 - 1 = {MAX_SEED}, got {seed!r} "
                         f"(torch's generator keeps only 32 bits)")
    return int(seed)


def check_reward_for(method: str, reward) -> None:
    """The dps methods need a differentiable reward: ValueError naming the ones to pass."""
    if method in search.DPS_METHODS and not getattr(reward, "differentiable", False):
        raise ValueError(f"{method} needs a differentiable reward and {getattr(reward, 'name', reward)!r} is not: "
                         f"pass --reward learned-counter (on the embedded model; aesthetic and clip-score for real "
                         f"images), or use a method without dps")


def heldout_prompts(kind: str, n: int, seed: int = 0, split: str = "heldout") -> list[str]:
    """The first n held-out (split "heldout" or "hard") shape-world prompts of `kind`, n from 1 to MAX_PROMPTS."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PROMPTS:
        raise ValueError(f"--prompts must be a number from 1 to {MAX_PROMPTS}, got {n!r}")
    return toyworld.heldout_prompts(kind, n, seed=seed, split=split)


def budget_note(generation: Generation, i: int) -> str | None:
    """Why prompt i used less than its budget, when the method cannot spend more (None otherwise)."""
    used = generation.nfe_used[i]
    if used >= generation.nfe:
        return None
    if generation.method in ("none", "dps"):
        what = "the plain sampler" if generation.method == "none" else "DPS (one guided chain)"
        return (f"{what} spends one NFE per step: used {used} of the {generation.nfe} NFE budget; use bon / rbf "
                f"(or svdd+dps / rbf+dps) to spend a larger budget")
    return f"used {used} of the {generation.nfe} NFE budget (the rest does not make a whole particle)"


# -----------------------------------------------------------------------------------------------
# Output: PNG images, grids, JSON, each written to a temporary file in its folder and renamed,
# so a reader (or a resumed run) never sees a half-written file


def temporary_path(path: Path) -> Path:
    """A new, empty, hidden file in path's folder, for writing path atomically (rename when done)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def finish(tmp: Path, path: Path) -> None:
    """fsync tmp and rename it to path (atomic on POSIX within one folder)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write path whole or not at all: the data go to a temporary file in the same folder, renamed."""
    tmp = temporary_path(path)
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        finish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(folder: Path) -> None:
    """ValueError unless `folder` exists (it is created) and a file can be written in it; run before
    any long work, so an output problem does not cost the search."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary_path(folder / "probe").unlink()
    except OSError as e:
        raise ValueError(f"cannot write to the output folder {folder}: {e.strerror or e}") from None


def save_png(image: torch.Tensor, path: Path, scale: int = 8) -> None:
    """One image (3, H, W) in [0, 1] as a PNG, enlarged `scale` times with nearest pixels (32 px is tiny)."""
    import matplotlib.pyplot as plt

    array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    array = array.repeat(scale, axis=0).repeat(scale, axis=1)
    tmp = temporary_path(path)
    try:
        plt.imsave(tmp, array, format="png")
        finish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_grid(rows: list[str], columns: list[str], images: list[list[torch.Tensor]],
              captions: list[list[str]], path: Path, title: str = "") -> None:
    """A grid of images: one row per prompt, one column per method, a caption under each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.4 * len(columns), 2.6 * len(rows)),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):
            ax = axes[i, j]
            ax.imshow(images[i][j].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(captions[i][j], fontsize=8)
            if i == 0:
                ax.set_title(column, fontsize=9)
            if j == 0:
                ax.set_ylabel("\n".join(_wrap(row, 22)), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = temporary_path(path)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        finish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def generation_record(generation: Generation, i: int, **settings) -> dict:
    """The JSON record of prompt i of a generation."""
    g = generation
    record = {"prompt": g.prompts[i], "method": g.method, "dynamics": g.dynamics, "nfe": g.nfe,
              "nfe_used": g.nfe_used[i], "reward": g.reward[i], "seconds": round(g.seconds, 3), **settings}
    if generation.metrics:
        record["heldout"] = generation.metrics[i]
    note = budget_note(generation, i)
    if note:
        record["note"] = note
    return record


# -----------------------------------------------------------------------------------------------
# Commands


DEMO_PROMPTS = 4           # the first k hard held-out counting prompts (toyworld.heldout_prompts, split "hard")
DEMO_NFE = 200             # RBF's budget per prompt in the demo (the plain sampler uses num_steps)


def cmd_demo(args) -> None:
    check_seed(args.seed)
    prompts = heldout_prompts("counting", args.prompts, seed=args.seed, split="hard")
    out = Path(args.out)
    check_writable(out)
    pipe = load_pipeline(args.model)
    runs = [("plain (Linear-ODE)", dict(method="none", dynamics="linear-ode", nfe=args.steps)),
            (f"BoN, {args.nfe} NFE", dict(method="bon", dynamics="linear-ode", nfe=args.nfe)),
            (f"RBF VP-SDE, {args.nfe} NFE", dict(method="rbf", dynamics="vp-sde", nfe=args.nfe))]
    gens = []
    for label, settings in runs:
        print(f"{label} ...", file=sys.stderr)
        gens.append(generate(pipe, prompts, num_steps=args.steps, reward=args.reward, seed=args.seed,
                             progress=True, **settings))

    images = [[g.images[i] for g in gens] for i in range(len(prompts))]
    captions = [[f"reward {g.reward[i]:.2f}" + (f", acc {g.metrics[i]['accuracy']:.0f}, "
                                                f"fid {g.metrics[i]['fidelity']:.2f}" if g.metrics else "")
                 for g in gens] for i in range(len(prompts))]
    save_grid(prompts, [label for label, _ in runs], images, captions, out / "grid.png",
              title=f"{Path(pipe.name).name}: reward = {args.reward}")

    header = (f"| method | mean {args.reward} reward | counting accuracy | learned-counter accuracy | "
              f"fidelity | NFE used / prompt | seconds |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for (label, _), g in zip(runs, gens):
        def mean(key):
            return np.mean([m[key] for m in g.metrics]) if g.metrics else float("nan")
        lines.append(f"| {label} | {np.mean(g.reward):.3f} | {mean('accuracy'):.2f} | {mean('counter_accuracy'):.2f} | "
                     f"{mean('fidelity'):.2f} | {np.mean(g.nfe_used):.0f} | {g.seconds:.1f} |")
    table = "\n".join(lines)
    print(table)
    summary = {"model": pipe.name, "reward": args.reward, "steps": args.steps, "seed": args.seed,
               "runs": [generation_record(g, i) for g in gens for i in range(len(prompts))]}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(out / "table.md", table + "\n")
    print(f"wrote {out / 'grid.png'}, {out / 'summary.json'}", file=sys.stderr)


def write_image_and_record(out: Path, image: torch.Tensor, record: dict, scale: int) -> dict:
    """image.png and result.json as a pair: both are written to temporary files first; then the old
    result.json is removed, image.png renamed into place, result.json last. A reader that finds
    result.json finds its image (result.json carries the image's sha256 to check)."""
    png, js = out / "image.png", out / "result.json"
    tmp_png = temporary_path(png)
    tmp_js = temporary_path(js)
    try:
        save_png(image, tmp_png, scale=scale)
        record = record | {"image_sha256": hashlib.sha256(tmp_png.read_bytes()).hexdigest()}
        tmp_js.write_text(json.dumps(record, indent=2) + "\n")
        js.unlink(missing_ok=True)
        os.replace(tmp_png, png)
        finish(tmp_js, js)
    except OSError as e:
        raise ValueError(f"could not write {out}: {e.strerror or e}") from None
    finally:
        tmp_png.unlink(missing_ok=True)
        tmp_js.unlink(missing_ok=True)
    return record


def read_prompt_file(path: str | Path, option: str = "--prompts") -> list[str]:
    """A prompts file: one prompt a line; blank lines and lines starting with # are skipped, a repeated
    prompt is kept once. ValueError (one line) when it cannot be read or holds no prompt."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{option} {path}: not a UTF-8 text file") from None
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot read it: {e.strerror or e}") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = list(dict.fromkeys(p for p in prompts if p and not p.startswith("#")))
    if not prompts:
        raise ValueError(f"{option} {path}: no prompts in it (one prompt a line)")
    return prompts


def device_settings(args) -> dict:
    """load_pipeline's device, dtype, offload and compile from the CLI flags, checked (ValueError)."""
    device = resolve_device(args.device)
    return {"device": device, "dtype": resolve_dtype(args.dtype, device), "offload": args.offload,
            "compile": args.compile}


def prompt_folder(out: Path, i: int, prompt: str) -> Path:
    """The output folder of line i of a prompts file: its position (the search's seed depends on it), a
    readable part of the prompt and a hash of it (two prompts never share a folder)."""
    slug = "".join(c if c.isalnum() else "-" for c in prompt.lower())[:40].strip("-") or "prompt"
    return out / f"{i:04d}-{slug}-{hashlib.sha1(prompt.encode()).hexdigest()[:6]}"


def finished(folder: Path, prompt: str, settings: dict) -> bool:
    """Whether folder holds the result of `prompt` under `settings` with its image intact. ValueError
    when it holds a result of other settings (a rerun must not mix them)."""
    try:
        record = json.loads((folder / "result.json").read_text())
        image = (folder / "image.png").read_bytes()
    except (OSError, ValueError):
        return False  # not run yet, or killed before its pair was written
    if not isinstance(record, dict) or record.get("prompt") != prompt:
        return False
    old = {k: record.get(k) for k in settings}
    if old != settings:
        changed = sorted(k for k in settings if old[k] != settings[k])
        raise ValueError(f"{folder} holds a result with other settings ({', '.join(changed)}); use another --out")
    return record.get("image_sha256") == hashlib.sha256(image).hexdigest()


def cmd_generate(args) -> None:
    # Everything that can be checked cheaply is checked before the model loads and the search runs.
    if args.method not in search.METHODS:
        raise ValueError(f"unknown method {args.method!r}; choose one of {', '.join(search.METHODS)}")
    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("give --prompt P or --prompts FILE (one prompt a line), one of them")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("empty prompt")
    prompts = read_prompt_file(args.prompts) if args.prompts is not None else [args.prompt]
    check_seed(args.seed)
    if not (isinstance(args.batch, int) and 1 <= args.batch <= MAX_PROMPTS):
        raise ValueError(f"--batch must be a number from 1 to {MAX_PROMPTS}, got {args.batch}")
    if not args.max_batch >= 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    placement = device_settings(args)
    knobs = {}
    if args.dps_beta is not None:
        if args.method not in search.DPS_METHODS:
            raise ValueError(f"--dps-beta sets the guidance of {', '.join(search.DPS_METHODS)}; method {args.method!r} "
                             f"has none")
        if not (math.isfinite(args.dps_beta) and args.dps_beta > 0):
            raise ValueError(f"--dps-beta must be a finite number > 0, got {args.dps_beta}")
        knobs = {"beta": args.dps_beta} if args.method == "dps" else {"dps_beta": args.dps_beta}
    out = Path(args.out)
    check_writable(out)
    # Real-image rewards read their files here (the aesthetic head, a full CLIP ViT-L/14 folder), and a
    # plugin is imported, before the model: a missing file should not cost the minutes of loading FLUX.1.
    reward = load_reward(args.reward, weights=args.reward_weights, clip=args.clip, device=placement["device"])
    knobs |= search_knobs(args)  # a bad --allocation / --lookahead fails here, before the model loads
    check_reward_for(args.method, reward)
    pipe = load_pipeline(args.model, height=args.height, width=args.width, **placement)
    read = normalise_prompts(pipe, prompts)
    check_prompts(pipe, read)  # every prompt of the file, before the first search
    for given, prompt in zip(prompts, read):
        if prompt != given:
            print(f"flowscale generate: note: the model reads the prompt as {prompt!r} (its vocabulary is lower-case)",
                  file=sys.stderr)
    settings = dict(method=args.method, dynamics=args.dynamics, nfe=args.nfe, steps=args.steps,
                    reward_name=args.reward, seed=args.seed, model=pipe.name, lookahead=args.lookahead,
                    **({k: v for k, v in knobs.items() if k not in ("beta", "dps_beta")}),
                    **({} if args.dps_beta is None else {"dps_beta": args.dps_beta}),
                    **({} if pipe.time_shift is None else {"time_shift": pipe.time_shift}))
    scale = 8 if pipe.shape_world else 1

    def search_for(batch: list[str], seed: int) -> Generation:
        return generate(pipe, batch, method=args.method, dynamics=args.dynamics, nfe=args.nfe, num_steps=args.steps,
                        reward=reward, seed=seed, progress=True, lookahead=args.lookahead, max_batch=args.max_batch,
                        **knobs)

    if args.prompts is None:  # one prompt: out/image.png and out/result.json, as always
        generation = search_for(read, args.seed)
        record = generation_record(generation, 0, **{k: v for k, v in settings.items() if k not in ("method", "nfe")})
        if "note" in record:
            print(f"flowscale generate: note: {record['note']}", file=sys.stderr)
        record = write_image_and_record(out, generation.images[0], record, scale=scale)
        print(json.dumps(record, indent=2))
        return
    # A prompts file: fixed chunks of --batch lines, chunk c searched with seed chunk_seed(seed, c), so
    # that a prompt's result depends on its line only, and a rerun redoes just the unfinished chunks.
    folders = [prompt_folder(out, i, p) for i, p in enumerate(read)]
    records, skipped = [], 0
    for c, lo in enumerate(range(0, len(read), args.batch)):
        chunk = list(range(lo, min(lo + args.batch, len(read))))
        todo = [i for i in chunk if not finished(folders[i], read[i], settings)]
        skipped += len(chunk) - len(todo)
        if not todo:
            continue
        generation = search_for([read[i] for i in chunk], chunk_seed(args.seed, c))
        for j, i in enumerate(chunk):
            if i not in todo:
                continue
            folders[i].mkdir(parents=True, exist_ok=True)
            record = generation_record(generation, j, line=i + 1, **{k: v for k, v in settings.items()
                                                               if k not in ("method", "nfe")})
            records.append(write_image_and_record(folders[i], generation.images[j], record, scale=scale))
            print(f"flowscale generate: {folders[i]}: reward {record['reward']:.4g}", file=sys.stderr)
    print(json.dumps({"out": str(out), "prompts": len(read), "written": len(records), "skipped": skipped,
                      "results": records}, indent=2))


def chunk_seed(seed: int, chunk: int) -> int:
    """The generate seed of chunk c of a prompts file (or of a bench run): distinct chunks get
    independent noises, though prompt positions within chunks repeat."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def search_knobs(args) -> dict:
    """The rbf knobs of --allocation / --threshold / --init-particles / --no-rollover (none unless given),
    after checking them and --lookahead."""
    search.lookahead_steps(args.lookahead)
    if args.allocation is not None and args.allocation not in search.ALLOCATIONS:
        raise ValueError(f"--allocation must be one of {', '.join(search.ALLOCATIONS)}, got {args.allocation!r}")
    if (args.allocation == "threshold") != (args.threshold is not None):
        raise ValueError("--allocation threshold needs --threshold <reward level>, and only it takes one")
    if args.init_particles is not None and args.init_particles < 1:
        raise ValueError(f"--init-particles must be >= 1, got {args.init_particles}")
    return ({} if args.allocation is None else {"allocation": args.allocation}) | \
        ({} if args.threshold is None else {"threshold": args.threshold}) | \
        ({} if args.init_particles is None else {"init_particles": args.init_particles}) | \
        ({"rollover": False} if args.no_rollover else {})


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --offload, --compile (shared by generate and bench)."""
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps: where the velocity network and the "
                                                   "search run")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the networks: " + " | ".join(DTYPES) +
                   " (the search math stays float32)")
    p.add_argument("--offload", action="store_true",
                   help="keep the text encoders, and the autoencoder between decodes, on the CPU (FLUX.1 beside a "
                        "reward model on one 24-48 GB GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the velocity network (the first calls "
                                                          "compile it: worth it for long searches)")
    p.add_argument("--max-batch", type=int, default=search.MAX_BATCH,
                   help="latents per velocity call (activation memory: 1-4 for FLUX.1 at 1024^2 on a 24-48 GB GPU)")


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    """--allocation, --threshold, --init-particles, --no-rollover, --lookahead (shared by generate and bench)."""
    p.add_argument("--allocation", default=None,
                   help="rbf / rbf+dps budget allocation: " + " | ".join(search.ALLOCATIONS) + " [rollover, Alg. 2]")
    p.add_argument("--threshold", type=float, default=None, help="reward level of --allocation threshold")
    p.add_argument("--init-particles", type=int, default=None,
                   help="rbf / rbf+dps: initial noises per chain (Alg. 2 as printed: 1) [10%% of the budget, the "
                        "official code]")
    p.add_argument("--no-rollover", action="store_true",
                   help="rbf / rbf+dps: every stage gets the same quota, unused NFE do not roll over (the ablation)")
    p.add_argument("--lookahead", default="tweedie",
                   help="value of a particle: tweedie (x0_hat, Eq. 19) | ode:K (K Euler steps to t = 0, K - 1 more NFE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default=None, help="model folder (default: the embedded weights/mini-flux-schnell)")
        p.add_argument("--steps", type=int, default=10, help="denoising steps")
        p.add_argument("--reward", default="counting",
                       help="given reward: " + " | ".join(R.REWARD_NAMES) + " | module:NAME | path/to/file.py:NAME "
                            "(your own; see examples/reward_plugin.py)")
        p.add_argument("--seed", type=int, default=0, help=f"random seed, 0 .. 2**32 - 1 = {MAX_SEED}")

    demo = sub.add_parser("demo", help="plain sampler vs BoN vs RBF on the embedded model",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(demo)
    demo.add_argument("--out", default="out/demo")
    demo.add_argument("--prompts", type=int, default=DEMO_PROMPTS,
                      help=f"held-out counting prompts (1 .. {MAX_PROMPTS})")
    demo.add_argument("--nfe", type=int, default=DEMO_NFE, help="budget per prompt of BoN and RBF")

    generate_parser = sub.add_parser("generate", help="one prompt, one search method",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(generate_parser)
    generate_parser.add_argument("--prompt", default=None,
                                 help="the prompt; lower-cased (and, in the shape world, without commas and full "
                                      "stop) for a model whose vocabulary is lower-case, as the embedded one")
    generate_parser.add_argument("--prompts", default=None,
                                 help="a file of prompts, one a line: one folder per prompt under --out (image.png, "
                                      "result.json); a rerun skips the finished ones")
    generate_parser.add_argument("--batch", type=int, default=1,
                                 help="with --prompts: prompts searched together (their latents share velocity calls)")
    generate_parser.add_argument("--method", default="rbf", help=" | ".join(search.METHODS))
    generate_parser.add_argument("--dynamics", default="vp-sde", help=" | ".join(search.ALL_DYNAMICS))
    generate_parser.add_argument("--nfe", type=int, default=200, help="NFE budget (velocity evaluations)")
    generate_parser.add_argument("--height", type=int, default=1024, help="image height (real FLUX.1 only)")
    generate_parser.add_argument("--width", type=int, default=1024, help="image width (real FLUX.1 only)")
    generate_parser.add_argument("--reward-weights", default=None,
                                 help="aesthetic: the LAION predictor file (sac+logos+ava1-l14-linearMSE.pth or "
                                      ".safetensors)")
    generate_parser.add_argument("--clip", default=None,
                                 help="aesthetic / clip-score: a CLIP ViT-L/14 folder (HF CLIPModel: config.json, "
                                      "model.safetensors, vocab.json, merges.txt)")
    generate_parser.add_argument("--dps-beta", type=float, default=None,
                                 help="reward temperature of dps, svdd+dps and rbf+dps (guidance strength 1/beta; "
                                      "default search.DPS_BETA)")
    add_search_arguments(generate_parser)
    add_device_arguments(generate_parser)
    generate_parser.add_argument("--out", default="out/generate")

    # listed here; its options are experiments.py's (main hands the command over before parsing)
    sub.add_parser("bench", add_help=False, help="the paper's tables and figures in miniature (experiments.py; "
                                                 "`flowscale.py bench --help` for its options)")
    return parser


INTERRUPTED = {"generate": "nothing was written to {out} for the search that ran; run it again (with --prompts, "
                            "the finished prompts are skipped)",
               "demo": "the files written so far in {out} are whole (each is written at once); run it again"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        # The experiment harness is built on this module (experiments -> flowscale): imported for its
        # command only, so that no other command loads it.
        import experiments

        return experiments.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            cmd_demo(args)
        else:
            cmd_generate(args)
    except ValueError as e:  # bad user input (unknown method, budget too small, unknown words, ...)
        print(f"flowscale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, what was kept and how to go on
        print(f"\nflowscale {args.command}: interrupted; " + INTERRUPTED[args.command].format(out=args.out),
              file=sys.stderr)
        return 130
    return 0

