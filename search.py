"""
Inference-time search for flow models: the paper's idea 3 (Rollover Budget Forcing) and every baseline.

Kim, Yoon, Hwang, Sung 2025, "Inference-Time Scaling for Flow Models via Stochastic Generation and
Rollover Budget Forcing", arXiv 2503.19385. Section / equation numbers are those of the v5 paper;
"official code" is github.com/KAIST-Visual-AI-Group/Flow-Inference-Time-Scaling.

Every algorithm is a free function with one signature,

    fn(problem, nfe, *, generator, callback=None, **knobs) -> SearchResult

over one `Problem` (model velocity, reward, dynamics) and one budget: `nfe` velocity evaluations of one
latent (NFE) for each prompt. Methods, with the paper's App. D sizes at 500 NFE / 10 steps:

    none      the plain sampler: one sample, num_steps NFE
    bon       Best-of-N: N = nfe // num_steps full samples, keep the best final reward
    sop       Search over Paths (Ma et al. 2025): N = 2, K = 5, forward-noise by delta_f, ODE back by delta_b
    smc       Sequential Monte Carlo (DAS, Kim et al. 2025; Eq. 27): N = nfe // num_steps weighted particles
    code      CoDe (Singh et al. 2025): N = 2 chains, K children, argmax every L = 2 steps
    svdd      SVDD-PM (Li et al. 2024): N = 2 chains, K children, argmax every step (beta = 0)
    rbf       Rollover Budget Forcing (Alg. 2): N = 2 chains, per-step quota, unused NFE roll over;
              allocation="uniform" (fixed quota, the ablation) or "threshold" (advance at a reward level);
              rbf_reference is the same algorithm written one chain at a time, next to Alg. 2
    dps       gradient guidance with the tilted score of Eq. 30 (Chung et al. 2023); also svdd+dps, rbf+dps

What all of them share (Sec. 3, 4):
  * Dynamics, one switch (Sec. 4.2-4.3, Table 1): "linear-ode" (FLUX's own ODE), "linear-sde" (the
    reverse SDE of Eq. 7 with g = 3 t^2 on the linear path), "vp-sde" (the model converted to the VP
    path by Eq. 11, then the SDE of Eq. 12). Times and g are those of the path being sampled. For v5
    Table 1's ablation, "linear-sde+time" (the Linear-SDE at the linear times the VP-SDE visits) and
    "linear-sde+diffusion" (the Linear-SDE with g scaled as the VP conversion scales it), Sec. 5.
  * A time grid t_0 = 1 > ... > t_T = 0 (default the `exp` grid of App. C). A particle at grid index i
    costs one NFE there: its velocity u_t gives Tweedie's x0_hat (sde.x0_hat_from_velocity), whose reward
    is the particle's value (Eq. 19), and the proposal step to t_{i+1} (Eq. 9 / 12).
  * The velocity is never evaluated at t_T = 0: the returned sample is x0_hat at t_{T-1}, as in the
    official code (the last Euler-Maruyama step would only add noise). For the linear ODE that is
    exactly the Euler step to t = 0.
  * Lookahead, one switch (Problem.lookahead): "tweedie" scores x0_hat (Eq. 19, the paper); "ode:K"
    scores the end point of K Euler steps of the model's own linear ODE from the particle to t = 0,
    and that end point replaces x0_hat everywhere (also as the returned sample). Its first step is
    the particle's own model call (one Euler step of the linear ODE to 0 is Tweedie's x0_hat), so a
    scored particle costs K - 1 extra NFE, counted in the budget; the sizes derived from the budget
    account for it. Not with gradient guidance (the DPS gradient is that of r(x0_hat), Eq. 30).
  * Every velocity evaluation goes through `_evaluate` (public as `evaluate`), which counts NFE per prompt
    and refuses to exceed the budget (RuntimeError: that would be a bug here). Reward rows and backward
    rows are counted apart, and the wall seconds of velocity calls, reward calls and everything else
    (SearchResult.seconds), so that methods can be compared at equal wall-clock too.
  * P prompts are searched at once: particles are laid out prompt-major, (P, n) -> (P * n, ...), and
    share velocity calls of at most `max_batch` rows; selection, weights and budget are per prompt.
    All randomness of prompt p comes from its own generator, seeded from `generator` in order, so
    prompt 0 of a batch is the same search as prompt 0 alone.

Where this file follows the official code rather than the paper, or neither, the comment says so.

References:
  [1] Kim et al. 2025, arXiv 2503.19385 (Alg. 2, Eqs. 3-4, 7-12, 19, 27, 30, App. D)
  [2] Ma et al. 2025, "Inference-time scaling for diffusion models beyond scaling denoising steps" (SoP)
  [3] Kim, Kim, Park 2025, "Test-time alignment of diffusion models without reward over-optimization" (DAS, SMC)
  [4] Singhal et al. 2025, "A general framework for inference-time scaling and steering" (FK steering, SMC)
  [5] Li et al. 2024, "Derivative-free guidance in continuous and discrete diffusion models" (SVDD)
  [6] Singh et al. 2025, "Code: blockwise control for denoising diffusion models" (CoDe)
  [7] Chung et al. 2023, "Diffusion posterior sampling for general noisy inverse problems" (DPS)
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

import sde

DYNAMICS = ("linear-ode", "linear-sde", "vp-sde")
# v5 Table 1's ablation: a Linear-SDE with one half of the VP conversion (sde.vp_conversion_halves),
# the SNR-matched times only ("+time") or the diffusion scaling only ("+diffusion")
ABLATION_DYNAMICS = ("linear-sde+time", "linear-sde+diffusion")
ALL_DYNAMICS = DYNAMICS + ABLATION_DYNAMICS
METHODS = ("none", "bon", "sop", "smc", "code", "svdd", "rbf", "dps", "svdd+dps", "rbf+dps")  # "none": plain sampler
DPS_METHODS = ("dps", "svdd+dps", "rbf+dps")  # the methods with gradient guidance (need a differentiable reward)
ALLOCATIONS = ("rollover", "uniform", "threshold")  # how rbf spends its budget over the steps
MAX_BATCH = 64  # default cap on rows per velocity / reward call (activation memory); every default is this one
DPS_BETA = 0.1  # default reward temperature of the guided methods, as App. F.2 (guidance strength 1 / beta)

# -----------------------------------------------------------------------------------------------
# 1. The problem, the result, the counters


@dataclass
class Problem:
    """One search problem: a flow model, a reward and the dynamics to sample with (shared by every method).
    Three groups of fields: the model and the reward; the sampler (Sec. 4, App. C); where and how it runs."""

    # --- the model and the reward
    # u = velocity(x (B, *shape), t (B,), prompt (B,) long) of the MODEL's own linear path; one row = one NFE
    velocity: Callable[[Tensor, Tensor, Tensor], Tensor]
    # r = reward(x0 (B, *shape), prompt (B,)) -> (B,), higher is better; decoding latents is the caller's business
    reward: Callable[[Tensor, Tensor], Tensor]
    shape: tuple[int, ...]  # shape of one latent, e.g. (2,) or (L, C)
    num_prompts: int = 1  # P: independent searches run together, each with its own budget
    reward_name: str = "reward"  # names the reward in error messages
    differentiable: bool = False  # the reward can be back-propagated (needed by the dps methods)
    # --- the sampler: the dynamics, its grid and diffusion, and how a particle is valued
    dynamics: str = "vp-sde"  # "linear-ode" | "linear-sde" | "vp-sde" (Sec. 4, Table 1), or an ABLATION_DYNAMICS
    num_steps: int = 10  # T denoising steps (paper: 10)
    time_grid: str = "exp"  # "exp" (App. C, official code) or "uniform", in the time of the sampled path
    # FLUX's resolution shift t -> s t / (1 + (s - 1) t) of the grid (sde.time_grid), None = unshifted.
    # FLUX.1-dev is sampled shifted by BFL (sde.flux_shift of its token count); schnell and the embedded
    # models are not. Search over Paths keeps its own fixed schedule (t_start, delta_f, delta_b).
    time_shift: float | None = None
    diffusion: str = "square"  # shape of g(t), an sde.DiffusionCoefficient kind (SDE dynamics only)
    diffusion_norm: float = 3.0  # scale of g(t): "square" with 3.0 is the paper's g = 3 t^2 (App. F.1)
    lookahead: str = "tweedie"  # value of a particle: "tweedie" (Eq. 19) or "ode:K" (K Euler steps to t = 0)
    # --- where and how it runs (no effect on the result beyond rounding)
    max_batch: int = MAX_BATCH  # at most this many rows per velocity / reward call (memory)
    dtype: torch.dtype = torch.float32  # dtype of the particles
    # device of the particles, their noise (drawn by generators on this device) and the search's
    # bookkeeping; the NFE counters stay on the CPU (they follow from the layout, not from device data)
    device: str | torch.device = "cpu"
    path: sde.Interpolant = field(init=False, repr=False)  # derived: linear or VP path that is sampled
    g: sde.DiffusionCoefficient | None = field(init=False, repr=False)  # derived: None for the ODE
    lookahead_nfe: int = field(init=False, repr=False)  # derived: extra NFE per scored particle (K - 1, or 0)

    def __post_init__(self):
        if not callable(self.velocity) or not callable(self.reward):
            raise ValueError("Problem.velocity and Problem.reward must be callables")
        if not (isinstance(self.shape, tuple) and self.shape and all(isinstance(s, int) and s > 0 for s in self.shape)):
            raise ValueError(f"Problem.shape must be a non-empty tuple of positive ints, got {self.shape!r}")
        for name in ("num_prompts", "max_batch"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"Problem.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not (isinstance(self.num_steps, int) and self.num_steps >= 2):
            raise ValueError(f"Problem.num_steps must be an int >= 2 (a search needs a step to search over), "
                             f"got {self.num_steps!r}")
        if self.dynamics not in ALL_DYNAMICS:
            raise ValueError(f"Problem.dynamics must be one of {ALL_DYNAMICS}, got {self.dynamics!r}")
        if self.time_grid not in ("exp", "uniform"):
            raise ValueError(f"Problem.time_grid must be 'exp' or 'uniform', got {self.time_grid!r}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"Problem.dtype must be a floating dtype, got {self.dtype}")
        if self.time_shift is not None and not (isinstance(self.time_shift, (int, float)) and
                                                math.isfinite(self.time_shift) and self.time_shift > 0):
            raise ValueError(f"Problem.time_shift must be None or a finite number > 0, got {self.time_shift!r}")
        self.path = sde.VPInterpolant() if self.dynamics == "vp-sde" else sde.LinearInterpolant()
        try:
            g = sde.DiffusionCoefficient(self.diffusion, self.diffusion_norm, interpolant=self.path)
        except ValueError as err:
            raise ValueError(f"Problem.diffusion / Problem.diffusion_norm: {err}") from None
        self.g = None if self.dynamics == "linear-ode" else g
        self.lookahead_nfe = lookahead_steps(self.lookahead) - 1


def lookahead_steps(lookahead: str) -> int:
    """Euler steps to t = 0 of a lookahead spec: "tweedie" is 1 (x0_hat itself), "ode:K" is K >= 1."""
    if lookahead == "tweedie":
        return 1
    k = lookahead.removeprefix("ode:") if isinstance(lookahead, str) and lookahead.startswith("ode:") else ""
    if not (k.isdigit() and int(k) >= 1):
        raise ValueError(f"lookahead must be 'tweedie' or 'ode:K' with an integer K >= 1 (e.g. 'ode:4'), "
                         f"got {lookahead!r}")
    return int(k)


@dataclass
class StepInfo:
    """One entry of a search's trace (and the argument of `callback`)."""

    step: int  # grid index i of the particles evaluated in this step (0 = the noise at t = 1); sop: the round
    t: float  # their time t_i on the sampled path
    nfe: Tensor  # (P,) NFE spent in this step, per prompt
    best_reward: Tensor  # (P,) best reward of any x0_hat scored so far (-inf before the first reward)
    ess: Tensor | None = None  # (P,) effective sample size before resampling (smc only)


