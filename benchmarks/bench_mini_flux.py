"""
Speed of the embedded mini-FLUX pipeline (not a test: the numbers go into the README).

    python benchmarks/bench_mini_flux.py [--threads 2] [--repeats 5]

1. Velocity evaluations per second (NFE/s) of the pipeline's velocity function at batch sizes
   1..64, eager, no_grad, with the network in bf16 (the default, as the release is run) and in
   float32, side by side in one process: what every search method spends its budget on.
2. Search overhead at 500 NFE: the share of a search's wall time spent outside the velocity and
   reward calls (bookkeeping, proposals, Tweedie, selection), for BoN, SVDD and RBF on one prompt.
3. Wall time of `python flowscale.py demo` (the default settings), measured in-process.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flowscale  # noqa: E402
import search  # noqa: E402


def nfe_per_second(pipe, batch_sizes, repeats: int) -> list[tuple[int, float, float]]:
    cond = flowscale.encode_prompts(pipe, ["three red circles and one blue square"])
    velocity = flowscale.make_velocity(pipe, cond)
    rows = []
    for B in batch_sizes:
        x = torch.randn(B, *pipe.latent_shape)
        t = torch.full((B,), 0.5)
        prompt = torch.zeros(B, dtype=torch.long)
        with torch.no_grad():
            velocity(x, t, prompt)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                velocity(x, t, prompt)
                times.append(time.perf_counter() - start)
        ms = 1000 * float(np.median(times))
        rows.append((B, ms, B / (ms / 1000)))
    return rows


def search_overhead(pipe, method: str, dynamics: str, nfe: int = 500) -> tuple[float, float]:
    """(wall seconds, fraction outside velocity and reward calls) of one search on one prompt."""
    reward = flowscale.R.get_reward("counting")
    cond = flowscale.encode_prompts(pipe, ["three red circles and one blue square"])
    problem = flowscale.make_problem(pipe, cond, reward, dynamics=dynamics)
    inner = {"seconds": 0.0}

    def timed(fn):
        def wrapper(*args):
            start = time.perf_counter()
            out = fn(*args)
            inner["seconds"] += time.perf_counter() - start
            return out
        return wrapper

    problem.velocity = timed(problem.velocity)
    problem.reward = timed(problem.reward)
    start = time.perf_counter()
    search.run(method, problem, nfe, generator=torch.Generator().manual_seed(0))
    wall = time.perf_counter() - start
    return wall, 1 - inner["seconds"] / wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = flowscale.load_pipeline()
    pipe32 = flowscale.load_pipeline(dtype=torch.float32)
    print(f"model: {pipe.name}")
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}\n")

    print("| batch | bf16 ms / call | bf16 NFE / s | float32 ms / call | float32 NFE / s | bf16 / float32 |\n"
          "|---|---|---|---|---|---|")
    batches = [1, 2, 4, 8, 16, 32, 64]
    for B in batches:   # alternating per batch size, so both dtypes see the same machine load
        (_, ms, rate), = nfe_per_second(pipe, [B], args.repeats)
        (_, ms32, rate32), = nfe_per_second(pipe32, [B], args.repeats)
        print(f"| {B} | {ms:.1f} | {rate:.0f} | {ms32:.1f} | {rate32:.0f} | {rate / rate32:.2f}x |")

    print("\n| method (500 NFE, 1 prompt) | wall s | overhead outside velocity + reward |\n|---|---|---|")
    for method, dynamics in [("bon", "linear-ode"), ("svdd", "vp-sde"), ("rbf", "vp-sde")]:
        wall, overhead = search_overhead(pipe, method, dynamics)
        print(f"| {method} ({dynamics}) | {wall:.2f} | {100 * overhead:.1f}% |")

    if not args.skip_demo:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            flowscale.main(["demo", "--out", out])
            print(f"\ndemo wall time (default settings): {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
