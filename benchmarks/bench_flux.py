"""Speed and memory of model.Flux against diffusers' FluxTransformer2DModel (CPU, float32).

    python benchmarks/bench_flux.py                 # eager forward: ours vs diffusers, same weights
    python benchmarks/bench_flux.py --compile       # + torch.compile(ours): parity and speed-up
    python benchmarks/bench_flux.py --memory-mb 0   # skip the checkpoint-loading memory test

Speed: hidden 512 (4 heads x 128 by default, `--heads 8` for 8 x 64), 4 double + 8 single blocks,
1024 image tokens (a 64 x 64 latent), 64 text tokens, batch 1, dev-style guidance input. The two
models get the same random weights (diffusers' model is saved and read back by `load_flux`) and
are timed alternately; the median of `--runs` calls is reported.

Memory: a random checkpoint of about `--memory-mb` MB is written to a temporary folder (as a BFL
single file and as a diffusers folder) and loaded by `load_flux` in a fresh subprocess; the peak
resident set size (VmHWM, i.e. ru_maxrss) minus the baseline after imports is compared with the
file size S.
Safetensors files are memory-mapped, so pages count only once they are read.

This is a benchmark, not a test: the numbers depend on the machine and on what else runs on it.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoints  # noqa: E402
import model  # noqa: E402


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def interleaved_medians(fns: dict, runs: int) -> dict:
    """Median ms of each function, calling them in turn so that machine load hits all alike."""
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def speed(args) -> None:
    from diffusers import FluxTransformer2DModel

    head_dim = 512 // args.heads
    axes = {128: (16, 56, 56), 64: (8, 28, 28)}[head_dim]
    torch.manual_seed(0)
    theirs = FluxTransformer2DModel(in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=head_dim,
                                    num_attention_heads=args.heads, joint_attention_dim=4096,
                                    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=axes).eval()
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = checkpoints.load_flux(folder)

    g = torch.Generator().manual_seed(0)
    B, H, W, L_txt = 1, 64, 64, 64
    x = dict(img=model.pack(torch.randn(B, 16, H, W, generator=g)), img_ids=model.image_ids(B, H, W),
             txt=torch.randn(B, L_txt, 4096, generator=g), txt_ids=model.text_ids(B, L_txt),
             timesteps=torch.full((B,), 0.7), y=torch.randn(B, 768, generator=g), guidance=torch.full((B,), 3.5))

    def run_ours():
        return ours(**x)

    def run_theirs():
        return theirs(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                      timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                      guidance=x["guidance"]).sample

    with torch.inference_mode():
        diff = (run_ours() - run_theirs()).abs().max().item()
        for _ in range(args.warmup):
            run_ours(), run_theirs()
        t = interleaved_medians({"ours": run_ours, "diffusers": run_theirs}, args.runs)
    print(f"\n## Forward, CPU float32: hidden 512 = {args.heads} heads x {head_dim}, 4 double + 8 single blocks, "
          f"{H * W // 4} image + {L_txt} text tokens, batch {B}; median of {args.runs}")
    print(f"{'':12} {'ms / forward':>14}")
    print(f"{'model.Flux':12} {t['ours']:14.1f}")
    print(f"{'diffusers':12} {t['diffusers']:14.1f}")
    print(f"ratio ours / diffusers = {t['ours'] / t['diffusers']:.3f}   (max |ours - diffusers| = {diff:.1e})")

    if args.compile:
        # Inductor leaves the complex multiply of RoPE (apply_rope) to the eager kernel, and says so.
        warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
        compiled = torch.compile(ours)
        with torch.inference_mode():
            start = time.perf_counter()
            out = compiled(**x)
            first = time.perf_counter() - start
            parity = (out - run_ours()).abs().max().item()
            for _ in range(args.warmup):
                compiled(**x)
            t = interleaved_medians({"eager": run_ours, "compiled": lambda: compiled(**x)}, args.runs)
        print(f"\n## torch.compile(model.Flux), inductor, same inputs; median of {args.runs}")
        print(f"first call (compilation) {first:.1f} s; max |compiled - eager| = {parity:.1e}")
        print(f"eager {t['eager']:.1f} ms, compiled {t['compiled']:.1f} ms, speed-up {t['eager'] / t['compiled']:.2f}x")


def write_checkpoints(folder: Path, megabytes: int) -> tuple[Path, Path]:
    """A random Flux of about `megabytes` MB (float32), as a BFL file and as a diffusers folder."""
    D = 1024
    per_double, per_single = 36 * D * D * 4, 15 * D * D * 4  # bytes of one block, roughly
    double = max(1, round(megabytes * 2**20 * 0.7 / per_double))
    single = max(1, round((megabytes * 2**20 - double * per_double) / per_single))
    params = model.FluxParams(in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=D, mlp_ratio=4.0,
                              num_heads=8, depth=double, depth_single_blocks=single, axes_dim=(16, 56, 56),
                              theta=10_000, qkv_bias=True, guidance_embed=True)
    with torch.device("meta"):
        net = model.Flux(params)
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    from safetensors.torch import save_file
    bfl_file = folder / "flux1-bench.safetensors"
    save_file(net.state_dict(), str(bfl_file))
    (folder / "config.json").write_text(json.dumps({"axes_dim": [16, 56, 56]}))
    checkpoints.save_flux(net, folder / "transformer")
    return bfl_file, folder / "transformer"


def load_in_child(path: str, dtype: str) -> None:
    """Runs in a fresh interpreter: peak RSS of load_flux, then after reading every weight once."""
    def status_mb(key: str) -> float:
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(status[key].split()[0]) / 1024

    # VmHWM is the peak RSS that ru_maxrss reports, but ru_maxrss also carries the parent's peak
    # over fork + exec; writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline, anon0 = status_mb("VmHWM"), status_mb("RssAnon")
    start = time.perf_counter()
    net = checkpoints.load_flux(path, dtype=getattr(torch, dtype) if dtype else None)
    seconds = time.perf_counter() - start
    after_load, anon_load = status_mb("VmHWM"), status_mb("RssAnon")
    with torch.no_grad():
        sum(p.float().sum() for p in net.parameters())
    after_touch = status_mb("VmHWM")
    print(json.dumps(dict(load=after_load - baseline, touched=after_touch - baseline, anon=anon_load - anon0,
                          seconds=seconds)))


def memory(args) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        bfl_file, diffusers_folder = write_checkpoints(Path(tmp), args.memory_mb)
        size_mb = bfl_file.stat().st_size / 2**20
        print(f"\n## Peak RSS of load_flux in a subprocess, checkpoint S = {size_mb:.0f} MB (float32); "
              f"VmHWM (= ru_maxrss) minus the baseline after imports")
        print(f"{'layout':36} {'load s':>7} {'peak MB':>8} {'/ S':>6} {'anon MB':>8} {'peak after reading all':>23}")
        for label, path, dtype in [("BFL single file", bfl_file, ""),
                                   ("diffusers folder (converted)", diffusers_folder, ""),
                                   ("BFL single file, dtype=bfloat16", bfl_file, "bfloat16")]:
            out = subprocess.run([sys.executable, __file__, "--_load-child", str(path), dtype], check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{label:36} {r['seconds']:7.2f} {r['load']:8.0f} {r['load'] / size_mb:6.2f} {r['anon']:8.0f} "
                  f"{r['touched']:14.0f} ({r['touched'] / size_mb:.2f} S)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="timed calls per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per model first")
    parser.add_argument("--heads", type=int, default=4, choices=[4, 8], help="4 x 128 or 8 x 64 channels")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model.Flux)")
    parser.add_argument("--memory-mb", type=int, default=400, help="checkpoint size for the memory test (0: skip)")
    parser.add_argument("--_load-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._load_child:
        return load_in_child(*args._load_child)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# bench_flux: torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
          f"({platform.machine()}), load average {load}")
    speed(args)
    if args.memory_mb:
        memory(args)


if __name__ == "__main__":
    main()
