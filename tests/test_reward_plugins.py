"""Bring your own reward (GitHub issue 13): --reward path/to/file.py:NAME and --reward module:NAME through
`generate` and `bench`, on a tiny random model in the embedded layout (tiny.write_tiny_shape_model).

A plugin that cannot be loaded, raises, or returns the wrong shape or NaN stops the command with one
line and exit code 2. In-process (flowscale.main with capsys): no subprocess is needed for these.
"""

import csv
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import experiments  # noqa: E402
import flowscale  # noqa: E402
from tiny import write_tiny_shape_model  # noqa: E402

PROMPT = "three red circles"
PLUGIN = '''
import torch


class Redness:
    """Mean red minus mean green and blue: a plugin reward in the project's protocol."""

    name = "redness"
    differentiable = False

    def __call__(self, images, prompts):
        assert images.ndim == 4 and images.shape[1] == 3 and len(prompts) == images.shape[0]
        return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))


redness = Redness()


def make():
    return Redness()


class Raises:
    name = "raises"
    differentiable = False

    def __call__(self, images, prompts):
        raise RuntimeError("the scorer is out of memory\\nsecond line")


class WrongShape:
    name = "wrong-shape"
    differentiable = False

    def __call__(self, images, prompts):
        return images.mean((2, 3))  # (B, 3), not (B,)


class NaNs:
    name = "nans"
    differentiable = False

    def __call__(self, images, prompts):
        return torch.full((images.shape[0],), float("nan"))


def broken_factory():
    raise ImportError("t2v_metrics is not installed")


not_a_reward = 42
nameless = lambda images, prompts: images.mean((1, 2, 3))  # noqa: E731
'''


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_shape_model(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugins") / "my_rewards.py"
    path.write_text(PLUGIN)
    return path


def generate(tiny_model, out, reward, *extra):
    return flowscale.main(["generate", "--model", str(tiny_model), "--prompt", PROMPT, "--reward", reward,
                           "--method", "rbf", "--nfe", "16", "--steps", "4", "--out", str(out), *extra])


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name", ["redness", "make", "Redness"])  # an object, a factory, a class
def test_a_plugin_reward_is_loaded_and_used_by_generate(tiny_model, plugin, tmp_path, capsys, name):
    out = tmp_path / "out"
    assert generate(tiny_model, out, f"{plugin}:{name}") == 0, capsys.readouterr().err
    record = flowscale.json.loads((out / "result.json").read_text())
    assert record["reward_name"] == f"{plugin}:{name}"
    # the reward in the record is the plugin's on the returned image
    image = torch.from_numpy(flowscale.np.asarray(__import__("matplotlib.pyplot").pyplot.imread(out / "image.png"))
                             [::8, ::8, :3].copy()).permute(2, 0, 1)[None]
    expect = float(image[:, 0].mean() - image[:, 1:].mean())
    assert record["reward"] == pytest.approx(expect, abs=2e-3)
    assert "heldout" in record  # the shape world's metrics are still reported beside it


def test_a_module_plugin_and_the_example_file(tiny_model, plugin, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin.parent))
    assert generate(tiny_model, tmp_path / "a", "my_rewards:redness") == 0, capsys.readouterr().err
    example = ROOT / "examples" / "reward_plugin.py"
    assert generate(tiny_model, tmp_path / "b", f"{example}:brightness") == 0, capsys.readouterr().err
    # its differentiable toy also drives gradient guidance
    assert generate(tiny_model, tmp_path / "c", f"{example}:brightness", "--method", "rbf+dps") == 0
    capsys.readouterr()
    # the skeletons import their packages only when called: here, one clear line
    code = generate(tiny_model, tmp_path / "d", f"{example}:vqascore")
    assert code == 2 and "pip install t2v-metrics" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("name, message", [
    ("Raises", "reward 'raises' (PLUGIN:Raises) raised RuntimeError: the scorer is out of memory"),
    ("WrongShape", "reward 'wrong-shape' must return shape (2,), got (2, 3)"),
    ("NaNs", "reward 'nans' returned NaN or inf"),
    ("broken_factory", "broken_factory() raised ImportError: t2v_metrics is not installed"),
    ("not_a_reward", "not_a_reward is a int, not a reward or a function"),
    ("nameless", "nameless takes arguments, so it is not a factory of no arguments, and it is not a reward"),
    ("missing", "has no 'missing'"),
])
def test_a_bad_plugin_is_one_line_and_exit_code_2(tiny_model, plugin, tmp_path, capsys, name, message):
    assert generate(tiny_model, tmp_path / "out", f"{plugin}:{name}") == 2
    assert message.replace("PLUGIN", str(plugin)) in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out" / "result.json").exists()


def test_plugin_specs_that_cannot_load(tiny_model, tmp_path, capsys):
    bad = tmp_path / "syntax_error.py"
    bad.write_text("def broken(:\n")
    for spec, message in ((f"{tmp_path / 'nope.py'}:r", "reward file not found"),
                          (f"{bad}:r", "raised SyntaxError"),
                          (":r", "module:NAME or path/to/file.py:NAME")):
        assert generate(tiny_model, tmp_path / "out", spec) == 2
        assert message in one_line(capsys.readouterr().err)


def test_a_plugin_reward_runs_through_bench(tiny_model, plugin, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--model", tiny_model, "--reward", f"{plugin}:redness", "--methods", "none,rbf", "--dynamics",
            "vp-sde", "--nfe", "16", "--steps", "4", "--prompts", "2", "--seeds", "1", "--diversity-samples", "2",
            "--diversity-prompts", "1", "--device", "cpu", "--dtype", "float32", "--out", out]
    assert flowscale.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["reward"] for r in rows} == {f"{plugin}:redness"}
    assert all(-1 <= float(r["given_reward"]) <= 1 and r["rss"] != "" for r in rows)
    # a plugin that fails in bench: one line, exit code 2
    argv[argv.index(f"{plugin}:redness")] = f"{plugin}:NaNs"
    argv[-1] = tmp_path / "bench-nan"
    capsys.readouterr()
    assert flowscale.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err  # bench's own progress lines come first; the error is one line
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in err and "reward 'nans' returned NaN or inf" in errors[0], err


def test_torchrun_ranks_take_their_own_gpu():
    assert experiments.rank_device("cuda", 2, 1) == "cuda:1" and experiments.rank_device("cuda", 4, 3) == "cuda:3"
    assert experiments.rank_device("cuda", 1, 0) == "cuda" and experiments.rank_device("cpu", 2, 1) == "cpu"
    assert experiments.rank_device("cuda:1", 1, 0) == "cuda:1"  # one process: any GPU
    with pytest.raises(ValueError, match="would put all 2 processes on one GPU"):
        experiments.rank_device("cuda:0", 2, 1)
