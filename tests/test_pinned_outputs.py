"""Seeded outputs pinned: every search method x dynamics gives the results recorded in
tests/data/pinned_outputs.json (recorded before the refactoring of issue 14, so that a refactoring
that changes behaviour fails here).

Two parts:
  * the exact flow of a 2-D Gaussian mixture (sde.GaussianMixtureFlow), float64: every method x
    dynamics, plus rbf's other allocations and an ode:K lookahead; asserted BIT-IDENTICAL (a sha256 of
    every output tensor, the trace and the resolved knobs);
  * a seeded random mini-FLUX folder (tests/tiny.py, no file of weights/), float32 network, through
    flowscale.generate (prompts -> text encoders -> counted velocity -> search -> decode -> reward):
    every method x dynamics at a small budget; NFE counts exactly, the rewards and latent sums to
    rel 1e-4, the tolerance of test_real_flux_path's pin (cross-process bits of the FLUX path were seen
    to differ once there).

Record anew (only when a change of behaviour is intended, and say so in the commit):
    python tests/test_pinned_outputs.py --record
"""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flowscale  # noqa: E402
import sde  # noqa: E402
import search  # noqa: E402
from tiny import write_tiny_shape_model  # noqa: E402

PINS = Path(__file__).resolve().parent / "data" / "pinned_outputs.json"
DYNAMICS = ("linear-ode", "linear-sde", "vp-sde")
METHODS = ("none", "bon", "sop", "smc", "code", "svdd", "rbf", "dps", "svdd+dps", "rbf+dps")

# -----------------------------------------------------------------------------------------------
# The Gaussian-mixture flow, float64

FLOW = sde.GaussianMixtureFlow(torch.tensor([[-3.0, -1.0], [3.0, -1.0], [0.0, 3.0]], dtype=torch.float64),
                               torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64),
                               torch.tensor([0.475, 0.475, 0.05], dtype=torch.float64))
MIXTURE_NFE = 60

# (label, method, dynamics, Problem keywords, knobs)
MIXTURE_CASES = [(f"{m} {d}", m, d, {}, {}) for m in METHODS for d in DYNAMICS] + [
    ("rbf uniform vp-sde", "rbf", "vp-sde", {}, {"allocation": "uniform"}),
    ("rbf threshold vp-sde", "rbf", "vp-sde", {}, {"allocation": "threshold", "threshold": 1.4}),
    ("rbf no-rollover linear-sde", "rbf", "linear-sde", {}, {"rollover": False}),
    ("rbf ode:2 vp-sde", "rbf", "vp-sde", {"lookahead": "ode:2"}, {}),
    ("smc ode:2 linear-sde", "smc", "linear-sde", {"lookahead": "ode:2"}, {}),
    ("bon ode:3 linear-ode", "bon", "linear-ode", {"lookahead": "ode:3"}, {}),
    ("svdd uniform-grid vp-sde", "svdd", "vp-sde", {"time_grid": "uniform"}, {}),
    ("rbf shifted linear-sde", "rbf", "linear-sde", {"time_shift": 2.0}, {}),
]


def _mixture_problem(dynamics: str, **kw) -> search.Problem:
    return search.Problem(velocity=lambda x, t, prompt: FLOW.velocity(x, t),
                          reward=lambda x0, prompt: x0 @ torch.tensor([0.0, 0.5], dtype=x0.dtype),
                          shape=(2,), num_prompts=2, differentiable=True, dynamics=dynamics, dtype=torch.float64,
                          **kw)


def _digest(result) -> str:
    h = hashlib.sha256()
    tensors = [result.x0, result.reward, result.nfe_used, result.reward_calls, result.backward_calls,
               result.particles, result.particle_rewards]
    tensors += [] if result.log_weights is None else [result.log_weights]
    for info in result.trace:
        tensors += [info.nfe, info.best_reward] + ([] if info.ess is None else [info.ess])
    for a in tensors:
        h.update(str((a.dtype, tuple(a.shape))).encode())
        h.update(a.detach().contiguous().numpy().tobytes())
    h.update(json.dumps([[info.step, info.t] for info in result.trace]).encode())
    h.update(json.dumps(result.knobs, sort_keys=True).encode())
    return h.hexdigest()


