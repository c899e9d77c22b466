"""The 2-D toy of DAS (Kim, Kim, Park, ICLR 2025, "Test-time alignment of diffusion models without reward
over-optimization", their notebooks/GMM.ipynb), with the project's exact mixture flow as the model.

    python benchmarks/das_toy.py                     # every method at 2000 NFE, 64 searches each
    python benchmarks/das_toy.py --nfe 500 --runs 32

Data: 9 equally weighted Gaussians, means {-4, 0, 4}^2, covariance 0.3 I. Reward r(x) = -x1^2 / 100 - x2^2,
temperature beta = 1: the target is p0(x) exp(r(x)) / Z. Both are Gaussian in each coordinate, so the
target is again a 9-component mixture in closed form (`tilted_target`): per coordinate d with
a_d = 1/100, 1 and prior N(m_d, s^2), the tilt exp(-a_d x_d^2) gives N(m_d / (1 + 2 a_d s^2), s^2 / (1 + 2 a_d s^2))
with mass exp(-a_d m_d^2 / (1 + 2 a_d s^2)) / sqrt(1 + 2 a_d s^2). The modes with m2 = +-4 keep e^-10 of their
weight: the target has three modes, (-4, 0), (0, 0), (4, 0).

Sampling: Linear-SDE (g = 3 t^2), 50 steps on the uniform grid, so that the returned x0_hat at
t_{T-1} = 0.02 is a sample, not a blur (Tweedie at the exp grid's last time would return points
between the modes, whose reward is higher than any sample's: r is concave). SMC and DPS run at the
target's temperature beta = 1; the other methods are maximisers with their default knobs.
Reported per method: the mean reward of the returned samples over `--runs` independent searches (one
per prompt), and their mode weights (nearest mean). For SMC also its weighted particles, which
approximate the target itself. This is a benchmark, not a test: tests/test_search.py runs the
SMC and base checks with fixed seeds.
"""

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sde  # noqa: E402
import search  # noqa: E402

MEANS = torch.tensor([[a, b] for b in (4.0, 0.0, -4.0) for a in (-4.0, 0.0, 4.0)], dtype=torch.float64)  # (9, 2)
VAR0 = 0.3  # covariance 0.3 I of every component
A = torch.tensor([1 / 100, 1.0], dtype=torch.float64)  # r(x) = -sum_d A_d x_d^2
BETA = 1.0
TARGET_MODES = (3, 4, 5)  # (-4, 0), (0, 0), (4, 0)
FLOW = sde.GaussianMixtureFlow(MEANS, torch.full((9,), math.sqrt(VAR0), dtype=torch.float64),
                               torch.full((9,), 1 / 9, dtype=torch.float64))


def reward(x0: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
    return -(x0**2 * A.to(x0)).sum(-1)


def base_mean_reward() -> float:
    """E[r(x0)] under the data: -sum_d A_d (m_d^2 + s^2), averaged over the 9 modes (-11.08)."""
    return float(-((MEANS**2 + VAR0) * A).sum(1).mean())


def tilted_target() -> tuple[float, torch.Tensor]:
    """The target p0 exp(r / beta) / Z in closed form: its mean reward (-0.290) and its mode weights (9,)."""
    shrink = 1 + 2 * A * VAR0 / BETA  # (2,): precision of the tilted coordinate, relative to the prior's
    mean, var = MEANS / shrink, VAR0 / shrink  # (9, 2), (2,)
    log_mass = (-A * MEANS**2 / (BETA * shrink) - 0.5 * torch.log(shrink)).sum(1)  # (9,) log Z_k (equal w_k)
    weights = torch.softmax(log_mass, 0)
    mode_reward = -(A * (mean**2 + var)).sum(1)  # (9,) E[r] under each tilted component
    return float((weights * mode_reward).sum()), weights


def problem(num_prompts: int) -> search.Problem:
    return search.Problem(lambda x, t, p: FLOW.velocity(x, t), reward, (2,), num_prompts=num_prompts,
                          reward_name="das-toy", differentiable=True, dynamics="linear-sde", num_steps=50,
                          time_grid="uniform", dtype=torch.float64, max_batch=1 << 16)


def mode_weights(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weights (9,) of the nearest modes of the samples x (N, 2) (each 1 / N, or the given weights (N,))."""
    nearest = torch.cdist(x, MEANS).argmin(1)  # (N,)
    w = torch.full((x.shape[0],), 1 / x.shape[0], dtype=x.dtype) if weights is None else weights
    return torch.zeros(9, dtype=x.dtype).index_add(0, nearest, w)


def smc_estimate(nfe: int, runs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SMC at the target's temperature: per run, the weighted mean reward of its final particles (runs,)
    and its weighted mode weights (runs, 9)."""
    res = search.smc(problem(runs), nfe, generator=torch.Generator().manual_seed(seed), beta=BETA)
    w = res.log_weights.exp()  # (runs, n)
    means = (w * res.particle_rewards).sum(1)
    modes = torch.stack([mode_weights(res.particles[p], w[p]) for p in range(runs)])
    return means, modes


def run_method(method: str, nfe: int, runs: int, seed: int) -> search.SearchResult:
    knobs = {"beta": BETA} if method in ("smc", "dps") else {}
    return search.run(method, problem(runs), nfe, generator=torch.Generator().manual_seed(seed), **knobs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nfe", type=int, default=2000, help="budget per search")
    parser.add_argument("--runs", type=int, default=64, help="independent searches per method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    target, target_modes = tilted_target()

    def modes(w: torch.Tensor) -> str:  # the three target modes' weights, then the rest's
        rest = float(1 - w[list(TARGET_MODES)].sum())
        return " / ".join(f"{float(w[k]):.2f}" for k in TARGET_MODES) + f" / {rest:.2f}"

    print(f"target (closed form): mean reward {target:.4f}, mode weights {modes(target_modes)}; "
          f"base (data): {base_mean_reward():.4f}\n")
    print(f"{args.nfe} NFE per search, {args.runs} searches per method, Linear-SDE, 50 uniform steps\n")
    print("| method | mean reward of the returned samples | mode weights (-4,0) / (0,0) / (4,0) / other | "
          "wall s (velocity / reward / other) |")
    print("|---|---|---|---|")
    print(f"| target (closed form) | {target:.3f} | {modes(target_modes)} | |")
    smc_means, smc_modes = smc_estimate(args.nfe, args.runs, args.seed)
    se = float(smc_means.std() / math.sqrt(args.runs))
    print(f"| SMC weighted particles (beta = 1) | {float(smc_means.mean()):.3f} ± {se:.3f} | "
          f"{modes(smc_modes.mean(0))} | |")
    for method in search.METHODS:
        res = run_method(method, args.nfe, args.runs, args.seed)
        r = res.reward
        s = res.seconds
        name = method + (" (beta = 1)" if method in ("smc", "dps") else "")
        print(f"| {name} | {float(r.mean()):.3f} ± {float(r.std() / math.sqrt(args.runs)):.3f} | "
              f"{modes(mode_weights(res.x0))} | {s['velocity']:.2f} / {s['reward']:.2f} / {s['other']:.2f} |")


if __name__ == "__main__":
    main()
