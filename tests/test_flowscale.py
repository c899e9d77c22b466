"""The pipeline and the command line on the embedded mini-FLUX.1-schnell (weights/mini-flux-schnell),
the default, and mini-FLUX.1-dev (weights/mini-flux-dev).

The shipped weights are read by the same loaders as the real FLUX.1 release, so these tests also
prove that the embedded model is a genuine FLUX.1-format checkpoint (diffusers reads it too).
"""

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

import flowscale
import model as M
import toyworld

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "two red circles and one blue square"


@pytest.fixture(scope="module")
def pipe():
    return flowscale.load_pipeline()


@pytest.mark.parametrize("name", ["mini-flux-schnell", "mini-flux-dev"])
def test_embedded_models_are_flux1_folders(name):
    """Every component loads strictly from the FLUX.1 layout; the latent is 48x48 pixels rearranged;
    the network runs in bf16 (as the release), float32 on request."""
    folder = ROOT / "weights" / name
    for sub in ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert (folder / sub).is_dir(), sub
    pipe = flowscale.load_pipeline(folder)
    assert pipe.shape_world and pipe.latent_shape == (27, 16, 16)
    assert pipe.flux.params.in_channels == 108 and pipe.flux.img_in.weight.dtype == torch.bfloat16
    assert json.loads((folder / "flowscale.json").read_text())["variant"] == name.split("-")[-1]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 20e6, f"each embedded model should stay under 20 MB, it is {size / 1e6:.1f} MB"
    total = sum(p.stat().st_size for p in (ROOT / "weights").rglob("*") if p.is_file())
    assert total < 45e6, f"weights/ should stay under 45 MB, it is {total / 1e6:.1f} MB"
    assert flowscale.load_pipeline(folder, dtype=torch.float32).flux.img_in.weight.dtype == torch.float32