def mixture_outputs(label: str) -> dict:
    _, method, dynamics, kw, knobs = next(case for case in MIXTURE_CASES if case[0] == label)
    result = search.run(method, _mixture_problem(dynamics, **kw), MIXTURE_NFE,
                        generator=torch.Generator().manual_seed(7), **knobs)
    return {"digest": _digest(result), "reward": result.reward.tolist(), "nfe_used": result.nfe_used.tolist()}


# -----------------------------------------------------------------------------------------------
# A seeded random mini-FLUX through the whole pipeline

FLUX_NFE, FLUX_STEPS = 48, 4
FLUX_PROMPTS = ["three red circles", "a blue square left of a green triangle"]


class RedMinusBlue:
    """A differentiable reward of the decoded images (every method, the dps ones included)."""

    name = "red-minus-blue"
    differentiable = True

    def __call__(self, images, prompts):
        return images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))


def tiny_pipeline(folder: Path) -> flowscale.Pipeline:
    """tests/tiny.py's random mini-FLUX (seeded), outside the shape world (no counter from weights/,
    no detector), float32, with the final bias drawn (seeded) so that the images are not black."""
    write_tiny_shape_model(folder)
    meta = json.loads((folder / "flowscale.json").read_text())
    meta.pop("world")
    (folder / "flowscale.json").write_text(json.dumps(meta))
    pipe = flowscale.load_pipeline(folder, dtype=torch.float32)
    with torch.no_grad():
        pipe.flux.final_layer.linear.bias.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(3))
    return pipe


def flux_outputs(pipe: flowscale.Pipeline, method: str, dynamics: str) -> dict:
    generation = flowscale.generate(pipe, FLUX_PROMPTS, method=method, dynamics=dynamics, nfe=FLUX_NFE,
                                    num_steps=FLUX_STEPS, reward=RedMinusBlue(), seed=5)
    x0 = generation.result.x0.double()
    return {"reward": generation.reward, "nfe_used": generation.nfe_used,
            "x0_sum": x0.flatten(1).sum(1).tolist(), "x0_abs_sum": x0.abs().flatten(1).sum(1).tolist()}


# -----------------------------------------------------------------------------------------------
# The tests


def _pins() -> dict:
    return json.loads(PINS.read_text())


@pytest.mark.parametrize("label", [case[0] for case in MIXTURE_CASES])
def test_mixture_search_is_bit_identical_to_its_pin(label):
    pin = _pins()["mixture"][label]
    got = mixture_outputs(label)
    assert got["nfe_used"] == pin["nfe_used"]
    assert got["reward"] == pin["reward"]
    assert got["digest"] == pin["digest"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("pinned-flux"))


@pytest.mark.parametrize("dynamics", DYNAMICS)
@pytest.mark.parametrize("method", METHODS)
def test_mini_flux_search_matches_its_pin(pipe, method, dynamics):
    pin = _pins()["flux"][f"{method} {dynamics}"]
    got = flux_outputs(pipe, method, dynamics)
    assert got["nfe_used"] == pin["nfe_used"]
    for key in ("reward", "x0_sum", "x0_abs_sum"):
        assert got[key] == pytest.approx(pin[key], rel=1e-4, abs=1e-6), key


def test_the_pins_cover_every_method_and_dynamics():
    pins = _pins()
    for method in METHODS:
        for dynamics in DYNAMICS:
            assert f"{method} {dynamics}" in pins["mixture"] and f"{method} {dynamics}" in pins["flux"]
    assert set(METHODS) == set(search.METHODS) and set(DYNAMICS) == set(search.DYNAMICS)


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_pinned_outputs.py --record")
    import tempfile

    torch.set_num_threads(1)  # as tests/conftest.py
    pins = {"mixture": {case[0]: mixture_outputs(case[0]) for case in MIXTURE_CASES}}
    with tempfile.TemporaryDirectory() as tmp:
        flux_pipe = tiny_pipeline(Path(tmp))
        pins["flux"] = {f"{m} {d}": flux_outputs(flux_pipe, m, d) for m in METHODS for d in DYNAMICS}
    PINS.parent.mkdir(exist_ok=True)
    PINS.write_text(json.dumps(pins, indent=1) + "\n")
    print(f"wrote {PINS}")