@dataclass
class SearchResult:
    """The outcome of one search over P prompts."""

    x0: Tensor  # (P, *shape) best sample per prompt: x0_hat at the last evaluated step
    reward: Tensor  # (P,) its reward
    nfe_used: Tensor  # (P,) long, velocity evaluations spent
    reward_calls: Tensor  # (P,) long, rows scored by the reward
    backward_calls: Tensor  # (P,) long, rows back-propagated through velocity and reward (dps)
    particles: Tensor  # (P, n, *shape) final x0_hat of every chain / particle
    particle_rewards: Tensor  # (P, n) their rewards
    log_weights: Tensor | None  # (P, n) normalised log importance weights of `particles` (smc), else None
    trace: list[StepInfo]  # one entry per step, for plots
    method: str  # method name as in METHODS
    knobs: dict  # the resolved knobs (sizes derived from the budget included)
    # wall seconds of the whole search (all prompts): "velocity" (model calls, forward and backward),
    # "reward" (reward calls, forward and backward), "other" (the search's own work: the rest)
    seconds: dict


@dataclass
class Counts:
    """Per-prompt counters of one search; `evaluate` is the only place that increments `nfe`."""

    nfe: Tensor  # (P,) long, velocity rows evaluated
    nfe_limit: int  # the budget per prompt
    reward_calls: Tensor  # (P,) long, reward rows
    backward_calls: Tensor  # (P,) long, gradient rows
    seconds: dict = field(default_factory=lambda: {"velocity": 0.0, "reward": 0.0})  # wall time in those calls


def new_counts(num_prompts: int, nfe_limit: int) -> Counts:
    """Zeroed counters for P prompts with budget `nfe_limit` each."""
    nfe, reward_calls, backward_calls = (torch.zeros(num_prompts, dtype=torch.long) for _ in range(3))
    return Counts(nfe, nfe_limit, reward_calls, backward_calls)


@dataclass
class Evaluation:
    """What one NFE tells about a particle x_t (rows aligned with x_t)."""

    u_t: Tensor  # (B, *shape) velocity on the sampled path
    x0_hat: Tensor  # (B, *shape) Tweedie's estimate
    reward: Tensor | None  # (B,) reward(x0_hat), the value estimate of Eq. 19, if asked for
    grad: Tensor | None  # (B, *shape) d reward(x0_hat(x_t)) / d x_t through the velocity, if asked for

    def take(self, idx: Tensor) -> Evaluation:
        """The rows idx."""
        return Evaluation(self.u_t[idx], self.x0_hat[idx], _take(self.reward, idx), _take(self.grad, idx))


def _take(a: Tensor | None, idx: Tensor) -> Tensor | None:
    return None if a is None else a[idx]


def _where_rows(mask: Tensor, a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Rows of a (B, ...) where mask (B,) else rows of b; None (a field not computed) stays None."""
    return None if a is None else torch.where(mask.view(-1, *[1] * (a.ndim - 1)), a, b)


def _where(mask: Tensor, a: Evaluation, b: Evaluation) -> Evaluation:
    """Rows of a where mask (B,) else rows of b."""
    return Evaluation(_where_rows(mask, a.u_t, b.u_t), _where_rows(mask, a.x0_hat, b.x0_hat),
                      _where_rows(mask, a.reward, b.reward), _where_rows(mask, a.grad, b.grad))


# -----------------------------------------------------------------------------------------------
# 2. The one counted evaluation, and the proposal step


@dataclass
class _At:
    """Path time t and the coefficients every step needs there; fields of shape () or (B,), or (T + 1,) on a grid."""

    t: Tensor  # time on the sampled path
    coeffs: sde.Coeffs  # the path's alpha_t, sigma_t and derivatives
    conv: sde.ConversionCoeffs | None  # Linear -> VP time change t_s and scale c_s (Eqs. 10-11), vp-sde only

    def index(self, idx) -> _At:
        """The same times indexed by idx (int, slice or tensor); fields of shape () stay."""
        c, v = self.coeffs, self.conv
        coeffs = sde.Coeffs(_pick(c.alpha_t, idx), _pick(c.sigma_t, idx), _pick(c.d_alpha_t, idx),
                            _pick(c.d_sigma_t, idx))
        conv = None if v is None else sde.ConversionCoeffs(_pick(v.t_s, idx), _pick(v.c_s, idx), _pick(v.d_t_s, idx),
                                                           _pick(v.d_c_s, idx))
        return _At(_pick(self.t, idx), coeffs, conv)


def _pick(a: Tensor, idx) -> Tensor:
    """a[idx] for a coefficient given per time; one of shape () is the same at every time."""
    return a if a.ndim == 0 else a[idx]


def _at(problem: Problem, t: Tensor) -> _At:
    conv = sde.conversion_coeffs(t, sde.LinearInterpolant(), problem.path) if problem.dynamics == "vp-sde" else None
    return _At(t, problem.path(t), conv)


def _col(a: Tensor, x: Tensor) -> Tensor:
    """A per-row coefficient () or (B,) shaped to broadcast over x (B, *shape)."""
    return a if a.ndim == 0 else a.view(-1, *[1] * (x.ndim - 1))  # (B, 1, ..., 1)


def _path_velocity(problem: Problem, counts: Counts, x_t: Tensor, at: _At, prompt: Tensor) -> tuple[Tensor, Tensor]:
    """The velocity of the sampled path from one model call: the model's own (linear path), or converted
    to VP by Eq. 11 (sde.to_source, sde.target_velocity) with coefficients computed once per grid.
    Also returns the model's own velocity u (on the linear path, at its time t_s), for the lookahead."""
    B = x_t.shape[0]
    if at.conv is None:
        u = _timed_velocity(problem, counts, x_t, at.t.expand(B), prompt)
        return u, u
    u = _timed_velocity(problem, counts, sde.to_source(x_t, at.conv), at.conv.t_s.expand(B), prompt)  # at t_s
    return sde.target_velocity(u, x_t, at.conv), u


def _checked(u: Tensor, x: Tensor) -> Tensor:
    if not isinstance(u, Tensor) or u.shape != x.shape or not u.is_floating_point():
        got = f"{u.dtype} tensor of shape {tuple(u.shape)}" if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"Problem.velocity must return a float tensor of the shape of its input {tuple(x.shape)}, "
                         f"got {got}")
    if not torch.isfinite(u).all():
        if not torch.isfinite(x).all():  # the particles themselves diverged: not the velocity's fault
            raise ValueError("the particles became NaN or inf (diverged); with DPS guidance, a larger dps_beta "
                             "(weaker guidance) keeps them finite")
        raise ValueError(f"Problem.velocity returned NaN or inf for {int((~torch.isfinite(u)).flatten(1).any(1).sum())} "
                         f"of {x.shape[0]} finite inputs")
    return u


