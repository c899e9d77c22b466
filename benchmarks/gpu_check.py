"""
gpu_check: does flowscale run right on this GPU? About a minute, no downloads.

    python benchmarks/gpu_check.py                  # --device cuda (or cuda:N, mps)
    python benchmarks/gpu_check.py --device cpu     # a dry run of the same steps on the CPU

It writes tiny random FLUX.1-schnell and FLUX.1-dev repositories in the release layout (the ones the
tests use, tests/tiny.py), then, for each:

  1. parity: the pipeline's velocity on --device against the CPU in float32, for the same latents,
     times and prompt, in float32 and in bfloat16 (relative max error; the bf16 bound is a multiple of
     what bf16 costs on the CPU itself, measured here);
  2. speed and memory: NFE/s of the velocity for a batch of latents, and the peak memory of the device
     (CUDA only); a tiny model, so this checks the path, not FLUX.1's speed (see the README's table);
  3. end to end: `flowscale.py generate --device ... --dtype bfloat16` with RBF on VP-SDE and the toy plugin
     reward of examples/reward_plugin.py, which must write image.png and result.json.

Exit code 0 when every check passes, 1 otherwise. Not a test: the CI machine has no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))
import flowscale  # noqa: E402
from tiny import write_repo  # noqa: E402

PROMPT = "a photo of a cat"
TOLERANCE_FP32 = 1e-3  # relative; kernels of another device sum in another order (and CUDA convs use TF32)
BF16_FACTOR, BF16_FLOOR = 4.0, 2e-2  # bf16 on the device vs the CPU's fp32: within 4x the CPU's own bf16 error


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()
def velocity_of(folder: Path, size: int, device, dtype, x: torch.Tensor, t: torch.Tensor):
    pipe = flowscale.load_pipeline(folder, height=size, width=size, device=device, dtype=dtype)
    velocity = flowscale.make_velocity(pipe, flowscale.encode_prompts(pipe, [PROMPT]))
    prompt = torch.zeros(x.shape[0], dtype=torch.long, device=pipe.device)
    return pipe, velocity, velocity(x.to(pipe.device), t.to(pipe.device), prompt).float().cpu()


@torch.no_grad()
def speed(pipe, velocity, batch: int, calls: int) -> tuple[float, float | None]:
    """NFE/s of the velocity for `batch` latents a call, and the peak device memory in GB (CUDA)."""
    device = pipe.device
    x = torch.randn(batch, *pipe.latent_shape, device=device)
    t = torch.full((batch,), 0.5, device=device)
    prompt = torch.zeros(batch, dtype=torch.long, device=device)
    velocity(x, t, prompt)  # warm-up (kernel selection, caches)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(calls):
        velocity(x, t, prompt)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return batch * calls / seconds, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="flowscale on this GPU: parity, speed, memory, generate")
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | mps | cpu (a dry run)")
    parser.add_argument("--size", type=int, default=256, help="image side (256: 256 image tokens, as FLUX at 256^2)")
    parser.add_argument("--batch", type=int, default=4, help="latents per velocity call for NFE/s")
    parser.add_argument("--out", default=None, help="folder for the repositories and outputs (default: a temporary one)")
    args = parser.parse_args(argv)
    try:
        device = flowscale.resolve_device(args.device)
    except ValueError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    if device.type == "cpu":
        print("gpu_check: --device cpu: a dry run (the parity is CPU against CPU)", file=sys.stderr)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="flowscale-gpu-check-"))
    ok = True
    torch.manual_seed(0)
    for seed, variant in ((0, "schnell"), (10, "dev")):
        folder = root / f"FLUX.1-{variant}"
        if not (folder / "model_index.json").is_file():
            write_repo(folder, variant, seed, f8=True)  # FLUX.1's 8x autoencoder for both
        shape = flowscale.load_pipeline(folder, height=args.size, width=args.size).latent_shape
        x, t = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1)), torch.tensor([0.9, 0.3])
        _, _, u_ref = velocity_of(folder, args.size, "cpu", torch.float32, x, t)
        _, _, u_cpu16 = velocity_of(folder, args.size, "cpu", torch.bfloat16, x, t)
        bf16_bound = max(BF16_FACTOR * relative_error(u_cpu16, u_ref), BF16_FLOOR)
        _, _, u32 = velocity_of(folder, args.size, device, torch.float32, x, t)
        pipe16, velocity16, u16 = velocity_of(folder, args.size, device, torch.bfloat16, x, t)
        e32, e16 = relative_error(u32, u_ref), relative_error(u16, u_ref)
        pass32, pass16 = e32 <= TOLERANCE_FP32, e16 <= bf16_bound
        nfe_s, peak = speed(pipe16, velocity16, args.batch, calls=10)
        shift = f", time shift {pipe16.time_shift:.3f}" if pipe16.time_shift else ""
        print(f"{variant}: velocity vs CPU float32: float32 {e32:.2e} (<= {TOLERANCE_FP32:.0e}: "
              f"{'ok' if pass32 else 'FAIL'}), bfloat16 {e16:.2e} (<= {bf16_bound:.1e}: {'ok' if pass16 else 'FAIL'}); "
              f"bf16 {nfe_s:.1f} NFE/s at batch {args.batch}, {args.size}^2"
              + (f", peak {peak:.2f} GB" if peak is not None else "") + shift)
        ok &= pass32 and pass16

        out = root / f"generate-{variant}"
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # its record is read from result.json below
            code = flowscale.main(["generate", "--model", str(folder), "--device", str(device), "--dtype", "bfloat16",
                                   "--prompt", PROMPT, "--reward",
                                   f"{ROOT / 'examples' / 'reward_plugin.py'}:brightness", "--method", "rbf",
                                   "--dynamics", "vp-sde", "--nfe", "24", "--steps", "4", "--height", str(args.size),
                                   "--width", str(args.size), "--out", str(out)])
        seconds = time.perf_counter() - start
        record = json.loads((out / "result.json").read_text()) if code == 0 else {}
        passed = code == 0 and (out / "image.png").is_file() and record.get("nfe_used", 0) > 0
        print(f"{variant}: generate --device {device} --dtype bfloat16: exit {code}, "
              f"{record.get('nfe_used', '-')} NFE, reward {record.get('reward', float('nan')):.4f}, {seconds:.1f} s: "
              f"{'ok' if passed else 'FAIL'}")
        ok &= passed
    print(f"gpu_check: {'all checks passed' if ok else 'SOME CHECKS FAILED'} (files in {root})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
