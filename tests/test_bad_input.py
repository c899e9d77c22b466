"""Bad input and faults (GitHub issue 16): one clear line, never a traceback, a silent wrong result
or a half-written file.

Everything runs on a tiny random model in the embedded layout (tiny.write_tiny_shape_model). Most CLI
cases call flowscale.main() in-process (capsys); a few run the real command line in a subprocess to
check exit code, stderr and the absence of a traceback end to end. The bench faults (a kill during a
CSV row, during a PNG, a full disk during the repair of a half-written line) are injected by
monkeypatching the write functions, plus one real `ulimit -f` in a subprocess; every resumed run must
give the rows of a clean run.
"""

import argparse
import csv
import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import experiments  # noqa: E402
import flowscale  # noqa: E402
import rewards  # noqa: E402
import search  # noqa: E402
from tiny import write_tiny_shape_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_shape_model(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return flowscale.load_pipeline(tiny_model)


def one_error_line(err: str) -> str:
    """The stderr of a refused command: exactly one non-empty line, an error, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_cli(argv: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "flowscale.py"), *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_driver(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# -----------------------------------------------------------------------------------------------
# Item 2: case and unknown tokens


def test_prompts_are_normalised_for_a_lower_case_vocabulary(pipe):
    assert pipe.lowercase  # the tiny model's T5 vocabulary is learnt on lower-case prompts, as the embedded one
    assert flowscale.normalise_prompts(pipe, ["THREE RED CIRCLES.", "Two red circles,  one blue square"]) == \
        ["three red circles", "two red circles one blue square"]
    upper = flowscale.generate(pipe, ["THREE RED CIRCLES."], method="none", dynamics="linear-ode", nfe=10)
    lower = flowscale.generate(pipe, ["three red circles"], method="none", dynamics="linear-ode", nfe=10)
    assert upper.prompts == ["three red circles"] and torch.equal(upper.images, lower.images)


def test_unknown_tokens_are_refused_not_fed(pipe):
    assert flowscale.unknown_words(pipe, "THREE red circles.") == ["THREE", "circles."]
    with pytest.raises(ValueError, match=r"do not know \['THREE'\].*lower-case"):
        flowscale.check_prompts(pipe, ["THREE red circles"])  # un-normalised: refused, never read as <unk>


def test_cli_generate_says_how_it_read_the_prompt(tiny_model, tmp_path, capsys):
    out = tmp_path / "gen"
    assert flowscale.main(["generate", "--model", str(tiny_model), "--prompt", "THREE RED CIRCLES", "--method", "bon",
                           "--dynamics", "linear-ode", "--nfe", "20", "--out", str(out)]) == 0
    assert "reads the prompt as 'three red circles'" in capsys.readouterr().err
    assert json.loads((out / "result.json").read_text())["prompt"] == "three red circles"


# -----------------------------------------------------------------------------------------------
# Item 6: seeds


@pytest.mark.parametrize("seed", [-1, 2**32, 2**63 - 1, 2**64 - 1])
def test_seeds_outside_32_bits_are_refused(tiny_model, tmp_path, capsys, seed):
    argv = ["generate", "--model", str(tiny_model), "--prompt", "a red circle", "--seed", str(seed),
            "--out", str(tmp_path / "out")]
    assert flowscale.main(argv) == 2
    assert "seed must be an integer from 0 to 2**32 - 1" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # refused before anything was made


def test_seed_range_in_the_api(pipe):
    assert flowscale.check_seed(0) == 0 and flowscale.check_seed(np.int64(2**32 - 1)) == 2**32 - 1
    for bad in (2**32, -1, True, 1.0, "0"):
        with pytest.raises(ValueError, match="seed must be"):
            flowscale.check_seed(bad)
    with pytest.raises(ValueError, match="seed must be"):
        flowscale.generate(pipe, ["a red circle"], method="none", nfe=10, seed=2**32)


def test_cli_bad_seed_in_a_subprocess(tiny_model, tmp_path):
    proc = run_cli(["generate", "--model", tiny_model, "--prompt", "a red circle", "--seed", 2**32,
                    "--out", tmp_path / "out"])
    assert proc.returncode == 2
    assert "seed must be" in one_error_line(proc.stderr)


# -----------------------------------------------------------------------------------------------
# Item 7: damaged model folders, one line naming the file


def _edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _retype(path: Path, dtype) -> None:
    state = load_file(str(path))
    key = sorted(k for k in state if state[k].ndim == 2)[0]
    state[key] = state[key] > 0 if dtype == torch.bool else state[key].to(dtype)
    save_file(state, str(path))


def _as_bf16_labelled_f16(path: Path) -> None:
    """Store the float tensors as bf16, then relabel them F16 in the header (same length)."""
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    save_file(state, str(path))
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    path.write_bytes(raw[:8] + raw[8:8 + n].replace(b'"BF16"', b'"F16" ') + raw[8 + n:])


def _wrong_size(folder: Path) -> None:  # the size it was trained at is recorded, as train.py does
    _edit_json(folder / "flowscale.json",
               lambda m: m | {"height": m["height"] + 6 * m["latent_factor"], "train": {"image_size": m["height"]}})


def _index_without_weight_map(folder: Path) -> None:
    (folder / "text_encoder/model.safetensors").rename(folder / "text_encoder/model-00001-of-00001.safetensors")
    (folder / "text_encoder/model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))


DAMAGE = {
    "config.json a list": (lambda d: (d / "transformer/config.json").write_text("[1, 2]"),
                           "transformer/config.json must hold a JSON object"),
    "num_layers a string (T5)": (lambda d: _edit_json(d / "text_encoder_2/config.json", lambda c: c | {"num_layers": "three"}),
                                 "text_encoder_2/config.json: invalid T5Config: num_layers must be int"),
    "num_layers a string (Flux)": (lambda d: _edit_json(d / "transformer/config.json", lambda c: c | {"num_layers": "three"}),
                                   "transformer/config.json: depth must be int"),
    "flowscale.json without a key": (lambda d: _edit_json(d / "flowscale.json", lambda m: {k: v for k, v in m.items()
                                                                                         if k != "t5_max_length"}),
                                     "flowscale.json: t5_max_length must be an integer"),
    "an int tensor": (lambda d: _retype(d / "text_encoder/model.safetensors", torch.int32),
                      "text_encoder: 1 tensors are integer or bool where CLIPText has floats"),
    "a bool tensor": (lambda d: _retype(d / "text_encoder_2/model.safetensors", torch.bool),
                      "text_encoder_2: 1 tensors are integer or bool where T5Encoder has floats"),
    "a bad vocab.json": (lambda d: (d / "tokenizer/vocab.json").write_text('{"a": "x"}'),
                         "tokenizer: vocab.json / merges.txt are not a readable BPE vocabulary"),
    "an index without weight_map": (_index_without_weight_map,
                                    "model.safetensors.index.json: expected a 'weight_map' object"),
    "spiece.model cut to 500 bytes": (lambda d: (d / "tokenizer_2/spiece.model").write_bytes(
        (d / "tokenizer_2/spiece.model").read_bytes()[:500]), "tokenizer_2/spiece.model"),
    "bf16 tensors labelled F16": (lambda d: _as_bf16_labelled_f16(d / "transformer/diffusion_pytorch_model.safetensors"),
                                  "look like bfloat16 bits labelled float16"),
    "a wrong height in flowscale.json": (_wrong_size, "but the model was trained at"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_model_folder_gets_one_line_naming_the_file(tiny_model, tmp_path, case):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    damage, message = DAMAGE[case]
    damage(folder)
    with pytest.raises(ValueError) as info:
        flowscale.load_pipeline(folder)
    text = str(info.value)
    assert "\n" not in text and message in text and str(folder) in text, text


def test_damaged_model_folder_on_the_cli(tiny_model, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    (folder / "transformer/config.json").write_text("[1, 2]")
    assert flowscale.main(["generate", "--model", str(folder), "--prompt", "a red circle",
                           "--out", str(tmp_path / "out")]) == 2
    assert "config.json must hold a JSON object" in one_error_line(capsys.readouterr().err)


# -----------------------------------------------------------------------------------------------
# Item 8: the output of generate


def _generate(tiny_model, out: Path, *extra) -> list[str]:
    return ["generate", "--model", str(tiny_model), "--prompt", "a red circle", "--method", "bon", "--dynamics",
            "linear-ode", "--nfe", "20", "--out", str(out), *map(str, extra)]


def test_unwritable_output_is_refused_before_the_search(tiny_model, tmp_path, capsys, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the search must not run when the output cannot be written")

    monkeypatch.setattr(flowscale, "generate", fail)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert flowscale.main(_generate(tiny_model, blocker / "out")) == 2
    assert "cannot write to the output folder" in one_error_line(capsys.readouterr().err)


def test_image_and_result_are_written_as_a_pair(tiny_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "gen"
    assert flowscale.main(_generate(tiny_model, out, "--seed", 1)) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["image_sha256"] == hashlib.sha256((out / "image.png").read_bytes()).hexdigest()
    before = {name: (out / name).read_bytes() for name in ("image.png", "result.json")}
    capsys.readouterr()
    real = Path.write_text

    def full_disk(self, *a, **k):
        if self.name.startswith(".result.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert flowscale.main(_generate(tiny_model, out, "--seed", 2)) == 2
    assert "No space left on device" in one_error_line(capsys.readouterr().err.split("\r")[-1])
    assert {name: (out / name).read_bytes() for name in before} == before  # the old pair, untouched
    assert sorted(p.name for p in out.iterdir()) == ["image.png", "result.json"]  # no temporary left


# -----------------------------------------------------------------------------------------------
# Item 9: API misuse of the search


def _problem(reward=lambda x0, p: -(x0 ** 2).sum(1), velocity=lambda x, t, p: -x, **kw) -> search.Problem:
    return search.Problem(velocity=velocity, reward=reward, shape=(2,), **kw)


def _run(method, problem, nfe=40, **knobs):
    return search.run(method, problem, nfe, generator=torch.Generator().manual_seed(0), **knobs)


@pytest.mark.parametrize("reward, message", [
    (lambda x0, p: (x0 ** 2).sum(1).tolist(), r"of shape \(4,\), got list"),
    (lambda x0, p: (x0 ** 2).sum(1).numpy(), "got ndarray"),
    (lambda x0, p: None, "got NoneType"),
    (lambda x0, p: x0[:, 0] > 0, "got a torch.bool tensor"),
])
def test_a_reward_of_the_wrong_type_is_named(reward, message):
    with pytest.raises(ValueError, match="reward 'reward' must return a float torch.Tensor.*" + message):
        _run("bon", _problem(reward))


def test_a_detached_reward_flagged_differentiable_is_named():
    problem = _problem(lambda x0, p: -(x0.detach() ** 2).sum(1), differentiable=True)
    with pytest.raises(ValueError, match="flagged differentiable but its output is detached"):
        _run("rbf+dps", problem)


def test_nan_velocity_is_the_velocitys_fault():
    calls = []

    def velocity(x, t, p):  # NaN at the last step only, where "none" scores the reward
        calls.append(1)
        return torch.full_like(x, float("nan")) if len(calls) == 10 else -x

    with pytest.raises(ValueError, match="Problem.velocity returned NaN or inf"):
        _run("none", _problem(lambda x0, p: torch.zeros(len(x0)), velocity), nfe=10)  # this reward hides NaN


def test_diverged_particles_are_said_to_diverge():
    with pytest.raises(ValueError, match="particles became NaN or inf"):
        _run("rbf+dps", _problem(differentiable=True), dps_beta=1e-45)  # steps overflow


@pytest.mark.parametrize("beta, message", [(None, "dps_beta=None is the unguided 'rbf'"),
                                           ("0.1", "finite number > 0"), (float("inf"), "finite number > 0")])
def test_bad_dps_beta_is_refused(beta, message):
    with pytest.raises(ValueError, match=message):
        _run("rbf+dps", _problem(differentiable=True), dps_beta=beta)


def test_numpy_budgets_work_and_huge_ones_are_refused_with_the_number():
    assert int(_run("bon", _problem(), nfe=np.int64(40)).nfe_used[0]) == 40
    with pytest.raises(ValueError, match=r"bon with nfe=1000000000000 holds 100,000,000,000 particles"):
        _run("bon", _problem(), nfe=10**12)
    with pytest.raises(ValueError, match="nfe must be an integer"):
        _run("bon", _problem(), nfe=40.0)


def test_cli_huge_budget_and_demo_prompts(tiny_model, tmp_path, capsys):
    assert flowscale.main(_generate(tiny_model, tmp_path / "g", "--nfe", 10**12)) == 2
    assert "particles at once" in one_error_line(capsys.readouterr().err)
    for n in ("0", "100000000"):
        assert flowscale.main(["demo", "--model", str(tiny_model), "--prompts", n, "--out", str(tmp_path / "d")]) == 2
        assert "--prompts must be a number from 1 to 1000" in one_error_line(capsys.readouterr().err)


# -----------------------------------------------------------------------------------------------
# Item 10: CLI traps


def test_dps_beta_reaches_dps_and_the_unused_budget_is_said(tiny_model, tmp_path, capsys):
    out = tmp_path / "dps"
    argv = ["generate", "--model", str(tiny_model), "--prompt", "a red circle", "--method", "dps", "--dps-beta", "0.5",
            "--reward", "learned-counter", "--nfe", "100", "--out", str(out)]
    assert flowscale.main(argv) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["dps_beta"] == 0.5 and record["nfe_used"] == 10
    assert "used 10 of the 100 NFE budget" in record["note"] and record["note"] in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--method", "dps"], "pass --reward learned-counter"),
    (["--method", "rbf", "--dps-beta", "0.5"], "--dps-beta sets the guidance of dps, svdd+dps, rbf+dps"),
    (["--method", "rbf+dps", "--dps-beta", "0", "--reward", "learned-counter"], "--dps-beta must be a finite number > 0"),
])
def test_dps_misuse_on_the_cli(tiny_model, tmp_path, capsys, extra, message):
    argv = ["generate", "--model", str(tiny_model), "--prompt", "a red circle", "--out", str(tmp_path / "o"), *extra]
    assert flowscale.main(argv) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_ctrl_c_is_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(flowscale, "generate", interrupted)
    assert flowscale.main(_generate(tiny_model, tmp_path / "g")) == 130
    assert "interrupted; nothing was written" in one_error_line(capsys.readouterr().err)


def test_ctrl_c_in_a_subprocess_bench(tiny_model, tmp_path):
    out = tmp_path / "bench"
    proc = run_driver(f"""
        import sys, flowscale
        def interrupted(*a, **k):
            raise KeyboardInterrupt
        flowscale.generate = interrupted
        sys.exit(flowscale.main(["bench", "--model", {str(tiny_model)!r}, "--methods", "none", "--dynamics",
                                 "linear-ode", "--prompts", "1", "--out", {str(out)!r}]))
    """)
    assert proc.returncode == 130, proc.stderr
    line = [x for x in proc.stderr.splitlines() if "interrupted" in x]
    assert "Traceback" not in proc.stderr and len(line) == 1
    assert f"kept in {out}/results.csv; run the same command again to resume" in line[0]


def test_malicious_pth_is_refused_without_torchs_advice(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "head.pth"
    torch.save({"layers.0.weight": Evil()}, path)
    with pytest.raises(ValueError) as info:
        rewards.load_aesthetic_head(path)
    text = str(info.value)
    assert "refused" in text and "system" in text and "weights_only" not in text and "\n" not in text


# -----------------------------------------------------------------------------------------------
# Items 3-5 and 10: bench


def bench_args(model: Path, out: Path, *extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    experiments.add_arguments(parser)
    argv = ["--model", model, "--methods", "none,bon,rbf", "--dynamics", "linear-ode,vp-sde", "--nfe", "30",
            "--prompts", "2", "--batch", "1", "--diversity-prompts", "1", "--diversity-samples", "2", "--out", out]
    return parser.parse_args([str(a) for a in [*argv, *extra]])


def rows_of(out: Path) -> list[tuple]:
    """The rows of results.csv without the wall-clock column, sorted."""
    with open(out / "results.csv", newline="") as f:
        return sorted(tuple(v for k, v in r.items() if k != "seconds") for r in csv.DictReader(f))


def images_ok(out: Path, model: Path) -> bool:
    """Every unit's image of prompt 0 reads back as its row's image (nothing for the grid to miss)."""
    cfg = experiments.config_from_args(bench_args(model, out))
    return experiments.pending_units(cfg, experiments.plan(cfg)[0]) == []


@pytest.fixture(scope="module")
def clean(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    experiments.cmd_bench(bench_args(tiny_model, out))
    return out


def test_clean_bench_run(clean, tiny_model):
    assert len(rows_of(clean)) == 5 * 2  # none x 2 dynamics, bon L.O., rbf x 2 dynamics; 2 prompts
    assert images_ok(clean, tiny_model)
    assert not list(clean.glob(".*.tmp")) and not list((clean / "images").glob(".*.tmp"))


def test_kill_during_a_csv_row_resumes_to_the_clean_rows(clean, tiny_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real, calls = experiments.append_rows, []

    def killed_on_the_third(path, rows):
        calls.append(1)
        if len(calls) < 3:
            return real(path, rows)
        line = ",".join(rows[0][c] for c in experiments.COLUMNS)
        with open(path, "a") as f:
            f.write(line[: len(line) // 2])  # half a row, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(experiments, "append_rows", killed_on_the_third)
    assert flowscale.main(["bench", *sys_argv(bench_args(tiny_model, out))]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted; the rows written so far are kept" in err.splitlines()[-1]
    monkeypatch.setattr(experiments, "append_rows", real)
    experiments.cmd_bench(bench_args(tiny_model, out))
    assert rows_of(out) == rows_of(clean) and images_ok(out, tiny_model)


def sys_argv(args: argparse.Namespace) -> list[str]:
    """bench_args' options as a command line (for flowscale.main)."""
    return ["--model", str(args.model), "--methods", args.methods, "--dynamics", args.dynamics, "--nfe", args.nfe,
            "--prompts", args.prompts, "--batch", str(args.batch), "--diversity-prompts", str(args.diversity_prompts),
            "--diversity-samples", str(args.diversity_samples), "--out", args.out]


def test_kill_during_a_png_resumes_to_the_clean_rows(clean, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, calls = flowscale.finish, []

    def killed_on_the_second_image(tmp, path):
        if path.parent.name == "images":
            calls.append(path)
            if len(calls) == 2:
                raise KeyboardInterrupt  # the image's temporary file is written, not yet renamed
        return real(tmp, path)

    monkeypatch.setattr(flowscale, "finish", killed_on_the_second_image)
    with pytest.raises(KeyboardInterrupt):
        experiments.cmd_bench(bench_args(tiny_model, out))
    monkeypatch.setattr(flowscale, "finish", real)
    assert not (out / "images" / calls[1].name).exists()
    assert ("none", "vp-sde") not in {r[3:5] for r in rows_of(out)}  # the image comes first, so its unit has no row
    experiments.cmd_bench(bench_args(tiny_model, out))
    assert rows_of(out) == rows_of(clean) and images_ok(out, tiny_model)


def test_a_truncated_or_lost_png_is_redone(clean, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    pngs = sorted((out / "images").glob("*.png"))
    pngs[0].write_bytes(pngs[0].read_bytes()[:100])  # truncated
    pngs[1].unlink()  # lost
    calls = []
    real = flowscale.generate
    monkeypatch.setattr(flowscale, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    experiments.cmd_bench(bench_args(tiny_model, out))
    assert len(calls) == 2 and rows_of(out) == rows_of(clean) and images_ok(out, tiny_model)
    assert "not run" not in (out / "results.md").read_text()


def test_a_full_disk_during_the_repair_loses_nothing(clean, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    text = (out / "results.csv").read_text()
    damaged = text[:-40]  # the last row cut in half by a kill
    (out / "results.csv").write_text(damaged)
    real = Path.write_bytes

    def full_disk(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(ValueError, match="the file is unchanged"):
        experiments.cmd_bench(bench_args(tiny_model, out))
    monkeypatch.setattr(Path, "write_bytes", real)
    assert (out / "results.csv").read_text() == damaged  # not 62 of 124 rows: every whole row is still there
    assert not list(out.glob(".*.tmp"))
    experiments.cmd_bench(bench_args(tiny_model, out))
    assert rows_of(out) == rows_of(clean)


def test_a_real_file_size_limit_during_the_repair(clean, tmp_path):
    path = tmp_path / "results.csv"
    damaged = (clean / "results.csv").read_text()[:-40]
    path.write_text(damaged)
    proc = run_driver(f"""
        import resource, signal, experiments
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(damaged) // 2}, resource.RLIM_INFINITY))
        try:
            experiments.read_rows(experiments.Path({str(path)!r}))
        except ValueError as e:
            print("refused:", e)
    """)
    assert "refused:" in proc.stdout and "the file is unchanged" in proc.stdout, proc.stdout + proc.stderr
    assert path.read_text() == damaged and not list(tmp_path.glob(".*.tmp"))


def test_a_second_run_on_the_same_out_is_refused(clean, tiny_model, tmp_path):
    out = tmp_path / "out"
    held = experiments.lock(out)
    try:
        with pytest.raises(ValueError, match=f"in use by another bench run \\(pid {os.getpid()} on "):
            experiments.cmd_bench(bench_args(tiny_model, out))
        proc = run_cli(["bench", *sys_argv(bench_args(tiny_model, out))])
        assert proc.returncode == 2
        assert f"pid {os.getpid()}" in one_error_line(proc.stderr)
    finally:
        held.close()
    assert not (out / "results.csv").exists()


def test_repeated_rows_are_read_once(clean, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    body = (out / "results.csv").read_text().split("\n", 1)[1]
    with open(out / "results.csv", "a") as f:
        f.write(body)  # a second run's copy of every row
    assert len(experiments.read_rows(out / "results.csv")) == 10
    monkeypatch.setattr(flowscale, "generate", lambda *a, **k: pytest.fail("nothing is pending"))
    experiments.cmd_bench(bench_args(tiny_model, out))
    table45 = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| RBF |")]
    assert table45 and all(line.rstrip(" |").endswith("| 2") for line in table45[:2])  # n = 2 prompts, not 4


def test_another_order_or_batch_runs_its_own_rows(clean, tiny_model, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    prompts = experiments.config_from_args(bench_args(tiny_model, out)).prompts
    reversed_file = tmp_path / "prompts.txt"
    reversed_file.write_text("\n".join(reversed(prompts)) + "\n")
    for extra in (["--batch", "2"], ["--prompts", str(reversed_file)]):
        cfg = experiments.config_from_args(bench_args(tiny_model, out, *extra))
        units = experiments.plan(cfg)[0]
        assert experiments.pending_units(cfg, units) == units  # nothing of the other setting is reused
    experiments.cmd_bench(bench_args(tiny_model, out, "--prompts", reversed_file))
    cfg = experiments.config_from_args(bench_args(tiny_model, out, "--prompts", reversed_file))
    rows = [r for r in experiments.read_rows(out / "results.csv") if r["prompt"] == cfg.prompts[0] and r["prompt_id"] == "0"
            and r["method"] == "rbf" and r["dynamics"] == "vp-sde"]
    image = experiments.read_png(experiments.image_path(cfg, "rbf", "vp-sde", 30, 0))
    assert len(rows) == 1 and experiments.image_sha(image) == rows[0]["image_sha"]  # the grid shows its title's prompt


def test_a_results_folder_follows_its_weights_not_its_path(clean, tiny_model, tmp_path):
    # the same weights in another checkout resume the folder (paper_tables commits its run folders) ...
    out, moved = tmp_path / "out", tmp_path / "elsewhere" / tiny_model.name
    shutil.copytree(clean, out)
    shutil.copytree(tiny_model, moved)
    cfg = experiments.config_from_args(bench_args(moved, out))
    assert experiments.pending_units(cfg, experiments.plan(cfg)[0]) == []
    # ... and retrained weights under the same folder name are another model
    weights = next((moved / "transformer").glob("*.safetensors"))
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    state = load_file(weights)
    name = sorted(state)[-1]
    state[name] = state[name] + 1.0
    save_file(state, weights, metadata=metadata)
    with pytest.raises(ValueError, match=f"holds results of the model {tiny_model.name}@.*use another --out"):
        experiments.pending_units(cfg, experiments.plan(cfg)[0])


def test_the_plain_sampler_finished_to_t0_runs_in_the_bench(tiny_model, tmp_path):
    # --lookahead ode:2 on the plain sampler: one more NFE, and its rows say so (the paper_tables check)
    out = tmp_path / "finish"
    experiments.cmd_bench(bench_args(tiny_model, out, "--methods", "none", "--lookahead", "ode:2"))
    rows = experiments.read_rows(out / "results.csv")
    assert len(rows) == 2 * 2 and {(r["nfe"], r["nfe_used"]) for r in rows} == {("11", "11")}  # 2 prompts x 2 dynamics
    cfg = experiments.config_from_args(bench_args(tiny_model, out, "--methods", "none", "--lookahead", "ode:2"))
    assert experiments.pending_units(cfg, experiments.plan(cfg)[0]) == []


def test_damaged_side_files(clean, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    saved = json.loads((clean / "diversity.json").read_text())
    (out / "diversity.json").write_text((clean / "diversity.json").read_text()[:30])
    experiments.cmd_bench(bench_args(tiny_model, out))
    assert "diversity.json is damaged" in capsys.readouterr().err
    assert json.loads((out / "diversity.json").read_text()) == saved
    (out / "bench.json").write_text('{"mod')
    with pytest.raises(ValueError, match="bench.json is damaged"):
        experiments.cmd_bench(bench_args(tiny_model, out))


def test_bench_with_nothing_to_run_is_refused(tiny_model, tmp_path, capsys):
    argv = ["bench", "--model", str(tiny_model), "--methods", "dps,rbf+dps", "--out", str(tmp_path / "b")]
    assert flowscale.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "nothing to run" in line and "--reward learned-counter" in line


@pytest.mark.parametrize("extra, message", [(["--seeds", "1000000000000"], "--seeds is too large"),
                                            (["--diversity-samples", "1000000000"], "--diversity-samples is too large"),
                                            (["--prompts", "100000000"], "--prompts must be a number from 1 to 1000"),
                                            (["--prompt-seed", "-1"], "--prompt-seed must be from 0")])
def test_bench_sizes_that_would_hang_or_not_fit_are_refused(tiny_model, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        experiments.config_from_args(bench_args(tiny_model, tmp_path, *extra))