def _timed_velocity(problem: Problem, counts: Counts, x: Tensor, t: Tensor, prompt: Tensor) -> Tensor:
    start = time.perf_counter()
    u = problem.velocity(x, t, prompt)
    counts.seconds["velocity"] += time.perf_counter() - start
    return _checked(u, x)


def _ode_lookahead(problem: Problem, counts: Counts, x_t: Tensor, at: _At, prompt: Tensor, u: Tensor) -> Tensor:
    """Lookahead "ode:K": K Euler steps of the model's own (linear-path) ODE, Eq. 6, from the particle to
    t = 0 on a uniform grid t_j = t (K - j) / K. The particle is first mapped to the linear path (x / c_s
    at time t_s, Eq. 10, under vp-sde); step 0 uses the model call `u` already made there, so K = 1 is
    Tweedie's x0_hat and every further step is one more NFE (counted by the caller). Returns the end point."""
    K = problem.lookahead_nfe + 1
    x, t = (x_t, at.t) if at.conv is None else (sde.to_source(x_t, at.conv), at.conv.t_s)
    h = _col(t.expand(x.shape[0]) / K, x)  # (B, 1, ..., 1), the step size of every row
    for j in range(K):
        if j > 0:
            u = _timed_velocity(problem, counts, x, (t * (K - j) / K).expand(x.shape[0]), prompt)
        x = x - h * u
    return x


def _score(problem: Problem, r, rows: int, grad: bool) -> None:
    """The reward's output must be a float tensor (rows,) of finite values, attached to autograd when
    its gradient is needed (ValueError naming the reward otherwise)."""
    name = problem.reward_name
    if not isinstance(r, Tensor) or not r.is_floating_point():
        got = f"a {r.dtype} tensor" if isinstance(r, Tensor) else type(r).__name__
        raise ValueError(f"reward {name!r} must return a float torch.Tensor of shape ({rows},), got {got}")
    if r.shape != (rows,):
        raise ValueError(f"reward {name!r} must return shape ({rows},), got {tuple(r.shape)}")
    if not torch.isfinite(r).all():
        raise ValueError(f"reward {name!r} returned NaN or inf for {int((~torch.isfinite(r)).sum())} "
                         f"of {rows} samples; a search cannot rank those")
    if grad and not r.requires_grad:
        raise ValueError(f"reward {name!r} is flagged differentiable but its output is detached from its input "
                         f"(computed under no_grad, through numpy or .detach()); DPS needs its gradient")


def _evaluate_at(problem: Problem, counts: Counts, x_t: Tensor, at: _At, prompt: Tensor, *, reward: bool,
                 grad: bool, used: Tensor | None = None, prompt_cpu: Tensor | None = None) -> Evaluation:
    """The one counted evaluation: every velocity call of every algorithm goes through here. `used`
    (P,) is the number of rows per prompt, if the caller knows it (else counted from `prompt`).
    `prompt` is on the particles' device (for the velocity); the reward gets `prompt_cpu`, the same ids
    on the CPU (it maps them to prompt strings), which the layouts keep so that no copy is made here."""
    B = x_t.shape[0]
    if prompt_cpu is None:
        prompt_cpu = prompt.cpu()
    used = torch.bincount(prompt_cpu, minlength=problem.num_prompts) if used is None else used
    scored = reward or grad
    cost = used * (1 + problem.lookahead_nfe) if scored else used  # a scored row also pays its lookahead
    if torch.any(counts.nfe + cost > counts.nfe_limit):
        raise RuntimeError(f"internal error: {cost.tolist()} more NFE would exceed the budget "
                           f"{counts.nfe_limit} (spent {counts.nfe.tolist()})")
    assert not (grad and problem.lookahead_nfe), "gradient guidance is refused with an ode lookahead"
    counts.nfe += cost
    if scored:
        counts.reward_calls += used
    if grad:
        counts.backward_calls += used
    out = []
    for lo in range(0, B, problem.max_batch):
        rows = slice(lo, lo + problem.max_batch)
        x, p, at_rows = (x_t, prompt, at) if B <= problem.max_batch else (x_t[rows], prompt[rows], at.index(rows))
        p_cpu = prompt_cpu if B <= problem.max_batch else prompt_cpu[rows]
        with torch.enable_grad() if grad else contextlib.nullcontext():  # callers run under no_grad
            if grad:
                x = x.detach().requires_grad_(True)
            u_t, u = _path_velocity(problem, counts, x, at_rows, p)
            x0_hat = sde.x0_hat_from_velocity(u_t, x, at_rows.coeffs)  # Tweedie, in the sampled path's coefficients
            if not torch.isfinite(x0_hat).all():  # finite u and x can still overflow here
                raise ValueError("x0_hat became NaN or inf (the particles or the velocity are too large to combine)")
            if scored and problem.lookahead_nfe:
                x0_hat = _ode_lookahead(problem, counts, x, at_rows, p, u)
            r = None
            if scored:
                start = time.perf_counter()
                r = problem.reward(x0_hat, p_cpu)
                counts.seconds["reward"] += time.perf_counter() - start
                _score(problem, r, x.shape[0], grad)
                # a reward computed on the host (the shape-world detector) comes back to the particles
                r = r.to(x0_hat.device)
            d = None
            if grad:
                # autograd.grad (not backward) so that model parameters collect no .grad; rows are
                # independent, so the gradient of the sum is every row's own gradient. The backward
                # runs through the reward first: a hook on x0_hat marks where the velocity's part begins.
                mark = []
                x0_hat.register_hook(lambda g: mark.append(time.perf_counter()))
                start = time.perf_counter()
                d = torch.autograd.grad(r.sum(), x)[0]
                end = time.perf_counter()
                counts.seconds["reward"] += mark[0] - start
                counts.seconds["velocity"] += end - mark[0]
        out.append(Evaluation(u_t.detach(), x0_hat.detach(), None if r is None else r.detach(), d))
    if len(out) == 1:
        return out[0]
    return Evaluation(torch.cat([e.u_t for e in out]), torch.cat([e.x0_hat for e in out]),
                      _cat([e.reward for e in out]), _cat([e.grad for e in out]))


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    return None if parts[0] is None else torch.cat(parts)


@torch.no_grad()
def evaluate(problem: Problem, counts: Counts, x_t: Tensor, t: Tensor, prompt: Tensor, *,
             reward: bool = True, grad: bool = False) -> Evaluation:
    """One NFE per row of x_t (B, *shape) at path times t (B,) for prompts `prompt` (B,) long: velocity
    of the sampled path, x0_hat, and optionally reward(x0_hat) and its gradient w.r.t. x_t (grad implies
    reward). The budget is checked for all rows before any call (RuntimeError: callers must not ask for
    more). With grad=True each chunk of `max_batch` rows is one forward with autograd, which also serves
    as the velocity (still one NFE), and one backward."""
    return _evaluate_at(problem, counts, x_t, _at(problem, t), prompt, reward=reward, grad=grad)


