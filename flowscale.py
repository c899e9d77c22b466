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
        the paper's tables and figures in miniature (bench.py); resumable, torchrun-shardable

One generate call (DESIGN.md, "Data flow"):

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

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

import model as M
import rewards as R
import search
import toyworld

DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "mini-flux-schnell"
METHODS = ("none", "bon", "sop", "smc", "code", "svdd", "rbf", "dps", "svdd+dps", "rbf+dps")
DYNAMICS = ("linear-ode", "linear-sde", "vp-sde")

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


def load_pipeline(path: str | Path | None = None, *, height: int = 1024, width: int = 1024,
                  device: str = "cpu", dtype: torch.dtype | None = None, guidance: float = 3.5) -> Pipeline:
    """Load the embedded model (path None) or a FLUX.1 repository folder.

    The embedded model's folder has the FLUX.1 layout plus `flowscale.json` (written by train.py),
    which says that it works in pixel space and at what size. A real FLUX.1 folder has vae/ (or
    ae.safetensors); `height` and `width` (multiples of 16) then fix the latent size.
    """
    path = Path(path) if path is not None else DEFAULT_MODEL
    if not path.is_dir():
        hint = " (run `python train.py` to train the embedded model)" if path == DEFAULT_MODEL else ""
        raise ValueError(f"model folder not found: {path}{hint}")
    meta_file = path / "flowscale.json"
    # Both the embedded models and the real FLUX.1 are stored and run in bf16, as the release is
    # used; the search math (noise, SDE steps, Tweedie, rewards) stays float32 (make_velocity).
    # dtype=torch.float32 runs the network in float32 (about half the NFE/s here, see benchmarks/).
    dtype = dtype or torch.bfloat16
    # checked before loading anything (a real FLUX.1 takes minutes to load)
    if not meta_file.is_file() and (height % 16 or width % 16):
        raise ValueError(f"FLUX.1 needs height and width divisible by 16, got {height}x{width}")
    flux = M.load_flux(path, device=device, dtype=dtype)
    t5 = M.load_t5(path, device=device, dtype=dtype)
    clip = M.load_clip_text(path, device=device, dtype=dtype)
    clip_tokenizer = M.load_clip_tokenizer(path)
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        factor = meta["latent_factor"]
        latent = M.PixelLatent(factor)
        shape = (meta["channels"] * factor ** 2, meta["height"] // factor, meta["width"] // factor)
        t5_tokenizer = M.load_t5_tokenizer(path, max_length=meta["t5_max_length"])
        shape_world = meta.get("world") == "shapes"
        return Pipeline(flux, t5, clip, t5_tokenizer, clip_tokenizer, latent, shape, shape_world=shape_world,
                        name=str(path), counter=R.load_counter() if shape_world else None)
    latent = M.load_autoencoder(path, device=device, dtype=dtype)
    is_dev = flux.params.guidance_embed
    # BFL's sequence lengths: 256 T5 tokens for schnell, 512 for dev (notes/flux.md, Tokenizers).
    t5_tokenizer = M.load_t5_tokenizer(path, max_length=512 if is_dev else 256)
    # f = 8 for FLUX.1's autoencoder; read from its config so that other autoencoders get the right latent
    z, f = latent.params.z_channels, latent.params.downsample
    return Pipeline(flux, t5, clip, t5_tokenizer, clip_tokenizer, latent, (z, height // f, width // f),
                    shape_world=False, guidance=guidance if is_dev else None, name=str(path))


# -----------------------------------------------------------------------------------------------
# Conditioning, the velocity function and decoding


@dataclass
class Conditioning:
    """The text conditioning of P prompts, computed once per search."""

    prompts: list[str]
    txt: torch.Tensor       # (P, L_txt, context_in_dim) T5 states
    y: torch.Tensor         # (P, vec_in_dim) CLIP pooled vector


def check_prompts(pipe: Pipeline, prompts: list[str]) -> None:
    """ValueError for a prompt the model cannot take: empty, or (embedded model) outside the shape world."""
    if not prompts:
        raise ValueError("give at least one prompt")
    for prompt in prompts:
        if not prompt.strip():
            raise ValueError("empty prompt")
        if pipe.shape_world:
            toyworld.parse_prompt(prompt)  # raises ValueError naming the unknown words


@torch.no_grad()
def encode_prompts(pipe: Pipeline, prompts: list[str]) -> Conditioning:
    check_prompts(pipe, prompts)
    dtype = pipe.flux.img_in.weight.dtype
    txt = pipe.t5(pipe.t5_tokenizer(prompts)).to(dtype)                 # (P, L_txt, D_t5)
    y = pipe.clip(pipe.clip_tokenizer(prompts))[1].to(dtype)             # (P, D_clip)
    return Conditioning(prompts, txt, y)


def make_velocity(pipe: Pipeline, cond: Conditioning) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's velocity u_t(x) on the linear path, for latents of several prompts at once.

    velocity(x (B, C, H, W), t (B,), prompt (B,) long) -> u (B, C, H, W). One row is one NFE;
    search.py does the counting. Gradients flow through it when enabled (DPS).
    """
    C, H, W = pipe.latent_shape
    img_ids = M.image_ids(1, H, W)                                        # (1, H/2 * W/2, 3)
    txt_ids = M.text_ids(1, cond.txt.shape[1])                            # (1, L_txt, 3)
    dtype = pipe.flux.img_in.weight.dtype

    def velocity(x: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        guidance = None if pipe.guidance is None else torch.full((B,), pipe.guidance)
        u = pipe.flux(img=M.pack(x.to(dtype)), img_ids=img_ids, txt=cond.txt[prompt], txt_ids=txt_ids,
                      timesteps=t.to(dtype), y=cond.y[prompt], guidance=guidance)  # (B, H/2 * W/2, 4C)
        return M.unpack(u, H, W).to(x.dtype)                              # (B, C, H, W)

    return velocity


def decode(pipe: Pipeline, z: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, H, W) -> images (B, 3, H', W') in [0, 1], in z's dtype (differentiable)."""
    # The autoencoder may hold another dtype than the search's latents (bf16 for FLUX.1, float32
    # latents): decode in its dtype and hand back z's, as make_velocity does.
    weight = next(pipe.latent.parameters(), None)  # None for the embedded model's PixelLatent
    x = pipe.latent.decode(z if weight is None else z.to(weight.dtype)).to(z.dtype)
    return ((x + 1) / 2).clamp(0, 1)


def make_problem(pipe: Pipeline, cond: Conditioning, reward, *, dynamics: str = "vp-sde",
                 num_steps: int = 10, max_batch: int = 64, lookahead: str = "tweedie") -> search.Problem:
    """The search problem of P prompts: the counted velocity and reward(decode(x0_hat))."""
    prompts = cond.prompts

    def reward_fn(x0: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        return reward(decode(pipe, x0), [prompts[i] for i in prompt.tolist()])

    return search.Problem(velocity=make_velocity(pipe, cond), reward=reward_fn, reward_name=reward.name,
                          differentiable=reward.differentiable, shape=pipe.latent_shape,
                          num_prompts=len(prompts), dynamics=dynamics, num_steps=num_steps,
                          max_batch=max_batch, lookahead=lookahead)


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
    rss = -R.CountingReward()(images, prompts)
    comp = R.CompositionReward()(images, prompts)
    fid = toyworld.fidelity(images)
    learned = [float("nan")] * len(prompts)
    if counter is not None:
        with torch.no_grad():
            learned = R.learned_counter_accuracy(counter, images, prompts).tolist()
    return [{"rss": float(r), "accuracy": float(r == 0), "composition": float(c), "fidelity": float(f),
             "counter_accuracy": float(a)} for r, c, f, a in zip(rss, comp, fid, learned)]


def generate(pipe: Pipeline, prompts: list[str], *, method: str = "rbf", dynamics: str = "vp-sde",
             nfe: int = 200, num_steps: int = 10, reward: str | R.Reward = "counting", seed: int = 0,
             callback=None, progress: bool = False, lookahead: str = "tweedie", **knobs) -> Generation:
    """Run one search method for each prompt with a budget of `nfe` velocity evaluations per prompt.

    reward is a name of rewards.get_reward (the shape-world ones need no files) or a reward object
    (e.g. rewards.get_reward("aesthetic", weights=..., clip=...) for real images). `callback`
    receives search.StepInfo after every step; `progress` shows a tqdm bar of the NFE spent.
    `lookahead` is search.Problem's ("tweedie" or "ode:K"); knobs go to the method (e.g. allocation).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if dynamics not in DYNAMICS:
        raise ValueError(f"unknown dynamics {dynamics!r}; choose one of {', '.join(DYNAMICS)}")
    reward_fn = R.get_reward(reward) if isinstance(reward, str) else reward
    cond = encode_prompts(pipe, prompts)
    problem = make_problem(pipe, cond, reward_fn, dynamics=dynamics, num_steps=num_steps, lookahead=lookahead)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=nfe * len(prompts), desc=f"{method} {dynamics}", unit="NFE", disable=not progress,
               dynamic_ncols=True, leave=False)

    def on_step(info: search.StepInfo) -> None:
        bar.update(int(info.nfe.sum()))
        if callback is not None:
            callback(info)

    start = time.perf_counter()
    result = search.run(method, problem, nfe, generator=generator, callback=on_step, **knobs)
    seconds = time.perf_counter() - start
    bar.close()
    with torch.no_grad():
        images = decode(pipe, result.x0)
    out = Generation(prompts, method, dynamics, nfe, images, result.reward.tolist(), result.nfe_used.tolist(),
                     seconds, result=result)
    if pipe.shape_world:
        out.metrics = heldout_metrics(images, prompts, pipe.counter)
    return out


# -----------------------------------------------------------------------------------------------
# Output: PNG images, grids, JSON


def save_png(image: torch.Tensor, path: Path, scale: int = 8) -> None:
    """One image (3, H, W) in [0, 1] as a PNG, enlarged `scale` times with nearest pixels (32 px is tiny)."""
    import matplotlib.pyplot as plt

    array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    array = array.repeat(scale, axis=0).repeat(scale, axis=1)
    plt.imsave(path, array)


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
    fig.savefig(path, dpi=110)
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


def generation_record(gen: Generation, i: int, **settings) -> dict:
    """The JSON record of prompt i of a generation."""
    record = {"prompt": gen.prompts[i], "method": gen.method, "dynamics": gen.dynamics, "nfe": gen.nfe,
              "nfe_used": gen.nfe_used[i], "reward": gen.reward[i], "seconds": round(gen.seconds, 3), **settings}
    if gen.metrics:
        record["heldout"] = gen.metrics[i]
    return record


# -----------------------------------------------------------------------------------------------
# Commands


DEMO_PROMPTS = 4           # the first k hard held-out counting prompts (toyworld.heldout_prompts, split "hard")
DEMO_NFE = 200             # RBF's budget per prompt in the demo (the plain sampler uses num_steps)


def cmd_demo(args) -> None:
    pipe = load_pipeline(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = toyworld.heldout_prompts("counting", args.prompts, seed=args.seed, split="hard")
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
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(table + "\n")
    print(f"wrote {out / 'grid.png'}, {out / 'summary.json'}", file=sys.stderr)


def cmd_generate(args) -> None:
    # Real-image rewards read their files here (the aesthetic head, a full CLIP ViT-L/14 folder),
    # before the model: a missing file should not cost the minutes of loading FLUX.1 first.
    reward = R.get_reward(args.reward, weights=args.reward_weights, clip=args.clip)
    knobs = search_knobs(args)  # a bad --allocation / --lookahead fails here, before the model loads
    pipe = load_pipeline(args.model, height=args.height, width=args.width)
    if args.dps_beta is not None:
        knobs["dps_beta"] = args.dps_beta
    gen = generate(pipe, [args.prompt], method=args.method, dynamics=args.dynamics, nfe=args.nfe,
                   num_steps=args.steps, reward=reward, seed=args.seed, progress=True, lookahead=args.lookahead,
                   **knobs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_png(gen.images[0], out / "image.png", scale=8 if pipe.shape_world else 1)
    record = generation_record(gen, 0, steps=args.steps, reward_name=args.reward, seed=args.seed,
                               model=pipe.name, lookahead=args.lookahead, **knobs)
    (out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def search_knobs(args) -> dict:
    """The rbf knobs of --allocation / --threshold (none unless given), after checking them and --lookahead."""
    search.lookahead_steps(args.lookahead)
    if args.allocation is not None and args.allocation not in search.ALLOCATIONS:
        raise ValueError(f"--allocation must be one of {', '.join(search.ALLOCATIONS)}, got {args.allocation!r}")
    if (args.allocation == "threshold") != (args.threshold is not None):
        raise ValueError("--allocation threshold needs --threshold <reward level>, and only it takes one")
    return ({} if args.allocation is None else {"allocation": args.allocation}) | \
        ({} if args.threshold is None else {"threshold": args.threshold})


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    """--allocation, --threshold, --lookahead (shared by generate and bench)."""
    p.add_argument("--allocation", default=None,
                   help="rbf / rbf+dps budget allocation: " + " | ".join(search.ALLOCATIONS) + " [rollover, Alg. 2]")
    p.add_argument("--threshold", type=float, default=None, help="reward level of --allocation threshold")
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
                       help="given reward: " + " | ".join(R.REWARD_NAMES))
        p.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("demo", help="plain sampler vs BoN vs RBF on the embedded model",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(demo)
    demo.add_argument("--out", default="out/demo")
    demo.add_argument("--prompts", type=int, default=DEMO_PROMPTS, help="held-out counting prompts")
    demo.add_argument("--nfe", type=int, default=DEMO_NFE, help="budget per prompt of BoN and RBF")

    gen = sub.add_parser("generate", help="one prompt, one search method",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--method", default="rbf", help=" | ".join(METHODS))
    gen.add_argument("--dynamics", default="vp-sde", help=" | ".join(DYNAMICS))
    gen.add_argument("--nfe", type=int, default=200, help="NFE budget (velocity evaluations)")
    gen.add_argument("--height", type=int, default=1024, help="image height (real FLUX.1 only)")
    gen.add_argument("--width", type=int, default=1024, help="image width (real FLUX.1 only)")
    gen.add_argument("--reward-weights", default=None,
                     help="aesthetic: the LAION predictor file (sac+logos+ava1-l14-linearMSE.pth or .safetensors)")
    gen.add_argument("--clip", default=None,
                     help="aesthetic / clip-score: a CLIP ViT-L/14 folder (HF CLIPModel: config.json, "
                          "model.safetensors, vocab.json, merges.txt)")
    gen.add_argument("--dps-beta", type=float, default=None,
                     help="reward temperature of the +dps methods (guidance strength 1/beta; default search.DPS_BETA)")
    add_search_arguments(gen)
    gen.add_argument("--out", default="out/generate")

    import bench  # the benchmark harness imports this module, so it is imported here, not at the top

    bench.add_arguments(sub.add_parser("bench", help="the paper's tables and figures in miniature (bench.py)",
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            import bench
            bench.run(args)
        else:
            {"demo": cmd_demo, "generate": cmd_generate}[args.command](args)
    except ValueError as e:  # bad user input (unknown method, budget too small, unknown words, ...)
        print(f"flowscale {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