def test_embedded_flux_matches_diffusers(pipe):
    """diffusers' FluxTransformer2DModel reads the shipped transformer and computes the same velocity."""
    diffusers = pytest.importorskip("diffusers")
    pipe = flowscale.load_pipeline(dtype=torch.float32)  # parity in float32 (bf16 differs by rounding)
    ref = diffusers.FluxTransformer2DModel.from_pretrained(flowscale.DEFAULT_MODEL / "transformer",
                                                           torch_dtype=torch.float32).eval()
    cond = flowscale.encode_prompts(pipe, [PROMPT, "a green triangle above a yellow square"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *pipe.latent_shape, generator=g)
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        ours = flowscale.make_velocity(pipe, cond)(x, t, torch.tensor([0, 1]))
        C, H, W = pipe.latent_shape
        theirs = ref(hidden_states=M.pack(x), encoder_hidden_states=cond.txt, pooled_projections=cond.y,
                     timestep=t, img_ids=M.image_ids(1, H, W)[0], txt_ids=M.text_ids(1, cond.txt.shape[1])[0]).sample
    assert (ours - M.unpack(theirs, H, W)).abs().max() < 1e-4


def test_generate_is_seeded_and_batches_prompts(pipe):
    a = flowscale.generate(pipe, [PROMPT, "three green triangles"], method="rbf", nfe=30, seed=1)
    b = flowscale.generate(pipe, [PROMPT, "three green triangles"], method="rbf", nfe=30, seed=1)
    alone = flowscale.generate(pipe, [PROMPT], method="rbf", nfe=30, seed=1)
    assert torch.equal(a.images, b.images) and a.reward == b.reward
    assert torch.allclose(a.images[0], alone.images[0], atol=1e-5), "prompt 0 of a batch = prompt 0 alone"
    assert all(n <= 30 for n in a.nfe_used)
    assert a.images.shape == (2, 3, 48, 48) and 0 <= a.images.min() and a.images.max() <= 1
    # the given reward is the exact counting reward, so it agrees with the held-out RSS
    assert [-m["rss"] for m in a.metrics] == pytest.approx(a.reward)


def test_cli_generate_writes_image_and_json(tmp_path):
    out = tmp_path / "gen"
    code = flowscale.main(["generate", "--prompt", PROMPT, "--method", "bon", "--dynamics", "linear-ode",
                           "--nfe", "20", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "result.json").read_text())
    assert record["prompt"] == PROMPT and record["method"] == "bon" and record["nfe_used"] <= 20
    assert set(record["heldout"]) == {"rss", "accuracy", "composition", "fidelity", "counter_accuracy"}
    assert (out / "image.png").stat().st_size > 0


def test_the_script_defines_its_classes_once(capsys):
    """`python flowscale.py bench` runs experiments.py, which imports the module `flowscale`. Run as a
    script, flowscale.py hands over to that module before defining anything, so that one Pipeline class
    exists, not one in __main__ and another in flowscale."""
    script = ROOT / "flowscale.py"
    namespace = {"__name__": "__main__", "__file__": str(script)}
    argv, sys.argv = sys.argv, [str(script), "bench", "--help"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            exec(compile(script.read_text(), str(script), "exec"), namespace)
    finally:
        sys.argv = argv
    assert exit_info.value.code == 0 and "--allocation" in capsys.readouterr().out  # bench's own --help ran
    assert "Pipeline" not in namespace and "main" not in namespace


@pytest.mark.parametrize("args, message", [
    (["--method", "best"], "unknown method"),
    (["--dynamics", "vp-ode"], "unknown dynamics"),
    (["--reward", "beauty"], "beauty"),
    (["--method", "rbf", "--nfe", "5"], "at least"),
    (["--prompt", "three purple circles"], "purple"),
    (["--model", "/nonexistent/flux"], "not found"),
])
def test_cli_errors_are_clear(tmp_path, capsys, args, message):
    argv = ["generate", "--prompt", PROMPT, "--out", str(tmp_path)]
    for i in range(0, len(args), 2):  # later options override the defaults above
        if args[i] in argv:
            argv[argv.index(args[i]) + 1] = args[i + 1]
        else:
            argv += args[i:i + 2]
    assert flowscale.main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def test_demo_writes_grid_table_and_summary(tmp_path):
    out = tmp_path / "demo"
    assert flowscale.main(["demo", "--out", str(out), "--prompts", "2", "--nfe", "30"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 3 * 2
    assert {r["method"] for r in summary["runs"]} == {"none", "bon", "rbf"}
    assert (out / "grid.png").stat().st_size > 0 and "| method |" in (out / "table.md").read_text()
    assert all(toyworld.prompt_split(r["prompt"]) == "heldout" for r in summary["runs"])


def test_the_recorded_evaluation_reproduces(pipe):
    """flowscale.json's "eval" (python train.py --eval-only) is what the shipped model does: the plain
    Linear-ODE sampler on the first 100 of its 200 hard held-out counting prompts, with the same seeds,
    lands within 4 binomial standard errors of the recorded accuracy and within 0.05 of its fidelity."""
    recorded = json.loads((flowscale.DEFAULT_MODEL / "flowscale.json").read_text())["eval"]["counting"]
    recorded = recorded["plain Linear-ODE, 10 steps"]
    prompts = toyworld.heldout_prompts("counting", 100, seed=0, split="hard")
    metrics = []
    for i in (0, 50):
        metrics += flowscale.generate(pipe, prompts[i:i + 50], method="none", dynamics="linear-ode", nfe=10,
                                      seed=i).metrics
    accuracy = sum(m["accuracy"] for m in metrics) / len(metrics)
    p = max(recorded["accuracy"]["mean"], 1 / len(metrics))
    assert abs(accuracy - recorded["accuracy"]["mean"]) <= 4 * (p * (1 - p) / len(metrics)) ** 0.5 + 1e-9
    fidelity = sum(m["fidelity"] for m in metrics) / len(metrics)
    assert abs(fidelity - recorded["fidelity"]["mean"]) < 0.05


def test_rbf_dps_beats_dps_with_the_learned_counter(pipe):
    """Paper Table 2 in miniature, on the given reward: with a differentiable reward (the learned
    counter), RBF+DPS reaches a higher given reward than DPS alone (one guided chain, the paper's DPS
    row) at the same budget, over 8 prompts x 2 seeds at 40 NFE. On mini-FLUX.1-schnell this does not
    carry over to the held-out exact RSS (measured: 15.8 for RBF+DPS vs 15.0 for DPS): the learned
    counter is fooled by generated images (README, "How good they are"), so the held-out side of
    claim 4 is left to the bench with its paired statistics, not asserted here."""
    prompts = toyworld.heldout_prompts("counting", 8, seed=5)
    given = {"dps": [], "rbf+dps": []}
    for seed in (0, 1):
        for method in given:
            generation = flowscale.generate(pipe, prompts, method=method, nfe=40, reward="learned-counter", seed=seed)
            assert max(generation.nfe_used) <= 40
            given[method] += generation.reward
    assert statistics.mean(given["rbf+dps"]) > statistics.mean(given["dps"]) + 0.3