@dataclass
class _State:
    """The state every algorithm shares: problem, grid, counters, one generator per prompt, trace."""

    problem: Problem
    grid: _At  # the time grid t_0 = 1 > ... > t_T = 0 of the sampled path and its coefficients, (T + 1,)
    g: Tensor  # (T + 1,) g(t) on the grid (zeros for the ODE)
    eta_g: Tensor  # (T + 1,) eta_t + g_t^2 / 2, the DPS guidance factor (sde.guidance_factor)
    counts: Counts
    gens: list[torch.Generator]  # prompt p draws all its randomness from gens[p]
    callback: Callable[[StepInfo], None] | None
    trace: list[StepInfo] = field(default_factory=list)
    best: Tensor = None  # (P,) best reward scored so far
    nfe_mark: Tensor = None  # (P,) counts.nfe at the last trace entry
    rows: dict = field(default_factory=dict)  # n -> prompt id of every row of the layout (P, n), on the device
    rows_cpu: dict = field(default_factory=dict)  # n -> the same ids on the CPU (for the reward)
    used: dict = field(default_factory=dict)  # n -> (P,) rows per prompt of that layout, i.e. n each
    start: float = 0.0  # time.perf_counter() when the search began
    times: list = field(default_factory=list)  # the grid times as floats (trace entries without a device read)


def _start(problem: Problem, nfe: int, generator: torch.Generator, callback, method: str, knobs: dict) -> _State:
    start = time.perf_counter()
    if not isinstance(problem, Problem):
        raise ValueError(f"problem must be a search.Problem, got {type(problem).__name__}")
    if not isinstance(generator, torch.Generator):
        raise ValueError("generator must be a torch.Generator (searches replay exactly from its seed)")
    need = min_nfe(method, problem, **knobs)
    if not (isinstance(nfe, int) and nfe >= need):
        raise ValueError(f"{method} with {knobs or 'default knobs'} and num_steps={problem.num_steps} needs a budget "
                         f"of at least {need} NFE per prompt, got nfe={nfe!r}")
    _fits(problem, method, knobs, nfe)
    P = problem.num_prompts
    # drawn one at a time, so the first seeds do not depend on P (prompt 0 alone == prompt 0 in a batch)
    seeds = [int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)) for _ in range(P)]
    # the prompts' generators live where the particles do, so that noise is drawn there (on the CPU
    # this is the CPU generator of before: the same seed gives the same search)
    gens = [torch.Generator(device=problem.device).manual_seed(s) for s in seeds]
    ts = grid_times(problem).to(problem.dtype).to(problem.device)
    grid = _at(problem, ts)  # at t = 0 the conversion is 0 / 0: never used, no velocity is evaluated there
    g = grid_diffusion(problem, ts)
    counts = new_counts(P, nfe)
    best = torch.full((P,), -math.inf, device=problem.device)
    return _State(problem, grid, g, sde.guidance_factor(grid.coeffs, g), counts, gens, callback, [], best,
                  counts.nfe.clone(), start=start, times=ts.tolist())


def grid_times(problem: Problem) -> Tensor:
    """The search's time grid t_0 = 1 > ... > t_T = 0 on the sampled path (float64, CPU): the
    problem's `time_grid`, then shifted by `time_shift` when given (sde.time_grid)."""
    # The shift warps the grid in the time of the sampled path, as the exp grid does (App. C): for the
    # linear dynamics that is BFL's schedule of the model's own time; under vp-sde the same warp of the
    # VP-time grid (warping the model's time instead would push VP times beyond t = 1, where the VP path
    # ends at SNR 0.0066)
    t = sde.time_grid(problem.num_steps, problem.time_grid,
                      shift=None if problem.time_shift is None else float(problem.time_shift))
    if problem.dynamics == "linear-sde+time":  # the linear times of the VP grid's SNRs (Eq. 10)
        t = sde.vp_conversion_halves(t)[0]
    return t


def grid_diffusion(problem: Problem, ts: Tensor) -> Tensor:
    """g at the times ts (T + 1,) of grid_times: the dynamics' g(t) (zeros for the ODE), and under
    "linear-sde+diffusion" scaled at every step by the VP conversion's k_i (sde.vp_conversion_halves)."""
    g = problem.g(ts) if problem.g is not None else torch.zeros_like(ts)
    if problem.dynamics == "linear-sde+diffusion":
        k = sde.vp_conversion_halves(grid_times(problem))[1].to(g)
        g = g * torch.cat([k, torch.ones_like(k[:1])])  # (T + 1,); no step leaves t_T
    return g


def _budget(nfe) -> int:
    """An NFE budget as a Python int: any integral number (numpy integers too), not a bool or a float."""
    if isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral):
        raise ValueError(f"nfe must be an integer, got {nfe!r}")
    return int(nfe)


def memory_bytes() -> int | None:
    """Physical memory of this machine in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# A particle is held as x_t, u_t, x0_hat, the proposal and its noise (and a gradient under DPS):
# about this many copies of a latent at once (a lower bound: the velocity's activations come on top).
_COPIES_PER_PARTICLE = 6


def _fits(problem: Problem, method: str, knobs: dict, nfe: int) -> None:
    """ValueError when the particles this budget asks for cannot fit in memory (checked on the CPU),
    before anything is allocated: BoN and SMC hold nfe // num_steps particles, CoDe / SVDD n k, RBF
    n init_particles, SoP n k."""
    k = knobs.get("k") or 1
    init = knobs.get("init_particles") or 1
    n = knobs.get("n") or 1
    rows = problem.num_prompts * n * max(k, init)
    itemsize = torch.empty((), dtype=problem.dtype).element_size()
    need = rows * math.prod(problem.shape) * itemsize * _COPIES_PER_PARTICLE
    have = memory_bytes() if str(problem.device) == "cpu" else None
    if have is not None and need > have:
        raise ValueError(f"{method} with nfe={nfe} holds {rows:,} particles at once ({need / 1e9:,.1f} GB), more than "
                         f"this machine's {have / 1e9:,.1f} GB of memory; use a smaller budget")


def _rows(state: _State, n: int) -> Tensor:
    """Prompt id of each row of the prompt-major layout (P, n) -> (P * n,)."""
    if n not in state.rows:
        state.rows_cpu[n] = torch.arange(state.problem.num_prompts).repeat_interleave(n)
        state.rows[n] = state.rows_cpu[n].to(state.problem.device)
        state.used[n] = torch.full((state.problem.num_prompts,), n, dtype=torch.long)
    return state.rows[n]


def _noise(state: _State, n: int) -> Tensor:
    """n standard normal latents per prompt from the prompt's own generator, (P * n, *shape)."""
    p = state.problem
    z = [torch.randn((n, *p.shape), generator=g, dtype=p.dtype, device=g.device) for g in state.gens]
    return z[0] if len(z) == 1 else torch.cat(z)  # (P * n, *shape), on the device of the generators


def _evaluate_layout(state: _State, x: Tensor, i: Tensor | int, n: int, *, reward: bool, grad: bool = False,
                     mask: Tensor | None = None) -> Evaluation:
    """Evaluate the layout (P, n) at grid index i (int, or (B,) per row); tracks the best reward. With
    `mask` (B,) bool only those rows are evaluated (and counted); the others get reward -inf and zeros."""
    if mask is not None and not bool(mask.all()):
        idx = mask.nonzero().flatten()  # a device read: which rows run depends on the mask
        sub = _evaluate_at(state.problem, state.counts, x[idx], state.grid.index(i[idx]), _rows(state, n)[idx],
                           reward=reward, grad=grad, prompt_cpu=state.rows_cpu[n][idx.cpu()])

        def put(a: Tensor | None, fill: Tensor) -> Tensor | None:  # the evaluated rows into `fill`
            return None if a is None else fill.index_copy(0, idx, a)

        ev = Evaluation(put(sub.u_t, torch.zeros_like(x)), put(sub.x0_hat, torch.zeros_like(x)),
                        put(sub.reward, torch.full((x.shape[0],), -math.inf, dtype=sub.reward.dtype)),
                        put(sub.grad, torch.zeros_like(x)))
    else:
        ev = _evaluate_at(state.problem, state.counts, x, state.grid.index(i), _rows(state, n), reward=reward,
                          grad=grad, used=state.used[n], prompt_cpu=state.rows_cpu[n])
    _track_best(state, ev, n)
    return ev


def _track_best(state: _State, ev: Evaluation, n: int) -> None:
    """The best reward scored so far per prompt (the trace's best_reward), from a layout (P, n)'s rewards."""
    if ev.reward is not None:
        state.best = torch.maximum(state.best, ev.reward.view(state.problem.num_prompts, n).amax(1))


