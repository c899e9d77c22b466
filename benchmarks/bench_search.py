"""The search algorithms' own overhead: everything but velocity and reward calls, as a share of wall time.

    python benchmarks/bench_search.py                  # every method at 500 NFE, one prompt
    python benchmarks/bench_search.py --ms 5 --runs 5  # a costlier velocity, more repetitions
    python benchmarks/bench_search.py --methods rbf,rbf+dps --allocation uniform --lookahead ode:2
    python benchmarks/bench_search.py --embedded --threads 2 --methods none,bon,rbf  # on the embedded model
    python benchmarks/bench_search.py --floor          # what one RBF draw's arithmetic alone costs

The velocity is a per-token MLP (64 -> hidden -> 64 on a (16, 64) latent, applied `repeat` times),
calibrated so that one call on 2 rows (RBF's and SVDD's smallest calls) costs at least `--ms`
milliseconds; larger calls cost proportionally more, like a network. The reward is a cheap
differentiable function of x0_hat. Velocity forward, reward forward, and (for the dps methods) their
backward passes are timed (the backward passes with tensor hooks at their start and end); what is
left of the wall time is the search's own work: noise, SDE steps, the Linear -> VP conversion
arithmetic, Tweedie, selection, weights and bookkeeping. Each method runs with its paper dynamics
(BoN and SoP on the linear ODE, the others on VP-SDE) and default knobs; the median of `--runs`
runs is reported. The last three columns are the search's own split, SearchResult.seconds (velocity
calls, reward calls, the rest), which should agree with the hooks' "model" column.

This is a benchmark, not a test: the numbers depend on the machine and on what else runs on it.
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import search  # noqa: E402


class Clock:
    """Accumulates the seconds spent in velocity and reward work, forward and backward."""

    def __init__(self):
        self.model = 0.0
        self._start = 0.0

    def begin(self, *_):
        self._start = time.perf_counter()

    def end(self, *_):
        self.model += time.perf_counter() - self._start


def make_problem(clock: Clock, hidden: int, repeat: int, dynamics: str, lookahead: str = "tweedie",
                 num_steps: int = 10) -> search.Problem:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 64))
    mlp.requires_grad_(False)
    target = torch.randn(16, 64)

    def velocity(x, t, prompt):  # x (B, 16, 64), t (B,)
        clock.begin()
        u = x
        for _ in range(repeat):
            u = u + 0.1 * torch.tanh(mlp(u)) * t[:, None, None]  # bounded, so any depth stays finite
        clock.end()
        if x.requires_grad:  # time the backward through the network too, from dL/du to dL/dx
            u.register_hook(lambda g: clock.begin())
            x.register_hook(lambda g: clock.end())
        return u - x

    def reward(x0, prompt):  # (B, 16, 64) -> (B,)
        clock.begin()
        r = -((x0 - target) ** 2).mean(dim=(1, 2))
        clock.end()
        if x0.requires_grad:
            r.register_hook(lambda g: clock.begin())
            x0.register_hook(lambda g: clock.end())
        return r

    return search.Problem(velocity, reward, (16, 64), reward_name="distance", differentiable=True,
                          dynamics=dynamics, lookahead=lookahead, num_steps=num_steps)


def calibrate(hidden: int, ms: float) -> int:
    """Smallest `repeat` such that a 2-row velocity call costs at least `ms` milliseconds (median of 20)."""
    clock = Clock()
    for repeat in range(1, 1000):
        pb = make_problem(clock, hidden, repeat, "linear-ode")
        x, t, p = torch.randn(2, 16, 64), torch.rand(2), torch.zeros(2, dtype=torch.long)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            pb.velocity(x, t, p)
            times.append(time.perf_counter() - start)
        if 1e3 * statistics.median(times) >= ms:
            return repeat
    raise RuntimeError("could not reach the requested cost")


def draw_floor(compiled: bool, draws: int = 3000) -> float:
    """Microseconds of the bare arithmetic one RBF draw on the VP-SDE cannot skip, on 2 rows of (16, 64):
    the noise, the Euler-Maruyama step (Eq. 12), the map to the model's linear path and back for its
    call (Eqs. 10-11), Tweedie's x0_hat (Eq. 19), a stand-in reward, and the keep-if-better select;
    no bookkeeping, no checks. What a draw costs beyond this is the search's own work."""
    import sde

    g = torch.Generator().manual_seed(0)
    x, u = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    t = torch.full((2,), 0.5)
    path = sde.VPInterpolant()
    c, conv = path(t), sde.conversion_coeffs(t, sde.LinearInterpolant(), path)
    col = lambda a: a.view(-1, 1, 1)  # noqa: E731  (2,) -> (2, 1, 1)
    g_t, dt = col(3 * t ** 2), col(torch.full((2,), 0.1))
    best = torch.full((2,), -1e9)

    def draw(x, u, z):
        x_next = sde.euler_maruyama(x, u, c, g_t, dt, z)
        x_lin = sde.to_source(x_next, conv)  # what the velocity call would read
        u_next = sde.target_velocity(u, x_next, conv)  # from its output
        x0_hat = sde.x0_hat_from_velocity(u_next, x_next, c)
        r = -(x0_hat ** 2).flatten(1).sum(1) + 0 * x_lin[:, 0, 0]
        better = r > best
        return torch.where(better.view(-1, 1, 1), x_next, x), torch.where(better, r, best)

    f = torch.compile(draw) if compiled else draw
    for _ in range(200):  # warm-up (and, compiled, the compilation)
        f(x, u, torch.randn(x.shape, generator=g))
    start = time.perf_counter()
    for _ in range(draws):
        f(x, u, torch.randn(x.shape, generator=g))
    return 1e6 * (time.perf_counter() - start) / draws


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--nfe", type=int, default=500, help="budget per prompt")
    parser.add_argument("--ms", type=float, default=1.0, help="minimum cost of one 2-row velocity call")
    parser.add_argument("--hidden", type=int, default=512, help="MLP width")
    parser.add_argument("--runs", type=int, default=3, help="repetitions per method (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--methods", default=",".join(search.METHODS), help="comma list of search.METHODS")
    parser.add_argument("--allocation", default="rollover", help="rbf / rbf+dps: " + " | ".join(search.ALLOCATIONS))
    parser.add_argument("--lookahead", default="tweedie", help="tweedie | ode:K (methods with dps: tweedie only)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps T (the plain sampler spends T NFE)")
    parser.add_argument("--floor", action="store_true",
                        help="only the bare arithmetic of one RBF VP-SDE draw (draw_floor), eager and torch.compile'd")
    parser.add_argument("--embedded", action="store_true",
                        help="instead of the synthetic velocity: the embedded mini-FLUX.1-schnell on one hard held-out "
                             "counting prompt (given reward -RSS; the dps methods: the learned counter)")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if any(m not in search.METHODS for m in methods) or args.allocation not in ("rollover", "uniform"):
        parser.error(f"--methods takes {', '.join(search.METHODS)}; --allocation rollover or uniform "
                     f"(threshold needs a reward level of this synthetic reward)")
    search.lookahead_steps(args.lookahead)
    torch.set_num_threads(args.threads)
    if args.floor:
        eager = statistics.median(draw_floor(False) for _ in range(args.runs))
        compiled = statistics.median(draw_floor(True) for _ in range(args.runs))
        print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
              f"the bare arithmetic of one RBF VP-SDE draw, median of {args.runs}: eager {eager:.0f} us, "
              f"torch.compile {compiled:.0f} us; as a share of a draw with a {args.ms:g} ms velocity call: "
              f"{100 * eager / (eager + 1e3 * args.ms):.1f}% eager, {100 * compiled / (compiled + 1e3 * args.ms):.1f}% compiled")
        return
    if args.embedded:
        embedded(args, methods)
        return
    repeat = calibrate(args.hidden, args.ms)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
          f"velocity: {repeat} x MLP 64-{args.hidden}-64 on (16, 64) latents, >= {args.ms} ms per 2-row call\n")
    print(f"lookahead {args.lookahead}, rbf allocation {args.allocation}\n")
    print("| method | dynamics | NFE used | velocity calls | wall ms | model ms | overhead ms | overhead % "
          "| overhead us / NFE | seconds: velocity ms | reward ms | other ms (%) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for method in methods:
        dynamics = "linear-ode" if method in ("bon", "sop") else "vp-sde"
        lookahead = "tweedie" if method.endswith("dps") else args.lookahead
        knobs = {"allocation": args.allocation} if method in ("rbf", "rbf+dps") else {}
        rows = []
        for _ in range(args.runs):
            clock = Clock()
            pb = make_problem(clock, args.hidden, repeat, dynamics, lookahead, args.steps)
            calls = [0]
            velocity = pb.velocity

            def counted(x, t, p, velocity=velocity):
                calls[0] += 1
                return velocity(x, t, p)

            pb.velocity = counted
            start = time.perf_counter()
            res = search.run(method, pb, args.nfe, generator=torch.Generator().manual_seed(0), **knobs)
            wall = time.perf_counter() - start
            rows.append((wall, clock.model, int(res.nfe_used[0]), calls[0], res.seconds))
        wall, model = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        over = wall - model
        nfe, calls = rows[0][2], rows[0][3]
        sv, sr, so = (statistics.median(r[4][k] for r in rows) for k in ("velocity", "reward", "other"))
        print(f"| {method} | {dynamics} | {nfe} | {calls} | {1e3 * wall:.0f} | {1e3 * model:.0f} | {1e3 * over:.1f} | "
              f"{100 * over / wall:.1f} | {1e6 * over / nfe:.0f} | {1e3 * sv:.0f} | {1e3 * sr:.1f} | "
              f"{1e3 * so:.1f} ({100 * so / (sv + sr + so):.1f}) |")


def embedded(args, methods: list[str]) -> None:
    """The split of SearchResult.seconds (velocity calls, reward calls, the rest) on the embedded model."""
    import flowscale

    pipe = flowscale.load_pipeline()
    prompts = flowscale.heldout_prompts("counting", 1, split="hard")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
          f"embedded mini-FLUX.1-schnell (bf16), prompt {prompts[0]!r}, lookahead {args.lookahead}, "
          f"rbf allocation {args.allocation}\n")
    print("| method | dynamics | NFE used | wall s | velocity s | reward s | other s | other % |")
    print("|---|---|---|---|---|---|---|---|")
    for method in methods:
        dynamics = "linear-ode" if method in ("bon", "sop") else "vp-sde"
        reward = "learned-counter" if method in search.DPS_METHODS else "counting"
        lookahead = "tweedie" if method.endswith("dps") else args.lookahead
        knobs = {"allocation": args.allocation} if method in ("rbf", "rbf+dps") else {}
        runs = [flowscale.generate(pipe, prompts, method=method, dynamics=dynamics, nfe=args.nfe,
                                   num_steps=args.steps, reward=reward, seed=0, lookahead=lookahead, **knobs)
                for _ in range(args.runs)]
        sv, sr, so = (statistics.median(g.result.seconds[k] for g in runs) for k in ("velocity", "reward", "other"))
        wall = sv + sr + so
        print(f"| {method} | {dynamics} | {runs[0].nfe_used[0]} | {wall:.2f} | {sv:.2f} | {sr:.2f} | {so:.2f} | "
              f"{100 * so / wall:.1f} |")


if __name__ == "__main__":
    main()
