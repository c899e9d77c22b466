"""
experiments: the paper's claims, reproduced in miniature on a CPU (`python flowscale.py bench`).

Kim, Yoon, Hwang, Sung 2025, "Inference-Time Scaling for Flow Models via Stochastic Generation and
Rollover Budget Forcing", arXiv 2503.19385. The embedded mini-FLUX stands in for FLUX, the exact
shape-world rewards for VQAScore and GroundingDINO (rewards.py). The claims checked (Sec. 7):

  1. SDE conversion makes particle methods (SMC, CoDe, SVDD, RBF) beat their Linear-ODE versions
     (Table 1, Fig. 7).
  2. VP-SDE beats Linear-SDE for those methods, and its samples from one x_t are more diverse
     (Table 1 of v5: LPIPS-MPD; here the mean pairwise L2 distance of the decoded x0).
  3. RBF on VP-SDE is the best method at equal NFE, and keeps improving with NFE where BoN
     plateaus (Tables 4-5, Figs. 12-13).
  4. With a differentiable reward (the learned counter), RBF+DPS beats DPS and SVDD+DPS on the given
     reward and on the held-out exact metric (Table 2).

    python flowscale.py bench --task counting|composition [--reward learned-counter] --methods ...
        --dynamics ... --nfe 50,100,200,500 --prompts N|FILE --seeds K [--quick] --out DIR

(or `torchrun --nproc_per_node K experiments.py ...`, or `python experiments.py ...` directly)
writes DIR/results.csv (one row per prompt x method x dynamics x NFE x seed), DIR/results.md (the
tables, laid out like the paper's Table 1 and Tables 4-5, mean +- standard error over prompts and
seeds, and a verdict per claim) and the figures reward_vs_nfe.png, diversity.png,
rbf_nfe_per_step.png, grid.png. The given reward is the task's (counting: -RSS, composition: the
fraction of facts), or the learned counter (claim 4); every row also carries the exact metrics of its
image (RSS, accuracy = [RSS == 0], composition) as the held-out metrics.

How the work is cut, and why:
  * The prompts are split into fixed chunks of --batch prompts. A unit of work is one generate call:
    (method, dynamics, NFE, seed, chunk); the particles of a chunk's prompts share velocity calls.
    The chunks do not depend on the number of processes, so every row is the same whether the run
    takes one process or `torchrun --nproc_per_node K` (the search seeds prompt j of a call from
    its position j in the call: re-sharding prompts would change their noise).
  * Resumable: rows are appended, flushed and fsync'ed after each call, each call's rows in one
    write, after the call's image; a unit whose rows are all in results.csv (and whose image reads
    back) is skipped, a half-written last line (killed process) is dropped on reading, a row repeated
    under one key is read once. Every other file is written to a temporary file and renamed, so none
    is ever half-written. One run at a time per --out: DIR/bench.lock (flock) names the holder.
  * torchrun (RANK / WORLD_SIZE set): gloo process group, units dealt round-robin, and after every
    round of K units rank 0 gathers the rows (gather_object) and is the only writer.
  * Deterministic given --seeds: chunk c of seed s runs generate(seed=flowscale.chunk_seed(s, c)).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import fcntl
import functools
import hashlib
import io
import json
import math
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import flowscale
import rewards as R
import search
import sde

# -----------------------------------------------------------------------------------------------
# 1. Settings and the plan of units

TASKS = ("counting", "composition")  # prompt kinds; each is also the name of its given reward (Sec. 7.1-7.2)
PARTICLE_METHODS = ("smc", "code", "svdd", "rbf")  # claims 1-2
LINEAR_ODE_ONLY = ("bon", "sop")  # run with the linear ODE only, as in the paper's Table 1
COLUMNS = ["model", "task", "reward", "steps", "method", "dynamics", "nfe", "seed", "batch", "prompt_id", "prompt",
           "given_reward", "rss", "accuracy", "composition", "fidelity", "counter_accuracy", "nfe_used",
           "nfe_per_step", "seconds", "image_sha"]
# One row per key. A row's noise depends on its chunk and its place in it, so --batch and the prompt's
# position (prompt_id) belong to the key, and so does the model: a resume with another --model, --batch
# or prompt order runs new rows instead of mixing them with the old ones (the report reads only the
# rows of the current plan).
KEY = ("model", "task", "reward", "steps", "method", "dynamics", "nfe", "seed", "batch", "prompt_id", "prompt")
LABEL = {"none": "plain", "bon": "BoN", "sop": "SoP", "smc": "SMC", "code": "CoDe", "svdd": "SVDD", "rbf": "RBF",
         "dps": "DPS", "svdd+dps": "SVDD+DPS", "rbf+dps": "RBF+DPS"}
DYNAMICS_COLOUR = {"linear-ode": "tab:grey", "linear-sde": "tab:orange", "vp-sde": "tab:blue",
                   "linear-sde+time": "tab:olive", "linear-sde+diffusion": "tab:red"}  # every figure
ABBR = {"linear-ode": "L.O.", "linear-sde": "L.S.", "vp-sde": "V.S.", "linear-sde+time": "L.S.+time",
        "linear-sde+diffusion": "L.S.+diffusion"}
QUICK = {"prompts": "4", "seeds": 1, "nfe": "50,100", "diversity_samples": 8, "diversity_prompts": 2}
LIMITS = {"seeds": 1000, "steps": 1000, "batch": 1024, "diversity-samples": 1000, "diversity-prompts": flowscale.MAX_PROMPTS}
FULL = {"prompts": "16", "seeds": 1, "nfe": "50,100,200,500", "diversity_samples": 16, "diversity_prompts": 4}


@dataclass
class BenchConfig:
    task: str  # "counting" | "composition": prompt kind and default given reward
    reward: str  # given reward, a rewards.REWARD_NAMES name
    methods: list[str]  # search.METHODS names
    dynamics: list[str]  # search.ALL_DYNAMICS names
    nfe: list[int]  # budgets per prompt ("none" always uses `steps`)
    prompts: list[str]  # the prompts, prompt_id = index
    seeds: int  # seeds 0 .. seeds - 1
    steps: int  # denoising steps T (paper: 10)
    batch: int  # prompts per generate call (a chunk)
    out: Path  # output folder
    model: str | None  # model folder, None = embedded weights/mini-flux-schnell
    height: int  # image height (real FLUX.1 only)
    width: int  # image width (real FLUX.1 only)
    diversity_samples: int  # M samples branched from one x_t
    diversity_prompts: int  # first prompts used for the diversity measurement
    diversity_step: int  # grid index of the shared x_t (3 of 10 steps)
    lookahead: str = "tweedie"  # search.Problem.lookahead of every search
    rbf_knobs: dict = field(default_factory=dict)  # --allocation / --threshold, for rbf and rbf+dps only
    reward_fn: object = None  # a plugin's reward object (--reward module:NAME); None: the built-in `reward`
    placement: dict = field(default_factory=dict)  # load_pipeline's device, dtype, offload, compile (this rank's)
    max_batch: int = search.MAX_BATCH  # latents per velocity call


@dataclass
class Unit:
    """One generate call: all prompts of one chunk under one setting."""

    method: str
    dynamics: str
    nfe: int
    seed: int
    chunk: int  # index of the chunk of --batch prompts
    prompt_ids: list[int]

    @property
    def cost(self) -> int:
        """Its NFE budget over all its prompts (the progress bar counts these)."""
        return self.nfe * len(self.prompt_ids)


def _split(text: str, name: str, known: tuple[str, ...]) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in known]
    if not items or bad:
        raise ValueError(f"--{name}: unknown {bad or 'empty list'}; choose from {', '.join(known)}")
    return list(dict.fromkeys(items))


def load_prompts(spec: str, task: str, seed: int, split: str = "heldout") -> list[str]:
    """--prompts: a number N (the first N prompts of the task's held-out `split`) or a file, one prompt a line."""
    if Path(spec).is_file():
        return flowscale.read_prompt_file(spec)
    if spec.isdigit() and int(spec) >= 1:
        if not 0 <= seed <= flowscale.MAX_SEED:
            raise ValueError(f"--prompt-seed must be from 0 to {flowscale.MAX_SEED}, got {seed}")
        if split not in ("heldout", "hard"):
            raise ValueError(f"--split must be heldout or hard, got {split!r}")
        return flowscale.heldout_prompts(task, int(spec), seed=seed, split=split)
    raise ValueError(f"--prompts takes a number >= 1 or an existing file, got {spec!r}")


def config_from_args(args) -> BenchConfig:
    base = QUICK if args.quick else FULL

    def pick(name: str):  # the option if given, else the full / --quick default
        return getattr(args, name) if getattr(args, name) is not None else base[name]

    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {args.task!r}")
    reward = args.reward or args.task
    plugin = ":" in reward and reward not in R.REWARD_NAMES
    if not plugin and reward not in R.REWARD_NAMES:
        raise ValueError(f"--reward must be one of {', '.join(R.REWARD_NAMES)}, or module:NAME / "
                         f"path/to/file.py:NAME, got {reward!r}")
    # every rank takes its own GPU under torchrun (--device cuda: rank r on cuda:LOCAL_RANK)
    device = rank_device(args.device, int(os.environ.get("WORLD_SIZE", "1")),
                         int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))))
    placement = flowscale.device_settings(argparse.Namespace(device=device, dtype=args.dtype, offload=args.offload,
                                                     compile=args.compile))
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    reward_fn = flowscale.load_reward_plugin(reward) if plugin else None  # imported before the model loads
    differentiable = reward_fn.differentiable if plugin else reward == "learned-counter"
    default_methods = "none,dps,svdd+dps,rbf+dps" if differentiable else "none,bon,sop,smc,code,svdd,rbf"
    try:
        nfe = sorted({int(s) for s in str(pick("nfe")).split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"--nfe takes comma-separated integers, got {pick('nfe')!r}") from None
    if not nfe or nfe[0] < 1:
        raise ValueError(f"--nfe needs budgets >= 1, got {pick('nfe')!r}")
    for name, value in (("seeds", pick("seeds")), ("steps", args.steps), ("batch", args.batch),
                        ("diversity-samples", pick("diversity_samples")), ("diversity-prompts", pick("diversity_prompts"))):
        if value < (2 if name in ("steps", "diversity-samples") else 1):
            raise ValueError(f"--{name} is too small: {value}")
        if value > LIMITS[name]:  # the plan (seeds) or the diversity batch (samples) would not fit
            raise ValueError(f"--{name} is too large: {value} (at most {LIMITS[name]})")
    return BenchConfig(task=args.task, reward=reward, methods=_split(args.methods or default_methods, "methods", search.METHODS),
                       dynamics=_split(args.dynamics, "dynamics", search.ALL_DYNAMICS), nfe=nfe,
                       prompts=load_prompts(str(pick("prompts")), args.task, args.prompt_seed, args.split),
                       seeds=pick("seeds"),
                       steps=args.steps, batch=args.batch, out=Path(args.out), model=args.model, height=args.height,
                       width=args.width, diversity_samples=pick("diversity_samples"),
                       diversity_prompts=pick("diversity_prompts"), diversity_step=max(1, round(0.3 * args.steps)),
                       lookahead=args.lookahead, rbf_knobs=flowscale.search_knobs(args), reward_fn=reward_fn,
                       placement=placement, max_batch=args.max_batch)


def rank_device(spec: str, world: int, local_rank: int) -> str:
    """The --device of this process: under torchrun (world > 1) --device cuda puts local rank r on cuda:r,
    one process per GPU; a fixed cuda:N would put every rank on one GPU and is refused."""
    if world > 1 and spec.startswith("cuda:"):
        raise ValueError(f"--device {spec} under torchrun would put all {world} processes on one GPU; give "
                         f"--device cuda (rank r takes cuda:r)")
    return f"cuda:{local_rank}" if world > 1 and spec == "cuda" else spec


def plain_nfe(cfg: BenchConfig) -> int:
    """What the plain sampler spends: --steps, and with an ode:K lookahead the K - 1 further steps that
    finish its final sample to t = 0 (the sample it returns is then that end point, not x0_hat)."""
    return cfg.steps + search.lookahead_steps(cfg.lookahead) - 1


def plan(cfg: BenchConfig) -> tuple[list[Unit], list[str]]:
    """All units of the run, cheapest budget first (early tables of every method), and the skipped
    combinations with the reason."""
    differentiable = (cfg.reward_fn or R.get_reward(cfg.reward)).differentiable
    chunks = [list(range(lo, min(lo + cfg.batch, len(cfg.prompts)))) for lo in range(0, len(cfg.prompts), cfg.batch)]
    units, notes = [], []
    for method in cfg.methods:
        for dynamics in cfg.dynamics:
            if method in LINEAR_ODE_ONLY and dynamics != "linear-ode":
                notes.append(f"{method} {dynamics}: BoN and SoP are Linear-ODE methods in the paper (Table 1)")
                continue
            if method.endswith("dps") and not differentiable:
                notes.append(f"{method} {dynamics}: gradient guidance needs a differentiable reward "
                             f"(--reward learned-counter), {cfg.reward!r} is not")
                continue
            # the budget floor depends only on the method, its default knobs and num_steps
            dummy = search.Problem(velocity=lambda x, t, p: x, reward=lambda x, p: x.sum(1), shape=(1,),
                                   dynamics=dynamics, num_steps=cfg.steps, lookahead=cfg.lookahead)
            if method.endswith("dps") and cfg.lookahead != "tweedie":
                notes.append(f"{method} {dynamics}: gradient guidance does not run with lookahead {cfg.lookahead}")
                continue
            need = search.min_nfe(method, dummy, **knobs_of(cfg, method, cfg.steps))
            budgets = [plain_nfe(cfg)] if method == "none" else cfg.nfe
            for nfe in budgets:
                if nfe < need:
                    notes.append(f"{method} {dynamics} NFE {nfe}: below its minimum budget of {need} "
                                 f"(search.min_nfe with {cfg.steps} steps)")
                    continue
                units += [Unit(method, dynamics, nfe, seed, c, ids) for seed in range(cfg.seeds)
                          for c, ids in enumerate(chunks)]
    if "none" in cfg.methods:
        notes.append(f"none (the plain sampler) always runs with {plain_nfe(cfg)} NFE (--steps, and the lookahead's "
                     f"further steps of its final sample), whatever --nfe says")
    order = {m: i for i, m in enumerate(search.METHODS)}
    units.sort(key=lambda u: (u.nfe, order[u.method], search.ALL_DYNAMICS.index(u.dynamics), u.seed, u.chunk))
    return units, notes


def knobs_of(cfg: BenchConfig, method: str, nfe: int) -> dict:
    """The knobs of a method at budget nfe: --allocation / --threshold for RBF; DPS spends the budget as
    N = nfe // steps guided chains, the best by the given reward (claim 4 at equal NFE; the paper's
    single-chain DPS is its row at nfe = steps)."""
    if method in ("rbf", "rbf+dps"):
        return cfg.rbf_knobs
    return {"n": max(1, nfe // cfg.steps)} if method == "dps" else {}


def unit_keys(cfg: BenchConfig, unit: Unit) -> list[tuple[str, ...]]:
    return [(model_label(cfg), cfg.task, cfg.reward, str(cfg.steps), unit.method, unit.dynamics, str(unit.nfe),
             str(unit.seed), str(cfg.batch), str(i), cfg.prompts[i]) for i in unit.prompt_ids]


# -----------------------------------------------------------------------------------------------
# 2. The results file: whole rows only, read back with repair


def row_key(row: dict) -> tuple[str, ...]:
    return tuple(row[k] for k in KEY)


def read_rows(path: Path) -> list[dict]:
    """The rows of results.csv as dicts of strings, one per key (the first; a repeated key is a
    second run's copy). A last line without its newline (a process killed mid-write) is cut off the
    file, which is rewritten whole through a temporary file (ValueError, file unchanged, when that
    fails); a header other than COLUMNS is a ValueError."""
    if not path.is_file():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        try:
            flowscale.write_atomic(path, text)
        except OSError as e:
            raise ValueError(f"could not drop the half-written last line of {path} ({e.strerror or e}); the file "
                             f"is unchanged: free some space and run again") from None
        print(f"bench: dropped a half-written last line of {path}", file=sys.stderr)
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    if rows[0] != COLUMNS:
        raise ValueError(f"{path} has columns {rows[0]}, expected {COLUMNS}: written by another version? "
                         f"use a new --out")
    out, seen = [], set()
    for r in rows[1:]:
        if len(r) != len(COLUMNS):
            continue
        row = dict(zip(COLUMNS, r))
        if row_key(row) not in seen:
            seen.add(row_key(row))
            out.append(row)
    if len(out) < len(rows) - 1:
        print(f"bench: {path}: read {len(out)} rows, ignored {len(rows) - 1 - len(out)} repeated or broken ones",
              file=sys.stderr)
    return out


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows (with the header if the file is new) in ONE write, then flush and fsync."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if not path.is_file() or path.stat().st_size == 0:
        writer.writerow(COLUMNS)
    writer.writerows([[row[c] for c in COLUMNS] for row in rows])
    with open(path, "a", newline="") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())


# -----------------------------------------------------------------------------------------------
# 3. One unit = one generate call


@dataclass
class UnitOutput:
    unit: Unit
    rows: list[dict]
    image: torch.Tensor | None  # (3, H, W) of prompt_id 0, for the grid figure


def _num(x: float) -> str:
    return repr(float(x))


def run_unit(pipe: flowscale.Pipeline, cfg: BenchConfig, unit: Unit) -> UnitOutput:
    prompts = [cfg.prompts[i] for i in unit.prompt_ids]
    generation = flowscale.generate(pipe, prompts, method=unit.method, dynamics=unit.dynamics, nfe=unit.nfe,
                                    num_steps=cfg.steps, reward=cfg.reward_fn or cfg.reward,
                                    seed=flowscale.chunk_seed(unit.seed, unit.chunk), lookahead=cfg.lookahead,
                                    max_batch=cfg.max_batch, **knobs_of(cfg, unit.method, unit.nfe))
    rows = []
    for j, (key, i) in enumerate(zip(unit_keys(cfg, unit), unit.prompt_ids)):
        metrics = generation.metrics[j] if generation.metrics else {}
        rows.append(dict(zip(KEY, key)) | {
            "given_reward": _num(generation.reward[j]),
            "rss": _num(metrics["rss"]) if metrics else "", "accuracy": _num(metrics["accuracy"]) if metrics else "",
            "composition": _num(metrics["composition"]) if metrics else "",
            "fidelity": _num(metrics["fidelity"]) if metrics else "",
            "counter_accuracy": _num(metrics["counter_accuracy"]) if metrics else "",
            "nfe_used": str(generation.nfe_used[j]),
            "nfe_per_step": "|".join(str(int(s.nfe[j])) for s in generation.result.trace),
            "seconds": f"{generation.seconds / len(prompts):.3f}",
            "image_sha": image_sha(generation.images[j])})
    image = generation.images[unit.prompt_ids.index(0)] if 0 in unit.prompt_ids else None
    return UnitOutput(unit, rows, image)


def image_path(cfg: BenchConfig, method: str, dynamics: str, nfe: int, seed: int) -> Path:
    """The PNG of prompt 0 (cfg.prompts[0]) under one setting. Named by a hash of its row's key too, so
    another prompt 0, reward, --steps or --batch in the same --out never reads this image."""
    key = (cfg.task, cfg.reward, str(cfg.steps), method, dynamics, str(nfe), str(seed), str(cfg.batch), "0",
           cfg.prompts[0])
    tag = hashlib.sha1("\x1f".join(key).encode()).hexdigest()[:10]
    return cfg.out / "images" / f"{method}_{dynamics}_nfe{nfe}_seed{seed}_{tag}.png"


def read_png(path: Path) -> torch.Tensor | None:
    """A PNG written by flowscale.save_png as an image (3, H, W) in [0, 1]; None if missing or unreadable."""
    import matplotlib.pyplot as plt

    if not path.is_file():
        return None
    try:
        array = plt.imread(path)
    except Exception:  # PIL raises OSError, SyntaxError or ValueError for a truncated file
        return None
    if array.ndim != 3 or array.shape[2] < 3:
        return None
    return torch.from_numpy(array[:, :, :3].copy()).permute(2, 0, 1)  # (3, H, W)


def image_sha(image: torch.Tensor) -> str:
    """The image_sha column: sha1 of the image (3, H, W) in [0, 1] as 8-bit values (as the PNG stores it)."""
    image8 = (image * 255).round().to(torch.uint8)
    return hashlib.sha1(image8.numpy().tobytes()).hexdigest()[:12]


# -----------------------------------------------------------------------------------------------
# 4. Processes: one, or K under torchrun


@dataclass
class Dist:
    rank: int  # this process
    world: int  # number of processes (1 without torchrun)


def init_dist() -> Dist:
    """A gloo process group when launched by torchrun with more than one process, else nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1)
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))  # a round can be one long unit
    return Dist(dist.get_rank(), dist.get_world_size())


def gather(d: Dist, obj) -> list:
    """The objects of all ranks, on rank 0 (others get [])."""
    if d.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world if d.rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def execute(cfg: BenchConfig, pipe: flowscale.Pipeline, pending: list[Unit], done: set, d: Dist) -> int:
    """Run the pending units, K at a time (one per rank); rank 0 appends each round's rows."""
    bar = tqdm(total=sum(u.cost for u in pending), unit="NFE", desc="bench", dynamic_ncols=True,
               disable=d.rank != 0, file=sys.stderr)
    try:
        ran = _execute_rounds(cfg, pipe, pending, done, d, bar)
    finally:  # also when interrupted, so that the last message starts on a line of its own
        bar.close()
    return ran


def _execute_rounds(cfg: BenchConfig, pipe: flowscale.Pipeline, pending: list[Unit], done: set, d: Dist, bar) -> int:
    csv_path, ran = cfg.out / "results.csv", 0
    for lo in range(0, len(pending), d.world):
        mine = pending[lo + d.rank] if lo + d.rank < len(pending) else None
        if mine is not None:
            bar.set_postfix_str(f"{mine.method} {mine.dynamics} NFE {mine.nfe} seed {mine.seed} chunk {mine.chunk}")
        output = run_unit(pipe, cfg, mine) if mine is not None else None
        ran += mine is not None
        for out in gather(d, output):
            if out is None:
                continue
            if out.image is not None:  # the image first: a kill between the two leaves a row to redo
                u = out.unit
                flowscale.save_png(out.image, image_path(cfg, u.method, u.dynamics, u.nfe, u.seed), scale=1)
            new = [r for r in out.rows if row_key(r) not in done]
            if new:
                append_rows(csv_path, new)
            done.update(row_key(r) for r in new)
        bar.update(sum(u.cost for u in pending[lo:lo + d.world]))
    return ran


# -----------------------------------------------------------------------------------------------
# 5. Diversity of samples from one x_t (claim 2; the paper's LPIPS-MPD in Table 1 of v5)


@torch.no_grad()
def diversity(pipe: flowscale.Pipeline, prompts: list[str], *, steps: int, branch_step: int, samples: int,
              dynamics: tuple[str, ...] = ("linear-sde", "vp-sde"), seed: int = 0, max_batch: int = search.MAX_BATCH,
              counter: R.LearnedCounter | None = None) -> dict[str, dict[str, list[float]]]:
    """How far apart `samples` images branched from one x_t land, per prompt and dynamics: the mean
    pairwise L2 distance of the decoded x0 ("pixel"), and with a learned counter the mean pairwise
    squared distance of its unit-normalised feature maps ("features", LPIPS-style: on blurry images the
    pixel distance mostly measures blur, the features what was drawn).

    Per prompt, one trajectory starts from a seeded noise and follows the path's ODE (deterministic,
    so the branch point is one x_t) for `branch_step` steps of the exp grid; from there `samples`
    copies continue with the SDE of the dynamics (g = 3 t^2 on the sampled path, Eq. 9 / 12; the
    ablation dynamics with their grid and g) to x0_hat at t_{T-1}, as the searches return it. Every
    dynamics branches at the same grid index, as a search's proposals do; at that index the VP path is
    at a much lower SNR (index 3 of 10: VP time 0.954 is linear time 0.990), which is the paper's
    explanation of the diversity (Sec. 5), so the x_t are not the same point: each is its own path's
    state at step i."""
    cond = flowscale.encode_prompts(pipe, prompts)
    model_velocity = flowscale.make_velocity(pipe, cond)
    P, M = len(prompts), samples
    # the CPU draws the noise (the same on every device), the model's device runs the rest
    eps = torch.randn((P, *pipe.latent_shape), generator=torch.Generator().manual_seed(seed)).to(pipe.device)
    result = {"pixel": {}, "features": {}}
    for dyn in dynamics:
        problem = search.Problem(velocity=model_velocity, reward=lambda x, p: x.flatten(1).sum(1),
                                 shape=pipe.latent_shape, dynamics=dyn, num_steps=steps,
                                 time_shift=pipe.time_shift, device=pipe.device)
        ts = search.grid_times(problem).float().to(pipe.device)  # the searches' grid (FLUX.1-dev: shifted)
        gs = search.grid_diffusion(problem, ts)  # g of every step, as the searches take it

        def velocity(x, t, prompt):  # the sampled path's velocity (Eq. 11 for VP), max_batch latents a call
            out = []
            for lo in range(0, len(x), max_batch):
                rows = slice(lo, lo + max_batch)
                model = functools.partial(model_velocity, prompt=prompt[rows])
                if dyn == "vp-sde":
                    model = sde.convert_velocity(model, sde.LinearInterpolant(), problem.path)
                out.append(model(x[rows], t[rows]))
            return torch.cat(out)

        x, ids = eps.clone(), torch.arange(P, device=pipe.device)
        for i in range(branch_step):
            t = ts[i].expand(P)
            x = sde.euler_step(x, velocity(x, t, ids), t, ts[i + 1])
        x, ids = x.repeat_interleave(M, 0), ids.repeat_interleave(M)  # (P M, C, H, W): M copies of each x_t
        noise = torch.Generator(device=pipe.device).manual_seed(seed + 1)
        for i in range(branch_step, steps):
            t = ts[i].expand(P * M)
            u_t = velocity(x, t, ids)
            if i == steps - 1:
                x0_hat = sde.x0_hat_from_velocity(u_t, x, problem.path(t))
            else:
                x = sde.euler_maruyama_step(x, u_t, t, ts[i + 1], problem.path, lambda _, g_i=gs[i]: g_i,
                                            generator=noise)
        images = flowscale.decode(pipe, x0_hat).cpu()  # (P M, 3, H, W)
        flat = images.reshape(P, M, -1)  # (P, M, 3 H W)
        result["pixel"][dyn] = [float(torch.pdist(flat[p].double()).mean()) for p in range(P)]
        if counter is not None:
            with torch.no_grad():
                f = counter.unit_features(images).double()  # (P M, C, h, w), unit channel vectors
            f = (f / math.sqrt(f.shape[2] * f.shape[3])).reshape(P, M, -1)  # squared norms average the locations
            result["features"][dyn] = [float(torch.pdist(f[p]).pow(2).mean()) for p in range(P)]
    return result


def cached_diversity(cfg: BenchConfig, get_pipe) -> dict:
    """diversity(), stored in DIR/diversity.json and reused while its settings are unchanged."""
    # claim 2's pair always, and the ablation dynamics of v5 Table 1 when the run has them
    dynamics = [d for d in search.ALL_DYNAMICS
                if d != "linear-ode" and (d in ("linear-sde", "vp-sde") or d in cfg.dynamics)]
    settings = {"model": model_id(cfg), "prompts": cfg.prompts[:cfg.diversity_prompts], "steps": cfg.steps,
                "branch_step": cfg.diversity_step, "samples": cfg.diversity_samples, "seed": 0, "dynamics": dynamics}
    path = cfg.out / "diversity.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved["settings"] == settings:
                return saved
        except (ValueError, KeyError, TypeError) as e:  # a cache: a damaged one is measured again
            print(f"bench: {path} is damaged ({type(e).__name__}: {e}); measuring the diversity again", file=sys.stderr)
    pipe = get_pipe()
    measured = diversity(pipe, settings["prompts"], steps=cfg.steps, branch_step=cfg.diversity_step,
                         samples=cfg.diversity_samples, dynamics=tuple(dynamics), max_batch=cfg.max_batch,
                         counter=pipe.counter)
    saved = {"settings": settings, "distances": measured["pixel"], "feature_distances": measured["features"]}
    flowscale.write_atomic(path, json.dumps(saved, indent=2) + "\n")
    return saved


# -----------------------------------------------------------------------------------------------
# 6. Statistics, tables and the claims


@dataclass
class Stat:
    mean: float
    se: float  # standard error of the mean, std (ddof 1) / sqrt(n); nan for n = 1
    n: int

    def __str__(self) -> str:
        return "–" if math.isnan(self.mean) else f"{self.mean:.3f} ± {'–' if math.isnan(self.se) else f'{self.se:.3f}'}"


def mean_se(values: list[float]) -> Stat:
    v = np.array([x for x in values if not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return Stat(math.nan, math.nan, 0)
    return Stat(float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan, len(v))


METRICS = ("given_reward", "rss", "accuracy", "composition", "fidelity", "counter_accuracy", "nfe_used", "seconds")


@dataclass
class Summary:
    """Mean and standard error of every metric of one (method, dynamics, NFE) over prompts and seeds."""

    stats: dict[str, Stat]
    nfe_per_step: list[list[int]] = field(default_factory=list)  # one list per row


def _metric(row: dict, name: str) -> float:
    """A row's metric as a number; nan where the row has none (an empty CSV cell), which mean_se skips."""
    value = row[name]
    return math.nan if value == "" else float(value)


def summarize(rows: list[dict]) -> dict[tuple[str, str, int], Summary]:
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["dynamics"], int(r["nfe"])), []).append(r)
    return {k: Summary({m: mean_se([_metric(r, m) for r in g]) for m in METRICS},
                       [[int(s) for s in r["nfe_per_step"].split("|")] for r in g]) for k, g in groups.items()}


def reward_label(cfg: BenchConfig) -> str:
    labels = {"counting": "−RSS (counting)", "composition": "composition score", "learned-counter": "learned counter"}
    return labels.get(cfg.reward) or f"{cfg.reward_fn.name} (plugin)"


def _percent(value: Stat, base: Stat | None) -> str:
    if base is None or math.isnan(base.mean) or base.mean == 0 or math.isnan(value.mean):
        return ""
    return f" ({100 * (value.mean - base.mean) / abs(base.mean):+.1f}%)"


def by_setting(rows: list[dict]) -> dict[tuple[str, str, int], dict[tuple[int, int], dict]]:
    """The rows of every (method, dynamics, NFE), keyed by (prompt_id, seed): the pairs of a paired comparison."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["method"], r["dynamics"], int(r["nfe"])), {})[int(r["prompt_id"]), int(r["seed"])] = r
    return out


def paired(by: dict, a: tuple[str, str, int], b: tuple[str, str, int], metric: str = "given_reward") -> Stat:
    """Mean and standard error of metric(a) - metric(b) over the (prompt, seed) pairs that both settings
    ran: each prompt and seed is its own control, so the spread between prompts cancels."""
    ra, rb = by.get(a, {}), by.get(b, {})
    return mean_se([_metric(ra[k], metric) - _metric(rb[k], metric) for k in sorted(set(ra) & set(rb))])


def decision(d: Stat) -> str:
    """'yes' / 'no' when a paired difference d lies more than 2 standard errors above / below 0, else
    'inconclusive' (the rule fixed before any run: about a 5% two-sided test)."""
    if d.n < 2 or math.isnan(d.se):
        return "inconclusive"
    return "yes" if d.mean > 2 * d.se else "no" if d.mean < -2 * d.se else "inconclusive"


def verdict(d: Stat) -> str:
    """decision(d) with the numbers it rests on."""
    if d.n < 2 or math.isnan(d.se):
        return f"{decision(d)}: {d.mean:+.3f}, n = {d.n}"
    return f"{decision(d)}: {d.mean:+.3f} ± {d.se:.3f} (paired, n = {d.n})"


def _negated(a: Stat) -> Stat:
    return Stat(-a.mean, a.se, a.n)


def table1(cfg: BenchConfig, s: dict, nfe: int, methods: list[str]) -> list[str]:
    """Like the paper's Table 1: metrics as rows, method x dynamics as columns, % vs the same method's L.O."""
    cols = [(m, d, plain_nfe(cfg) if m == "none" else nfe) for m in methods for d in cfg.dynamics
            if (m, d, plain_nfe(cfg) if m == "none" else nfe) in s]
    if not cols:
        return []
    lines = ["| metric | " + " | ".join(f"{LABEL[m]} {ABBR[d]}" for m, d, _ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for metric, name in (("given_reward", f"{reward_label(cfg)} †"), ("rss", "RSS ↓"), ("accuracy", "accuracy ↑"),
                         ("composition", "composition ↑"), ("fidelity", "fidelity ↑"),
                         ("counter_accuracy", "learned-counter accuracy ↑")):
        cells = []
        for m, d, n in cols:
            base = s.get((m, "linear-ode", n)) if d != "linear-ode" else None
            cells.append(f"{s[m, d, n].stats[metric]}{_percent(s[m, d, n].stats[metric], base and base.stats[metric])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def table45(cfg: BenchConfig, s: dict) -> list[str]:
    """Like the paper's Tables 4-5: one line per method, dynamics and NFE."""
    lines = [f"| method | dynamics | NFE | {reward_label(cfg)} † | RSS ↓ | accuracy ↑ | composition ↑ | fidelity ↑ | "
             f"NFE used | s / prompt | n |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (m, d, n), v in sorted(s.items(), key=lambda kv: (search.METHODS.index(kv[0][0]),
                                                          search.ALL_DYNAMICS.index(kv[0][1]), kv[0][2])):
        st = v.stats
        lines.append(f"| {LABEL[m]} | {d} | {n} | {st['given_reward']} | {st['rss']} | {st['accuracy']} | "
                     f"{st['composition']} | {st['fidelity']} | {st['nfe_used'].mean:.1f} | {st['seconds'].mean:.2f} | {st['given_reward'].n} |")
    return lines


def claims(cfg: BenchConfig, s: dict, rows: list[dict], div: dict) -> list[str]:
    """One verdict per claim of the paper, each from paired differences over (prompt, seed) (n/a where a
    run is missing); `s` (the means) only picks the strongest rival of claim 3."""
    by, top, out = by_setting(rows), max(cfg.nfe), []

    def ran(*settings) -> bool:
        return all(k in by for k in settings)

    out.append(f"1. SDE conversion beats the same method's Linear-ODE (given reward, NFE {top}):")
    out += [f"   - {LABEL[m]} {ABBR[d]} vs L.O.: {verdict(paired(by, (m, d, top), (m, 'linear-ode', top)))}"
            for m in PARTICLE_METHODS for d in ("linear-sde", "vp-sde") if ran((m, d, top), (m, "linear-ode", top))]
    out.append(f"2. VP-SDE beats Linear-SDE (given reward, NFE {top}), and is more diverse from one x_t:")
    out += [f"   - {LABEL[m]} V.S. vs L.S.: {verdict(paired(by, (m, 'vp-sde', top), (m, 'linear-sde', top)))}"
            for m in PARTICLE_METHODS if ran((m, "vp-sde", top), (m, "linear-sde", top))]
    for key, name in (("distances", "mean pairwise L2"), ("feature_distances", "learned-counter features")):
        dist = div.get(key, {})
        if "vp-sde" in dist and "linear-sde" in dist:  # paired over the prompts (one branch point each)
            d = mean_se([v - l for v, l in zip(dist["vp-sde"], dist["linear-sde"])])
            out.append(f"   - diversity V.S. vs L.S. ({name}, per prompt): {verdict(d)}")
    out.append("3. RBF on VP-SDE is the best method at equal NFE, and keeps improving where BoN plateaus:")
    for n in cfg.nfe:
        rivals = [(m, d, n) for m in cfg.methods for d in cfg.dynamics
                  if m not in ("none", "rbf+dps") and (m, d) != ("rbf", "vp-sde") and (m, d, n) in s]
        if ran(("rbf", "vp-sde", n)) and rivals:
            m, d, _ = max(rivals, key=lambda k: s[k].stats["given_reward"].mean)
            out.append(f"   - NFE {n}: RBF V.S. vs the best other by mean ({LABEL[m]} {ABBR[d]}): "
                       f"{verdict(paired(by, ('rbf', 'vp-sde', n), (m, d, n)))}")
    for m, d in (("rbf", "vp-sde"), ("bon", "linear-ode")):
        curve = [n for n in cfg.nfe if ran((m, d, n))]
        if len(curve) >= 2:
            out.append(f"   - {LABEL[m]} {ABBR[d]} from NFE {curve[-2]} to {curve[-1]}: improves? "
                       f"{verdict(paired(by, (m, d, curve[-1]), (m, d, curve[-2])))}; curve "
                       + ", ".join(f"{n}: {s[m, d, n].stats['given_reward'].mean:.3f}" for n in curve))
    guided = [d for d in cfg.dynamics if ran(*[(m, d, top) for m in ("rbf+dps", "dps", "svdd+dps")])]
    if guided:
        d = "vp-sde" if "vp-sde" in guided else guided[0]
        out.append(f"4. RBF+DPS beats DPS and SVDD+DPS ({ABBR[d]}, NFE {top}), on the given and the held-out exact metrics:")
        for metric, name in (("given_reward", "given reward"), ("accuracy", "held-out accuracy"), ("rss", "held-out −RSS")):
            for m in ("dps", "svdd+dps"):
                diff = paired(by, ("rbf+dps", d, top), (m, d, top), metric)
                out.append(f"   - {name}, RBF+DPS vs {LABEL[m]}: {verdict(_negated(diff) if metric == 'rss' else diff)}")
    else:
        out.append("4. RBF+DPS vs DPS and SVDD+DPS: n/a (run with --reward learned-counter "
                   "--methods dps,svdd+dps,rbf+dps)")
    return out


# -----------------------------------------------------------------------------------------------
# 7. Figures and the report


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """fig as a PNG at path, through a temporary file and a rename (never half-written)."""
    tmp = flowscale.temporary_path(path)
    try:
        fig.savefig(tmp, dpi=100, format="png")
        flowscale.finish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        _plt().close(fig)


def plot_reward_vs_nfe(cfg: BenchConfig, s: dict, path: Path) -> None:
    plt = _plt()
    panels = [("given_reward", f"{reward_label(cfg)} † (given)"), ("accuracy", "counting accuracy (RSS = 0)"),
              ("composition", "composition score")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = {m: plt.cm.tab10(i) for i, m in enumerate(search.METHODS)}
    styles = {"linear-ode": ":", "linear-sde": "--", "vp-sde": "-", "linear-sde+time": "-.",
              "linear-sde+diffusion": (0, (1, 3))}
    for ax, (metric, title) in zip(axes, panels):
        for m in cfg.methods:
            for d in cfg.dynamics:
                pts = sorted((n, v.stats[metric]) for (m_, d_, n), v in s.items() if (m_, d_) == (m, d))
                if m == "none" and pts:
                    ax.axhline(pts[0][1].mean, color="grey", ls=styles[d], lw=1, label=f"plain {ABBR[d]} ({plain_nfe(cfg)} NFE)")
                elif pts:
                    ax.errorbar([n for n, _ in pts], [v.mean for _, v in pts], yerr=[0 if math.isnan(v.se) else v.se for _, v in pts],
                                color=colours[m], ls=styles[d], marker="o", ms=3, capsize=2, label=f"{LABEL[m]} {ABBR[d]}")
        ax.set_xscale("log")
        ax.set_xticks(cfg.nfe, [str(n) for n in cfg.nfe])
        ax.minorticks_off()
        ax.set_xlabel("NFE per prompt (log scale)")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("mean ± se over prompts and seeds")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"reward vs NFE, task {cfg.task}, {len(cfg.prompts)} prompts x {cfg.seeds} seeds")
    fig.tight_layout()
    _save(fig, path)


def plot_diversity(div: dict, path: Path) -> None:
    plt = _plt()
    labels = {"distances": "mean pairwise L2 of decoded x0",
              "feature_distances": "learned-counter features (LPIPS-style)"}
    panels = [(k, label) for k, label in labels.items() if div.get(k)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        names = list(div[key])
        stats = [mean_se(div[key][k]) for k in names]
        ax.bar([ABBR[k] for k in names], [v.mean for v in stats], yerr=[0 if math.isnan(v.se) else v.se for v in stats],
               color=[DYNAMICS_COLOUR[k] for k in names], capsize=4)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelsize=8)
    st = div["settings"]
    fig.suptitle(f"diversity from one x_t (step {st['branch_step']} of {st['steps']}, {st['samples']} samples, "
                 f"{len(st['prompts'])} prompts)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_rbf_steps(cfg: BenchConfig, s: dict, path: Path) -> bool:
    """Mean NFE per grid index of RBF at the largest budget (the paper's Fig. 9 motivation). False if no RBF ran."""
    runs = {(m, d): s[m, d, max(cfg.nfe)] for m in ("rbf", "rbf+dps") for d in cfg.dynamics if (m, d, max(cfg.nfe)) in s}
    if not runs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(runs)
    for j, ((m, d), v) in enumerate(runs.items()):
        per_step = np.array(v.nfe_per_step, dtype=float)  # (rows, T)
        x = np.arange(per_step.shape[1]) + (j - (len(runs) - 1) / 2) * width
        ax.bar(x, per_step.mean(0), width, yerr=per_step.std(0), capsize=2, label=f"{LABEL[m]} {ABBR[d]}")
    uniform = (max(cfg.nfe) - per_step[:, 0].mean()) / (cfg.steps - 1)
    ax.axhline(uniform, color="k", ls="--", lw=1, label="uniform allocation")
    ax.set_xlabel("grid index i of the candidates (0 = initial noises)")
    ax.set_ylabel("NFE spent (mean ± std)")
    ax.set_title(f"RBF: NFE per denoising step at {max(cfg.nfe)} NFE per prompt", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_grid(cfg: BenchConfig, rows: list[dict], path: Path) -> None:
    """Prompt 0 under every method (columns) and dynamics (rows), largest budget, first seed."""
    reward_of = {(r["method"], r["dynamics"]): float(r["given_reward"]) for r in rows
                 if r["prompt"] == cfg.prompts[0] and r["prompt_id"] == "0" and r["seed"] == "0"
                 and int(r["nfe"]) == (plain_nfe(cfg) if r["method"] == "none" else max(cfg.nfe))}
    images, captions = [], []
    for d in cfg.dynamics:
        images.append([]), captions.append([])
        for m in cfg.methods:
            image = read_png(image_path(cfg, m, d, plain_nfe(cfg) if m == "none" else max(cfg.nfe), 0))
            if (m, d) in reward_of and image is not None:
                images[-1].append(image)
                captions[-1].append(f"reward {reward_of[m, d]:.2f}")
            else:
                images[-1].append(torch.full((3, 8, 8), 0.85))
                captions[-1].append("not run")
    flowscale.save_grid(cfg.dynamics, [LABEL[m] for m in cfg.methods], images, captions, path,
                title=f"\"{cfg.prompts[0]}\" at {max(cfg.nfe)} NFE (plain: {cfg.steps})")


def model_name(cfg: BenchConfig) -> str:
    return str(Path(cfg.model).resolve() if cfg.model else flowscale.DEFAULT_MODEL)


def model_label(cfg: BenchConfig) -> str:
    """The model column of results.csv: the model folder's name (mini-flux-schnell, mini-flux-dev, ...)."""
    return Path(model_name(cfg)).name


def model_id(cfg: BenchConfig) -> str:
    """The model a folder's results belong to, wherever the checkout lies: its folder name and a
    fingerprint of its transformer's weights, so that retrained weights under the same name are another
    model. The fingerprint reads each weight file's name, size, first and last MiB (a real FLUX.1
    file is 24 GB: hashing all of it would take minutes); retraining changes those bytes."""
    h = hashlib.sha256()
    for f in sorted(Path(model_name(cfg)).glob("transformer/*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(2**20)
            fh.seek(max(size - 2**20, 0))
            h.update(f"{f.name}:{size}:".encode() + head + fh.read())
    return f"{model_label(cfg)}@{h.hexdigest()[:16]}"


def write_report(cfg: BenchConfig, rows: list[dict], notes: list[str], div: dict) -> None:
    s = summarize(rows)
    top = max(cfg.nfe)
    plot_reward_vs_nfe(cfg, s, cfg.out / "reward_vs_nfe.png")
    plot_diversity(div, cfg.out / "diversity.png")
    has_rbf = plot_rbf_steps(cfg, s, cfg.out / "rbf_nfe_per_step.png")
    plot_grid(cfg, rows, cfg.out / "grid.png")
    md = [f"# flowscale bench: task {cfg.task}, given reward {cfg.reward}", "",
          f"Model `{model_name(cfg)}`, {len(cfg.prompts)} prompts x {cfg.seeds} seeds, {cfg.steps} steps, "
          f"NFE {', '.join(map(str, cfg.nfe))}. Command: `{' '.join(shlex.quote(a) for a in sys.argv)}`.",
          "Cells: mean ± standard error over prompts and seeds; † = the reward the search maximises; RSS, accuracy "
          "(RSS = 0) and composition come from the exact shape-world detector, held out unless they are the given "
          "reward. % = change vs the same method's Linear-ODE (L.O.); L.S. = Linear-SDE, V.S. = VP-SDE.", "",
          f"## Table 1 layout: every method at {top} NFE (plain = the plain sampler, method none, {cfg.steps} NFE)", "",
          *table1(cfg, s, top, [m for m in cfg.methods if m not in PARTICLE_METHODS]), "",
          *table1(cfg, s, top, [m for m in cfg.methods if m in PARTICLE_METHODS]), "",
          "## Tables 4-5 layout: every budget", "", *table45(cfg, s), "",
          "## Diversity from one x_t (claim 2)", "",
          f"Per prompt (the first {len(div['settings']['prompts'])}) and dynamics, one ODE trajectory of that "
          f"path to grid index {div['settings']['branch_step']} of {cfg.steps}, then {div['settings']['samples']} "
          f"SDE samples from there; mean pairwise L2 distance of their decoded x0 (images in [0, 1], "
          f"mean ± se over prompts), and the mean pairwise squared distance of the learned counter's "
          f"unit-normalised feature maps (a perceptual-style distance; shape world only). The paper measures "
          f"LPIPS-MPD (v5 Table 1).", "",
          "| dynamics | mean pairwise L2 of the images | learned-counter features (LPIPS-style) |", "|---|---|---|",
          *[f"| {d} | {mean_se(v)} | {mean_se(div.get('feature_distances', {}).get(d, []))} |"
            for d, v in div["distances"].items()], ""]
    if has_rbf:
        md += ["## RBF: NFE spent per grid index (mean over prompts and seeds)", "",
               "| method | dynamics | NFE | per grid index 0, 1, ... |", "|---|---|---|---|"]
        md += [f"| {LABEL[m]} | {d} | {n} | " + ", ".join(f"{x:.1f}" for x in np.mean(v.nfe_per_step, 0)) + " |"
               for (m, d, n), v in sorted(s.items()) if m in ("rbf", "rbf+dps")] + [""]
    md += ["## Claims", "", "Every comparison is a paired difference over the (prompt, seed) pairs both settings ran "
           "(mean ± standard error); 'yes' / 'no' when it lies more than 2 standard errors above / below 0, else "
           "'inconclusive'.", "", *claims(cfg, s, rows, div), "", "## Skipped", "", *[f"- {n}" for n in notes], "",
           "## Figures", "", "![reward vs NFE](reward_vs_nfe.png)", "", "![diversity](diversity.png)", ""]
    md += ["![RBF NFE per step](rbf_nfe_per_step.png)", ""] if has_rbf else []
    md += ["![one prompt across methods](grid.png)", ""]
    flowscale.write_atomic(cfg.out / "results.md", "\n".join(md))


# -----------------------------------------------------------------------------------------------
# 8. Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python flowscale.py bench` (defaults in brackets: full run / --quick)."""
    parser.add_argument("--task", default="counting", help="counting | composition: prompt kind and given reward")
    parser.add_argument("--reward", default=None, help="given reward: the task's, or learned-counter (claim 4), or "
                                                       "your own: module:NAME | path/to/file.py:NAME")
    parser.add_argument("--methods", default=None, help="comma list of " + ", ".join(search.METHODS) +
                        " [none,bon,sop,smc,code,svdd,rbf; learned-counter: none,dps,svdd+dps,rbf+dps]")
    parser.add_argument("--dynamics", default=",".join(search.DYNAMICS),
                        help="comma list of " + ", ".join(search.ALL_DYNAMICS) +
                             " (the last two: v5 Table 1's ablation)")
    parser.add_argument("--nfe", default=None, help="comma list of NFE budgets per prompt [50,100,200,500 / 50,100]")
    parser.add_argument("--prompts", default=None, help="N held-out prompts of the task, or a file [16 / 4]")
    parser.add_argument("--prompt-seed", type=int, default=0, help="which N held-out prompts")
    parser.add_argument("--split", default="heldout", help="heldout | hard: the split --prompts N draws from "
                                                           "(hard: >= 3 groups or >= 7 objects)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..K-1 per prompt [1 / 1]")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--batch", type=int, default=16, help="prompts per generate call (fixed chunks)")
    parser.add_argument("--diversity-samples", type=int, default=None, help="samples from one x_t [16 / 8]")
    parser.add_argument("--diversity-prompts", type=int, default=None, help="prompts for diversity [4 / 2]")
    parser.add_argument("--quick", action="store_true", help="a small setting that runs in a few minutes")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded weights/mini-flux-schnell)")
    parser.add_argument("--height", type=int, default=1024, help="image height (real FLUX.1 only)")
    parser.add_argument("--width", type=int, default=1024, help="image width (real FLUX.1 only)")
    parser.add_argument("--out", default="out/bench", help="output folder; an existing one is resumed")
    flowscale.add_search_arguments(parser)
    flowscale.add_device_arguments(parser)


def lock(out: Path):
    """Take DIR/bench.lock (an flock, released when the process ends, however it ends) and write the
    holder into it; ValueError naming the holder if another run has it. Returns the open lock file."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / "bench.lock", "a+")
    except OSError as e:
        raise ValueError(f"cannot write to the output folder {out}: {e.strerror or e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{out} is in use by another bench run ({holder}); wait for it to finish, or use "
                         f"another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}: "
            f"{' '.join(shlex.quote(a) for a in sys.argv)}\n")
    f.flush()
    return f


def read_meta(meta: Path) -> dict | None:
    """DIR/bench.json (the model the folder's results belong to), None if there is none yet."""
    if not meta.is_file():
        return None
    try:
        saved = json.loads(meta.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("model"), str):
            raise ValueError("no model name in it")
    except ValueError as e:
        raise ValueError(f"{meta} is damaged ({e}); it names the model of the results in {meta.parent}: if they "
                         f"are this model's, delete {meta.name} and run again, else use another --out") from None
    return saved


def pending_units(cfg: BenchConfig, units: list[Unit]) -> list[Unit]:
    """The units with a row missing from DIR/results.csv, or whose image (prompt 0) is missing or
    does not read back as the image of its row (ValueError if DIR belongs to another model)."""
    meta = cfg.out / "bench.json"
    saved = read_meta(meta)
    if saved is not None and saved["model"] != model_id(cfg):
        raise ValueError(f"{cfg.out} holds results of the model {saved['model']}; use another --out for "
                         f"{model_id(cfg)}")
    # the rows do not name these settings: a folder holds the results of one of them only
    settings = {"lookahead": cfg.lookahead} | cfg.rbf_knobs
    old = saved.get("settings", {"lookahead": "tweedie"}) if saved is not None else settings
    if old != settings:
        raise ValueError(f"{cfg.out} holds results with {old}; use another --out for {settings}")
    (cfg.out / "images").mkdir(parents=True, exist_ok=True)
    if saved is None:
        flowscale.write_atomic(meta, json.dumps({"model": model_id(cfg), "settings": settings}) + "\n")
    rows = {row_key(r): r for r in read_rows(cfg.out / "results.csv")}
    pending = []
    for u in units:
        keys = unit_keys(cfg, u)
        if not all(k in rows for k in keys):
            pending.append(u)
        elif 0 in u.prompt_ids:
            file = image_path(cfg, u.method, u.dynamics, u.nfe, u.seed)
            image = read_png(file)
            if image is None or image_sha(image) != rows[keys[u.prompt_ids.index(0)]]["image_sha"]:
                print(f"bench: {file} is missing or damaged; running its unit again", file=sys.stderr)
                pending.append(u)
    return pending


def cmd_bench(args) -> None:
    """Plan, resume, run the pending units (sharded under torchrun), then rank 0 writes the report."""
    cfg = config_from_args(args)
    units, notes = plan(cfg)
    if not units:
        raise ValueError("nothing to run: " + "; ".join(notes))
    d = init_dist()
    pending, error, held = [], None, None
    if d.rank == 0:  # the only reader and writer of DIR; the other ranks get its plan
        try:
            held = lock(cfg.out)
            pending = pending_units(cfg, units)
        except ValueError as e:
            error = str(e)
    if d.world > 1:
        import torch.distributed as dist

        box = [(pending, error)]
        dist.broadcast_object_list(box, src=0)
        pending, error = box[0]
    if error is not None:
        if held is not None:
            held.close()
        raise ValueError(error)
    try:
        _run_locked(cfg, d, units, pending, notes)
    finally:
        if held is not None:
            held.close()  # releases the flock


def _run_locked(cfg: BenchConfig, d: Dist, units: list[Unit], pending: list[Unit], notes: list[str]) -> None:
    if d.rank == 0:
        print(f"bench: {len(units)} units planned, {len(units) - len(pending)} already in {cfg.out / 'results.csv'}, "
              f"{len(pending)} to run on {d.world} process(es)", file=sys.stderr)
    pipe = None

    def get_pipe():
        nonlocal pipe
        if pipe is None:
            device = cfg.placement["device"]
            if device.type == "cuda":  # this rank's GPU is also the default one (library kernels)
                torch.cuda.set_device(device)
            pipe = flowscale.load_pipeline(cfg.model, height=cfg.height, width=cfg.width, **cfg.placement)
            if cfg.reward_fn is None and device.type != "cpu":  # the learned counter runs beside the model
                cfg.reward_fn = flowscale.load_reward(cfg.reward, device=device)
            # every rank fails alike on a bad prompt, before any gather
            flowscale.check_prompts(pipe, flowscale.normalise_prompts(pipe, cfg.prompts))
        return pipe

    done = {row_key(r) for r in read_rows(cfg.out / "results.csv")} if d.rank == 0 else set()
    ran = execute(cfg, get_pipe(), pending, done, d) if pending else 0
    print(f"bench: rank {d.rank}/{d.world} ran {ran} units", file=sys.stderr)
    if d.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if d.rank != 0:
        return
    planned = {k for u in units for k in unit_keys(cfg, u)}
    rows = [r for r in read_rows(cfg.out / "results.csv") if row_key(r) in planned]
    write_report(cfg, rows, notes, cached_diversity(cfg, get_pipe))
    print(f"bench: wrote {cfg.out / 'results.md'} ({len(rows)} rows)", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowscale.py bench", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python flowscale.py bench ...` and `python experiments.py ...`: exit code 2 with one line on bad
    input, 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    try:
        cmd_bench(args)
    except ValueError as e:
        print(f"flowscale bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nflowscale bench: interrupted; the rows written so far are kept in {args.out}/results.csv; run the "
              f"same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