def _record(state: _State, step: int, ess: Tensor | None = None, nfe: Tensor | None = None,
            t: float | None = None) -> None:
    """Append a trace entry (NFE since the previous entry unless given) and call the callback."""
    if nfe is None:
        nfe, state.nfe_mark = state.counts.nfe - state.nfe_mark, state.counts.nfe.clone()
    # trace entries are on the CPU: one small copy per step (not per candidate), for plots and progress bars
    info = StepInfo(step, state.times[step] if t is None else t, nfe, state.best.cpu(),
                    None if ess is None else ess.cpu())
    state.trace.append(info)
    if state.callback is not None:
        state.callback(info)


def _propose(state: _State, x: Tensor, ev: Evaluation, i: Tensor | int, n: int, dps_beta: float | None,
             noise: Tensor | None = None) -> Tensor:
    """One proposal step from grid index i to i + 1 for the layout (P, n): Euler for the ODE (Eq. 6,
    sde.euler_step), else Euler-Maruyama (Eq. 9 / 12, sde.euler_maruyama on the grid's coefficients;
    `noise` replaces the draw from the prompts' generators). With dps_beta, the DPS guidance (the
    value's gradient at x, carried in ev.grad) moves the step by sde.guidance_factor (Eq. 30)."""
    now = state.grid.index(i)
    t_next = state.grid.t[i + 1]
    if state.problem.g is None:
        x_next = sde.euler_step(x, ev.u_t, now.t, t_next)
    else:
        x_next = sde.euler_maruyama(x, ev.u_t, now.coeffs, _col(state.g[i], x), _col(now.t - t_next, x),
                                    _noise(state, n) if noise is None else noise)
    if dps_beta is not None:
        dt = _col(now.t - t_next, x)  # > 0, backward in time
        x_next = x_next + (_col(state.eta_g[i], x) * dt / dps_beta) * ev.grad
    return x_next


def _result(state: _State, method: str, knobs: dict, x0: Tensor, r: Tensor,
            log_w: Tensor | None = None) -> SearchResult:
    """Best particle per prompt by reward, from the final x0_hat (P * n, *shape) and rewards (P * n,)."""
    P, shape = state.problem.num_prompts, state.problem.shape
    x0, r = x0.reshape(P, -1, *shape), r.reshape(P, -1)  # (P, n, *shape), (P, n)
    best = r.argmax(1)
    ar = torch.arange(P, device=r.device)
    counts = state.counts
    lw = None if log_w is None else torch.log_softmax(log_w.view(P, -1), 1)
    wall = time.perf_counter() - state.start
    seconds = dict(counts.seconds) | {"other": max(wall - counts.seconds["velocity"] - counts.seconds["reward"], 0.0)}
    return SearchResult(x0[ar, best], r[ar, best], counts.nfe.clone(), counts.reward_calls.clone(),
                        counts.backward_calls.clone(), x0, r, lw, state.trace, method, knobs, seconds)


# -----------------------------------------------------------------------------------------------
# 3. Plain sampling: none, Best-of-N, DPS


def _sample(state: _State, n: int, dps_beta: float | None) -> Evaluation:
    """n chains per prompt through the whole grid; rewards only at the end unless guided."""
    T = state.problem.num_steps
    x = _noise(state, n)  # (P * n, *shape) at t = 1
    for i in range(T):
        guided = dps_beta is not None
        ev = _evaluate_layout(state, x, i, n, reward=guided or i == T - 1, grad=guided)
        if i < T - 1:
            x = _propose(state, x, ev, i, n, dps_beta)
        _record(state, i)
    return ev


@torch.no_grad()
def plain(problem: Problem, nfe: int, *, generator: torch.Generator, callback=None) -> SearchResult:
    """The sampler alone: one chain per prompt, num_steps NFE (the budget beyond that is not used)."""
    state = _start(problem, nfe, generator, callback, "none", {})
    ev = _sample(state, 1, None)
    return _result(state, "none", {}, ev.x0_hat, ev.reward)


@torch.no_grad()
def best_of_n(problem: Problem, nfe: int, *, generator: torch.Generator, callback=None,
              n: int | None = None) -> SearchResult:
    """Best-of-N (App. D: N = 50 at 500 NFE): n full samples, the best final reward wins.

    n defaults to nfe // num_steps (nfe // (num_steps + K - 1) with an ode:K lookahead of the final
    samples). The paper runs it with the linear ODE; here it uses the problem's dynamics, so
    Problem(dynamics="linear-ode") is the paper's BoN."""
    n = n if n is not None else max(nfe // (problem.num_steps + problem.lookahead_nfe), 1)
    state = _start(problem, nfe, generator, callback, "bon", {"n": n})
    ev = _sample(state, n, None)
    return _result(state, "bon", {"n": n}, ev.x0_hat, ev.reward)


@torch.no_grad()
def dps(problem: Problem, nfe: int, *, generator: torch.Generator, callback=None,
        n: int = 1, beta: float = DPS_BETA) -> SearchResult:
    """Gradient guidance alone ("DPS" of Table 2): n guided chains (default one, as the paper's DPS row),
    every step moved along grad_x reward(x0_hat(x)) / beta (Eq. 30, see sde.guidance_factor). One NFE and one
    backward per chain and step. Needs Problem(differentiable=True)."""
    _need_gradients(problem, beta)
    state = _start(problem, nfe, generator, callback, "dps", {"n": n})
    ev = _sample(state, n, beta)
    return _result(state, "dps", {"n": n, "beta": beta}, ev.x0_hat, ev.reward)


def _need_gradients(problem: Problem, beta: float) -> None:
    if not problem.differentiable:
        raise ValueError(f"gradient guidance needs a differentiable reward, and {problem.reward_name!r} is not "
                         f"(Problem.differentiable=False); use a differentiable reward or a method without dps")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta) or not beta > 0:
        raise ValueError(f"the guidance temperature beta must be a finite number > 0, got {beta!r}")
    if problem.lookahead_nfe:
        raise ValueError(f"gradient guidance differentiates reward(x0_hat) (Eq. 30) and does not run with "
                         f"lookahead {problem.lookahead!r}; use lookahead 'tweedie' or a method without dps")


# -----------------------------------------------------------------------------------------------
# 4. Search over Paths (Ma et al. 2025; paper App. D: N = 2, K = 5, Delta_f / Delta_b from their code)


def _sop_schedule(t_start: float, delta_f: float, delta_b: float) -> list[tuple[float, float]]:
    """The (t_f, t_b) pairs: forward-noise from the current t_b to t_f, then ODE back to the next t_b."""
    if not (0 < t_start < 1 and 0 < delta_f < delta_b and t_start + delta_f <= 1):
        raise ValueError(f"search over paths needs 0 < t_start < 1, 0 < delta_f < delta_b and t_start + delta_f <= 1; "
                         f"got t_start={t_start}, delta_f={delta_f}, delta_b={delta_b}")
    out, t_b = [], t_start
    while t_b > 0:
        t_f = min(t_b + delta_f, 1.0)
        t_b = max(round(t_f - delta_b, 9), 0.0)  # rounded: 0.12 - 4 * 0.03 must end at 0, not at 1e-17
        out.append((t_f, t_b))
    return out


def _ode(state: _State, x: Tensor, t_a: float, t_b: float, m: int, n: int, reward: bool) -> tuple[Tensor, Evaluation]:
    """m Euler steps of the path's ODE on a uniform grid from t_a down to t_b (official code: uniform)."""
    taus = _at(state.problem, torch.linspace(t_a, t_b, m + 1, dtype=state.problem.dtype, device=state.problem.device))
    for j in range(m):
        ev = _evaluate_at(state.problem, state.counts, x, taus.index(j), _rows(state, n), reward=reward and j == m - 1,
                          grad=False, used=state.used[n], prompt_cpu=state.rows_cpu[n])
        x = sde.euler_step(x, ev.u_t, taus.t[j], taus.t[j + 1])
    _track_best(state, ev, n)
    return x, ev


@torch.no_grad()
def search_over_paths(problem: Problem, nfe: int, *, generator: torch.Generator, callback=None,
                      n: int = 2, k: int = 5, t_start: float = 0.12, delta_f: float = 0.78, delta_b: float = 0.81,
                      ode_steps: int | None = None) -> SearchResult:
    """Search over Paths (Ma et al. 2025, as the paper's baseline): n noises are solved by the ODE to t_start;
    then, until t = 0, each kept sample gets k copies forward-noised by delta_f (the exact transition of
    the path), solved back by delta_b > delta_f, and the n best by reward(x0_hat) are kept.

    Times are path times (VP time under vp-sde, as the official code). It is an ODE method: the dynamics
    only choose the path. ode_steps (Euler steps per solve) defaults to the most the budget allows;
    num_steps is not used. Keeps the global top n, as the paper says (official code: best per parent).
    Values t_start = 0.12, delta_f = 0.78, delta_b = 0.81 are the official code's (in 1/1000 there)."""
    schedule = _sop_schedule(t_start, delta_f, delta_b)
    n, k = _positive("sop", "n", n), _positive("sop", "k", k)
    per_solve = n * (1 + len(schedule) * k)  # NFE of one Euler step in every solve
    looks = n * k * len(schedule) * problem.lookahead_nfe  # the lookahead of the scored solve ends
    m = ode_steps if ode_steps is not None else max((nfe - looks) // per_solve, 1)
    knobs = {"n": n, "k": k, "t_start": t_start, "delta_f": delta_f, "delta_b": delta_b, "ode_steps": m}
    state = _start(problem, nfe, generator, callback, "sop", knobs)
    P = problem.num_prompts
    x, ev = _ode(state, _noise(state, n), 1.0, t_start, m, n, reward=False)
    t_prev = t_start
    for step, (t_f, t_b) in enumerate(schedule):
        x = x.repeat_interleave(k, 0)  # (P * n * k, *shape), copies of a parent adjacent
        a_f, a_b = (problem.path(torch.tensor(s, dtype=torch.float64)) for s in (t_f, t_prev))
        ratio = float(a_f.alpha_t / a_b.alpha_t)  # x_f = ratio x_b + sqrt(sigma_f^2 - ratio^2 sigma_b^2) z
        x = ratio * x + math.sqrt(max(float(a_f.sigma_t**2 - ratio**2 * a_b.sigma_t**2), 0.0)) * _noise(state, n * k)
        x, ev = _ode(state, x, t_f, t_b, m, n * k, reward=True)
        top = ev.reward.view(P, n * k).topk(n, dim=1).indices + n * k * torch.arange(P, device=x.device)[:, None]
        x, ev = x[top.flatten()], ev.take(top.flatten())
        t_prev = t_b
        _record(state, step, t=t_b)
    return _result(state, "sop", knobs, ev.x0_hat, ev.reward)


# -----------------------------------------------------------------------------------------------
# 5. SMC with the pretrained kernel as proposal (DAS / FK steering; Eq. 27)


@torch.no_grad()
def smc(problem: Problem, nfe: int, *, generator: torch.Generator, callback=None,
        n: int | None = None, beta: float = 0.1, ess_threshold: float = 0.5) -> SearchResult:
    """Sequential Monte Carlo towards p0(x) exp(r(x) / beta) (Sec. 3, Eq. 27; App. D: N = 50).

    n particles per prompt (default nfe // num_steps) start with log-weights v(x_1) / beta, v = r(x0_hat)
    (Eq. 19). Each step: if ESS = 1 / sum(w_bar^2) < ess_threshold * n, resample multinomially and reset
    the weights; propose one step with the model's kernel; multiply the weight by
    exp((v(x_{t-dt}) - v(x_t)) / beta). Without resampling the weights accumulate, so the final weights
    telescope to exp(v_final / beta) (test). n defaults to nfe // (num_steps (1 + K - 1)) with an
    ode:K lookahead (every particle is scored). beta = 0.1 is App. F.2's (official code: 0.5-1.0);
    ess_threshold 0.5 is DAS's (official code: 1.0, i.e. nearly always).
    Result: `particles` with `log_weights` approximate the tilted target; x0 is the particle with the
    best reward (the official code returns the largest weight, which after a resampling reflects only
    the reward gain since then)."""
    n = n if n is not None else max(nfe // (problem.num_steps * (1 + problem.lookahead_nfe)), 1)
    if not beta > 0 or not 0 <= ess_threshold <= 1:
        raise ValueError(f"smc needs beta > 0 and 0 <= ess_threshold <= 1, got beta={beta}, "
                         f"ess_threshold={ess_threshold}")
    knobs = {"n": n, "beta": beta, "ess_threshold": ess_threshold}
    state = _start(problem, nfe, generator, callback, "smc", knobs)
    P = problem.num_prompts
    x = _noise(state, n)  # (P * n, *shape)
    ev = _evaluate_layout(state, x, 0, n, reward=True)
    log_w = (ev.reward / beta).view(P, n)  # w = exp(v(x_1) / beta): the twisted target at t = 1 over the prior
    _record(state, 0)
    for i in range(1, problem.num_steps):
        ess = 1 / torch.softmax(log_w, 1).pow(2).sum(1)  # (P,)
        idx = torch.arange(P * n, device=x.device).view(P, n)
        for q in torch.nonzero(ess < ess_threshold * n).flatten().tolist():  # a device read per step (selection)
            idx[q] = q * n + torch.multinomial(torch.softmax(log_w[q], 0), n, replacement=True,
                                               generator=state.gens[q]).to(idx.device)
            log_w[q] = 0.0  # resampled particles are equally weighted
        x, ev = x[idx.flatten()], ev.take(idx.flatten())
        x = _propose(state, x, ev, i - 1, n, None)
        ev_next = _evaluate_layout(state, x, i, n, reward=True)
        log_w = log_w + ((ev_next.reward - ev.reward) / beta).view(P, n)  # Eq. 27, in log space
        ev = ev_next
        _record(state, i, ess=ess)
    return _result(state, "smc", knobs, ev.x0_hat, ev.reward, log_w)


# -----------------------------------------------------------------------------------------------
# 6. CoDe and SVDD: K children per chain, argmax every L steps (official GeneralTrainer)


def _child_cost(problem: Problem, block: int) -> int:
    """NFE of one child over the whole search: T - 1 steps, plus the lookahead of its
    ceil((T - 1) / block) scored selections."""
    T = problem.num_steps
    return (T - 1) + -(-(T - 1) // block) * problem.lookahead_nfe


def _children(nfe: int, problem: Problem, n: int, block: int) -> int:
    """The most children per chain the budget allows: n + n k (T - 1) <= nfe (paper: K = 25, official
    code 2 + 2 * 25 * 9 = 452 of 500; the rest is spent here)."""
    return max((nfe - n) // (n * _child_cost(problem, block)), 1)


def _blockwise(state: _State, n: int, k: int, block: int, dps_beta: float | None) -> Evaluation:
    T, guided = state.problem.num_steps, dps_beta is not None
    x = _noise(state, n)  # (P * n, *shape), the n chains of every prompt
    ev = _evaluate_layout(state, x, 0, n, reward=guided, grad=guided)  # the copies of a parent share this NFE
    _record(state, 0)
    i = 0
    while i < T - 1:
        x, ev = x.repeat_interleave(k, 0), ev.take(torch.arange(x.shape[0], device=x.device).repeat_interleave(k))
        for j in range(block):
            x = _propose(state, x, ev, i, n * k, dps_beta)  # independent noise per child
            i += 1
            ev = _evaluate_layout(state, x, i, n * k, reward=guided or i == T - 1 or j == block - 1, grad=guided)
            if i == T - 1:
                break
        best = ev.reward.view(-1, k).argmax(1) + k * torch.arange(x.shape[0] // k, device=x.device)  # argmax child
        x, ev = x[best], ev.take(best)
        _record(state, i)
    return ev


@torch.no_grad()
def code(problem: Problem, nfe: int, *, generator: torch.Generator, callback=None,
         n: int = 2, k: int | None = None, block: int = 2) -> SearchResult:
    """CoDe (Singh et al. 2025; App. D: N = 2, K = 25, L = 2): every chain is copied k times, each copy runs
    `block` steps with its own noise, the copy with the best reward(x0_hat) continues. k defaults to
    the most the budget allows. With the linear ODE all copies coincide (Table 1 shows the same)."""
    n, block = _positive("code", "n", n), _positive("code", "block", block)
    k = k if k is not None else _children(nfe, problem, n, block)
    knobs = {"n": n, "k": k, "block": block}
    state = _start(problem, nfe, generator, callback, "code", knobs)
    ev = _blockwise(state, n, k, block, None)
    return _result(state, "code", knobs, ev.x0_hat, ev.reward)


@torch.no_grad()
def svdd(problem: Problem, nfe: int, *, generator: torch.Generator, callback=None,
         n: int = 2, k: int | None = None, dps_beta: float | None = None) -> SearchResult:
    """SVDD-PM (Li et al. 2024; App. D: N = 2, K = 25): k children per chain every step, the argmax of
    reward(x0_hat) continues (beta = 0, as the paper runs it). With dps_beta, each child carries its own
    DPS gradient into its next step ("SVDD+DPS" of Table 2; needs a differentiable reward)."""
    n = _positive("svdd", "n", n)
    k = k if k is not None else _children(nfe, problem, n, 1)
    if dps_beta is not None:
        _need_gradients(problem, dps_beta)
    method = "svdd" if dps_beta is None else "svdd+dps"
    knobs = {"n": n, "k": k} | ({} if dps_beta is None else {"dps_beta": dps_beta})
    state = _start(problem, nfe, generator, callback, method, knobs)
    ev = _blockwise(state, n, k, 1, dps_beta)
    return _result(state, method, knobs, ev.x0_hat, ev.reward)


# -----------------------------------------------------------------------------------------------
# 7. Rollover Budget Forcing (Alg. 2)


def _rbf_sizes(nfe: int, problem: Problem, n: int, init_particles: int | None, allocation: str,
               threshold: float | None) -> tuple[int, int, int, int]:
    """(init, Q, cost, draws): initial noises per chain (given, or 10% of the budget as the official code:
    25 per chain of 2 at 500), the quota Q per stage, the NFE `cost` of one scored particle (1 + the
    lookahead's K - 1) and the candidates every chain may draw in all (Alg. 2's budget, per chain)."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"rbf: allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if (allocation == "threshold") != (threshold is not None):
        raise ValueError("rbf: allocation 'threshold' needs threshold=<reward level>, and only it takes one"
                         if threshold is None else "rbf: threshold= is only used with allocation='threshold'")
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"rbf: threshold must be a finite reward level, got {threshold!r}")
    T, cost = problem.num_steps, 1 + problem.lookahead_nfe
    init = init_particles
    if init is None:
        init = max(1, min(nfe // (10 * n * cost), (nfe - n * cost * (T - 1)) // (n * cost)))
    return init, (nfe - n * init * cost) // (n * (T - 1) * cost), cost, (nfe - n * init * cost) // (n * cost)


def _rbf_knobs(n: int, init: int, rollover: bool, allocation: str, threshold: float | None,
               dps_beta: float | None) -> dict:
    """The knobs of one rbf / rbf_reference call (init_particles resolved): what the budget is checked
    with and what the result records, with the derived quota."""
    return {"n": n, "init_particles": init, "rollover": rollover, "allocation": allocation} | \
        ({} if threshold is None else {"threshold": threshold}) | ({} if dps_beta is None else {"dps_beta": dps_beta})


def _rbf_check(problem: Problem, n: int, dps_beta: float | None) -> tuple[int, str]:
    if dps_beta is not None:
        _need_gradients(problem, dps_beta)
    return _positive("rbf", "n", n), "rbf" if dps_beta is None else "rbf+dps"


@torch.no_grad()
def rbf(problem: Problem, nfe: int, *, generator: torch.Generator, callback=None,
        n: int = 2, init_particles: int | None = None, rollover: bool = True, allocation: str = "rollover",
        threshold: float | None = None, dps_beta: float | None = None) -> SearchResult:
    """Rollover Budget Forcing, Alg. 2 of the paper (App. D: N = 2 chains), all chains in lockstep.

    Each chain starts from the best of `init_particles` noises by reward(x0_hat) at t = 1 (official code;
    Alg. 2 is init_particles = 1). At stage i the chain sits at grid index i and draws one candidate step
    at a time (1 NFE each, 1 + K - 1 with an ode:K lookahead). The quota Q = (nfe - n init) // (n (T - 1))
    is uniform over the T - 1 stages that produce candidates (the official code divides by T and lets
    the last stage absorb the remainder). The last stage (candidates at t_{T-1}) never advances: it
    spends whatever is left, and the best candidate of all chains there is the result (official code).
    When a stage's quota is spent without acceptance its best candidate is taken (Alg. 2 line 9).
    `allocation` decides when a candidate is accepted, i.e. the chain advances before its quota is spent:

      "rollover"   (Alg. 2) the first candidate whose reward beats r*, the best reward accepted so far
                   (strictly), is accepted and r* is raised;
      "uniform"    never: every stage spends exactly Q (the ablation of a fixed quota per step);
      "threshold"  the first candidate with reward >= `threshold` (a fixed level on the reward's own
                   scale, the same at every stage), and at the last stage such a candidate also ends
                   the chain, whose remaining budget is then not spent. This is this project's own
                   reading of the one-line description of Verifier-Threshold (Sundaresha et al., arXiv
                   2512.08985: advance when a candidate passes a threshold instead of beating the best
                   so far); everything else (quota, fallback, rollover, last stage) is RBF's.

    With an early acceptance the unused part of the quota rolls over to the next stage; rollover=False
    resets every quota to Q instead (the paper's ablation; the unused NFE then reach the last stage).
    With dps_beta every candidate is a guided step and carries its gradient ("RBF+DPS", Table 2).
    `rbf_reference` is the same algorithm one chain at a time (test: identical on random rewards)."""
    n, method = _rbf_check(problem, n, dps_beta)
    init, Q, cost, draws = _rbf_sizes(nfe, problem, n, init_particles, allocation, threshold)
    T, guided = problem.num_steps, dps_beta is not None
    knobs = _rbf_knobs(n, init, rollover, allocation, threshold, dps_beta)
    state = _start(problem, nfe, generator, callback, method, knobs)
    P, R = problem.num_prompts, problem.num_prompts * n
    x = _noise(state, n * init)  # (P * n * init, *shape)
    ev = _evaluate_layout(state, x, 0, n * init, reward=True, grad=guided)
    _record(state, 0)
    dev = problem.device
    pick = ev.reward.view(R, init).argmax(1) + init * torch.arange(R, device=dev)  # best initial noise of every chain
    x, ev = x[pick], ev.take(pick)  # the anchors, (R, *shape)
    r_star = ev.reward.clone()  # best accepted reward per chain
    stage = torch.zeros(R, dtype=torch.long, device=dev)  # grid index of the anchor
    drawn = torch.zeros(R, dtype=torch.long, device=dev)  # candidates drawn in the current stage (j of Alg. 2)
    quota = torch.full((R,), Q, device=dev)
    active = torch.ones(R, dtype=torch.bool, device=dev)  # False once a chain has ended ("threshold" only)
    spent = torch.zeros(R, T, dtype=torch.long, device=dev)  # NFE per chain and candidate grid index (Fig. 9)
    best_x, best_ev = x, ev  # the current stage's best candidate (placeholders until the first draw)
    best_r = torch.full((R,), -math.inf, dtype=ev.reward.dtype, device=dev)  # its reward, -inf at a stage's start
    done, chains = 1, torch.arange(R, device=dev)  # trace entries emitted so far (grid index 0 is the initialisation)
    for _ in range(draws):
        cand = _propose(state, x, ev, stage, n, dps_beta)  # one candidate per chain (noise drawn for all)
        cand_ev = _evaluate_layout(state, cand, stage + 1, n, reward=True, grad=guided,
                                   mask=active if allocation == "threshold" else None)
        drawn += active
        spent[chains, stage + 1] += cost * active
        better = active & (cand_ev.reward > best_r)
        best_x = _where_rows(better, cand, best_x)
        best_ev, best_r = _where(better, cand_ev, best_ev), torch.where(better, cand_ev.reward, best_r)
        if allocation == "rollover":
            accept = active & (cand_ev.reward > r_star)  # strict, against r* (not the anchor's own reward)
            r_star = torch.where(accept, cand_ev.reward, r_star)
        elif allocation == "threshold":
            accept = active & (cand_ev.reward >= threshold)
        else:
            accept = torch.zeros_like(active)
        can_move = stage < T - 2
        # an accepted candidate is also the stage's best (every earlier one was <= r*, or < threshold),
        # so both ways of advancing move to the stage's best candidate
        forced = active & ~accept & (drawn >= quota)
        advance = can_move & (accept | forced)
        left = (quota - drawn) if rollover else torch.zeros_like(quota)
        quota = torch.where(advance & accept, Q + left, torch.where(advance, Q, quota))
        x = _where_rows(advance, best_x, x)
        ev = _where(advance, best_ev, ev)
        stage, drawn = stage + advance, torch.where(advance, 0, drawn)
        best_r = torch.where(advance, -math.inf, best_r)
        if allocation == "threshold":
            active = active & ~(accept & ~can_move)  # passing the threshold at the last stage ends the chain
        # one scalar read per draw (the only one of the loop besides "threshold"'s active.any()): the
        # trace entry of a grid index, and the progress bar with it, is final once every chain has left it
        while done <= int(stage.min()):
            _record(state, done, nfe=spent[:, done].view(P, n).sum(1).cpu())
            done += 1
        if allocation == "threshold" and not bool(active.any()):
            break
    assert bool((stage == T - 2).all()), "the quota guarantees that every chain reaches the last stage"
    while done < T:
        _record(state, done, nfe=spent[:, done].view(P, n).sum(1).cpu())
        done += 1
    return _result(state, method, knobs | {"quota": Q}, best_ev.x0_hat, best_r)


@torch.no_grad()
def rbf_reference(problem: Problem, nfe: int, *, generator: torch.Generator, callback=None,
                  n: int = 2, init_particles: int | None = None, rollover: bool = True, allocation: str = "rollover",
                  threshold: float | None = None, dps_beta: float | None = None) -> SearchResult:
    """Alg. 2 as the paper writes it, one chain after the other: a stage loop, a quota loop, `break` on
    acceptance. Same knobs, sizes, random draws and result as `rbf` (test: identical NFE traces and
    results on random scripted rewards), written to be read next to the algorithm, not to be fast.

    Two things are the official code's, not Alg. 2's: the initial particle of a chain is the best of
    `init_particles` noises, and the last stage spends all the chain has left and does not advance.
    The noise of candidate j of chain c is row c of the prompt's j-th draw of n rows, because the
    batched `rbf` draws the noise of all chains of a prompt together. Trace entries: the NFE spent at
    each grid index, and the best reward scored at that grid index or before."""
    n, method = _rbf_check(problem, n, dps_beta)
    init, Q, cost, draws = _rbf_sizes(nfe, problem, n, init_particles, allocation, threshold)
    T, guided = problem.num_steps, dps_beta is not None
    knobs = _rbf_knobs(n, init, rollover, allocation, threshold, dps_beta)
    state = _start(problem, nfe, generator, callback, method, knobs)
    P, shape = problem.num_prompts, problem.shape
    spent = torch.zeros(P, T, dtype=torch.long)  # NFE per prompt and grid index
    best_at = torch.full((P, T), -math.inf, dtype=torch.float64)  # best reward scored per prompt and grid index
    finals, final_rewards = [], []
    for p in range(P):
        z0 = torch.randn((n * init, *shape), generator=state.gens[p], dtype=problem.dtype, device=problem.device)
        noises = []  # the prompt's noise draws, (n, *shape) each, made when a chain first needs one

        def noise(j: int, chain: int) -> Tensor:
            while len(noises) <= j:
                noises.append(torch.randn((n, *shape), generator=state.gens[p], dtype=problem.dtype,
                                          device=problem.device))
            return noises[j][chain:chain + 1]  # (1, *shape)

        def evaluate_chain(x: Tensor, i: int) -> Evaluation:
            rows = torch.full((x.shape[0],), p, device=x.device)
            ev = _evaluate_at(problem, state.counts, x, state.grid.index(i), rows, reward=True, grad=guided,
                              prompt_cpu=torch.full((x.shape[0],), p))
            spent[p, i] += cost * x.shape[0]
            best_at[p, i] = max(float(best_at[p, i]), float(ev.reward.max()))
            return ev

        for chain in range(n):
            # the chain's start: the best of its init noises by reward(x0_hat) at t = 1 (Alg. 2: one noise)
            x = z0[chain * init:(chain + 1) * init]
            ev = evaluate_chain(x, 0)
            k = int(ev.reward.argmax())
            x, ev = x[k:k + 1], ev.take(torch.tensor([k], device=x.device))  # the anchor, (1, *shape)
            r_star = float(ev.reward[0])  # best accepted reward
            j = 0  # candidates this chain has drawn so far (it may draw `draws` in all)
            left = 0  # quota rolled over from the previous stage
            for i in range(T - 1):  # stage i: the anchor at grid index i, candidates at grid index i + 1
                last = i == T - 2
                stage_quota = draws - j if last else Q + left  # the last stage spends all that is left
                assert stage_quota <= draws - j, "the quota never asks for more than the chain has left"
                best_x, best_ev = None, None  # the stage's best candidate
                accepted = False
                for q in range(stage_quota):
                    z = noise(j, chain) if problem.g is not None else None
                    cand = _propose(state, x, ev, i, 1, dps_beta, noise=z)
                    cand_ev = evaluate_chain(cand, i + 1)
                    j += 1
                    r = float(cand_ev.reward[0])
                    if best_ev is None or r > float(best_ev.reward[0]):
                        best_x, best_ev = cand, cand_ev
                    if allocation == "rollover" and r > r_star:  # beats the best accepted reward
                        r_star, accepted = r, True
                    elif allocation == "threshold" and r >= threshold:  # passes the threshold
                        accepted = True
                    if accepted and not last:
                        break
                    if accepted and allocation == "threshold":  # at the last stage: the chain ends here
                        break
                left = stage_quota - (q + 1) if (accepted and rollover) else 0
                x, ev = best_x, best_ev  # accepted or not, the stage's best candidate (Alg. 2 line 9)
            finals.append(ev.x0_hat)
            final_rewards.append(ev.reward)
    for i in range(T):
        state.trace.append(StepInfo(i, state.times[i], spent[:, i].clone(), best_at[:, :i + 1].amax(1)))
        if callback is not None:
            callback(state.trace[-1])
    return _result(state, method, knobs | {"quota": Q}, torch.cat(finals), torch.cat(final_rewards))


# -----------------------------------------------------------------------------------------------
# 8. Dispatch by name, and the smallest budget of every configuration


def _function(method: str) -> Callable[..., SearchResult]:
    if method == "none":
        return plain
    elif method == "bon":
        return best_of_n
    elif method == "sop":
        return search_over_paths
    elif method == "smc":
        return smc
    elif method == "code":
        return code
    elif method in ("svdd", "svdd+dps"):
        return svdd
    elif method in ("rbf", "rbf+dps"):
        return rbf
    elif method == "dps":
        return dps
    raise ValueError(f"unknown search method {method!r}; choose one of {', '.join(METHODS)}")


def _knobs(method: str, knobs: dict) -> dict:
    """Check knob names against the method's signature; the '+dps' names switch guidance on."""
    fn = _function(method)
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("problem", "nfe", "generator", "callback")]
    if method.endswith("+dps"):
        if "dps_beta" in knobs and knobs["dps_beta"] is None:  # None would switch the guidance off
            raise ValueError(f"{method} needs dps_beta > 0 (leave it out for the default {DPS_BETA}); "
                             f"dps_beta=None is the unguided {method[:-4]!r}")
        knobs = {"dps_beta": DPS_BETA} | knobs
    elif method in ("svdd", "rbf") and knobs.get("dps_beta") is not None:
        raise ValueError(f"dps_beta switches on guidance: use method {method + '+dps'!r}")
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown knob(s) {unknown} for {method}; it takes {allowed}")
    return knobs


def run(method: str, problem: Problem, nfe: int, *, generator: torch.Generator, callback=None,
        **knobs) -> SearchResult:
    """Run a search by name: one of METHODS ("svdd+dps" / "rbf+dps" = svdd / rbf with DPS guidance)."""
    return _function(method)(problem, _budget(nfe), generator=generator, callback=callback, **_knobs(method, knobs))


def min_nfe(method: str, problem: Problem, **knobs) -> int:
    """The smallest budget per prompt with which `method` runs in this configuration (sizes left to the
    budget count as 1). A smaller `nfe` makes every method raise ValueError naming this number."""
    params = inspect.signature(_function(method)).parameters
    knobs = {name: params[name].default for name in params if params[name].kind == params[name].KEYWORD_ONLY} | \
        _knobs(method, knobs)
    T, e = problem.num_steps, problem.lookahead_nfe  # e: extra NFE of one scored particle

    def size(name: str) -> int:
        return _positive(method, name, knobs[name])

    if method == "none":
        return T + e
    elif method == "bon":
        return size("n") * (T + e)
    elif method == "smc":
        return size("n") * T * (1 + e)
    elif method == "dps":
        return size("n") * T
    elif method == "sop":
        S = len(_sop_schedule(knobs["t_start"], knobs["delta_f"], knobs["delta_b"]))
        return size("n") * (1 + S * size("k")) * size("ode_steps") + size("n") * size("k") * S * e
    elif method in ("code", "svdd", "svdd+dps"):
        return size("n") * (1 + size("k") * _child_cost(problem, size("block") if method == "code" else 1))
    return size("n") * (size("init_particles") + (T - 1)) * (1 + e)  # rbf, rbf+dps


def _positive(method: str, name: str, value) -> int:
    if value is None:
        return 1
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{method}: knob {name} must be an int >= 1, got {value!r}")
    return int(value)
