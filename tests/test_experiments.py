"""Tests of experiments.py (`flowscale.py bench`): outputs, resume, torchrun, and the claim-4 path.

Everything runs on a tiny RANDOM model in the embedded layout (tiny.write_tiny_shape_model, built
once per module): the tables' numbers mean nothing, the tests check structure, bookkeeping and
determinism. Its images are almost black, which keeps this file well under a minute.
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import experiments  # noqa: E402
import flowscale  # noqa: E402
import rewards  # noqa: E402
import toyworld  # noqa: E402
from tiny import write_tiny_shape_model  # noqa: E402

DYNAMICS = ("linear-ode", "linear-sde", "vp-sde")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random mini-FLUX folder with the files and flowscale.json that train.py writes."""
    return write_tiny_shape_model(tmp_path_factory.mktemp("tiny-flux"))


def args(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    experiments.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def without_time(rows: list[dict]) -> list[tuple]:
    """Rows as sorted tuples, minus the wall-clock column (the only one that may differ between runs)."""
    return sorted(tuple(v for k, v in r.items() if k != "seconds") for r in rows)


@pytest.fixture(scope="module")
def quick(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick")
    experiments.cmd_bench(args("--quick", "--model", tiny_model, "--out", out))
    return out


# -----------------------------------------------------------------------------------------------
# The --quick run: rows, columns, report, figures


def test_quick_run_has_one_row_per_prompt_method_dynamics_nfe_seed(quick, tiny_model):
    columns, rows = read_csv(quick / "results.csv")
    assert columns == experiments.COLUMNS
    prompts = toyworld.heldout_prompts("counting", 4, seed=0)
    # --quick: 4 prompts, 1 seed, NFE 50 and 100; bon / sop only with the linear ODE; none at 10 NFE
    settings = [("none", d, 10) for d in DYNAMICS] + [(m, "linear-ode", n) for m in ("bon", "sop") for n in (50, 100)]
    settings += [(m, d, n) for m in ("smc", "code", "svdd", "rbf") for d in DYNAMICS for n in (50, 100)]
    expected = {(m, d, str(n), "0", p) for m, d, n in settings for p in prompts}
    keys = [(r["method"], r["dynamics"], r["nfe"], r["seed"], r["prompt"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(expected) == 124
    assert set(keys) == expected
    assert {r["model"] for r in rows} == {Path(tiny_model).name}  # the model folder's name, on every row


def test_quick_rows_are_consistent(quick):
    _, rows = read_csv(quick / "results.csv")
    for r in rows:
        per_step = [int(x) for x in r["nfe_per_step"].split("|")]
        assert sum(per_step) == int(r["nfe_used"]) <= int(r["nfe"]), r
        # the given counting reward is -RSS of the returned image, and the held-out metrics are of the same image
        assert float(r["given_reward"]) == -float(r["rss"]), r
        assert float(r["accuracy"]) == float(float(r["rss"]) == 0), r
        assert 0 <= float(r["composition"]) <= 1 and len(r["image_sha"]) == 12
        if r["method"] in ("bon", "smc", "rbf"):  # these spend their whole budget
            assert int(r["nfe_used"]) == int(r["nfe"]), r
        if r["method"] == "rbf":
            assert len(per_step) == 10, r  # one trace entry per grid index


def test_quick_report_has_the_tables_and_the_figures(quick):
    md = (quick / "results.md").read_text()
    for heading in ("## Table 1 layout", "## Tables 4-5 layout", "## Diversity from one x_t", "## RBF: NFE spent",
                    "## Claims", "## Skipped"):
        assert heading in md
    assert md.count("| metric |") == 2  # Table 1 in two parts: plain / BoN / SoP, then the particle methods
    for label in ("plain L.O.", "BoN L.O.", "SoP L.O.", "SMC V.S.", "CoDe L.S.", "SVDD V.S.", "RBF V.S."):
        assert label in md
    assert "BoN L.S." not in md and "bon vp-sde: BoN and SoP are Linear-ODE methods" in md
    sections = {part.split("\n", 1)[0]: part for part in md.split("\n## ")}
    table45 = [line for line in sections["Tables 4-5 layout: every budget"].splitlines() if line.startswith("| RBF | vp-sde |")]
    assert len(table45) == 2 and all(line.count(" ± ") == 5 for line in table45)  # given, RSS, accuracy, composition, fidelity
    diversity = sections["Diversity from one x_t (claim 2)"]
    assert "| linear-sde | " in diversity and "| vp-sde | " in diversity
    per_step = [line for line in sections["RBF: NFE spent per grid index (mean over prompts and seeds)"].splitlines()
                if line.startswith("| RBF |")]
    assert len(per_step) == 6 and all(len(line.split("|")[4].split(",")) == 10 for line in per_step)  # 3 dynamics x 2 NFE
    for claim in ("1. SDE conversion", "2. VP-SDE", "3. RBF on VP-SDE", "4. RBF+DPS"):
        assert claim in md
    for name in ("reward_vs_nfe", "diversity", "rbf_nfe_per_step", "grid"):
        png = quick / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"({name}.png)" in md
    div = json.loads((quick / "diversity.json").read_text())
    assert set(div["distances"]) == {"linear-sde", "vp-sde"}
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in div["distances"].values())  # 2 prompts, distinct samples


# -----------------------------------------------------------------------------------------------
# Resume


def test_a_finished_run_adds_nothing(quick, tiny_model, monkeypatch):
    before = (quick / "results.csv").read_bytes()

    def fail(*a, **k):
        raise AssertionError("a finished run must not load the model or generate")

    monkeypatch.setattr(flowscale, "generate", fail)
    monkeypatch.setattr(flowscale, "load_pipeline", fail)
    experiments.cmd_bench(args("--quick", "--model", tiny_model, "--out", quick))
    assert (quick / "results.csv").read_bytes() == before


def test_an_interrupted_run_is_completed(quick, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(quick, out)
    lines = (out / "results.csv").read_text().splitlines(keepends=True)
    dropped = lines[-6:]
    # killed mid-write: the last 5 rows are gone and the 6th-last is cut in half (no newline)
    (out / "results.csv").write_text("".join(lines[:-6]) + dropped[0][: len(dropped[0]) // 2])
    calls = []
    real = flowscale.generate

    def counted(*a, **k):
        calls.append(k["method"])
        return real(*a, **k)

    monkeypatch.setattr(flowscale, "generate", counted)
    experiments.cmd_bench(args("--quick", "--model", tiny_model, "--out", out))
    units = {tuple(row[3:7]) for row in csv.reader(dropped)}  # (method, dynamics, nfe, seed): one chunk each
    assert len(calls) == len(units) >= 1
    text = (out / "results.csv").read_text()
    assert text.endswith("\n")
    assert without_time(read_csv(out / "results.csv")[1]) == without_time(read_csv(quick / "results.csv")[1])


# -----------------------------------------------------------------------------------------------
# torchrun: two processes give the rows of one


def test_torchrun_with_two_processes_gives_the_rows_of_one(quick, tiny_model, tmp_path):
    out = tmp_path / "dist"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "experiments.py"), "--quick", "--model", str(tiny_model), "--methods", "none,svdd,rbf",
           "--dynamics", "linear-ode,vp-sde", "--nfe", "50", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 6 units (none, svdd, rbf x 2 dynamics, one chunk of 4 prompts) dealt to 2 ranks, 3 each
    assert "rank 0/2 ran 3 units" in proc.stderr and "rank 1/2 ran 3 units" in proc.stderr, proc.stderr[-3000:]
    _, rows = read_csv(out / "results.csv")
    assert len(rows) == 6 * 4
    keys = {experiments.row_key(r) for r in rows}
    same_in_one = [r for r in read_csv(quick / "results.csv")[1] if experiments.row_key(r) in keys]
    assert without_time(rows) == without_time(same_in_one)
    quick_div = json.loads((quick / "diversity.json").read_text())
    assert json.loads((out / "diversity.json").read_text()) == quick_div  # same settings, same numbers


# -----------------------------------------------------------------------------------------------
# Claim 4: gradient guidance with a differentiable reward


def test_learned_counter_runs_the_guided_methods(tiny_model, tmp_path, monkeypatch):
    torch.manual_seed(0)
    counter = rewards.LearnedCounter(rewards.CounterConfig()).eval()  # random: stands in for weights/counter
    real = rewards.get_reward
    monkeypatch.setattr(rewards, "get_reward", lambda name, *a: counter if name == "learned-counter" else real(name, *a))
    out = tmp_path / "guided"
    experiments.cmd_bench(args("--reward", "learned-counter", "--dynamics", "vp-sde", "--nfe", "30", "--prompts", "2",
                   "--diversity-prompts", "1", "--diversity-samples", "2", "--model", tiny_model, "--out", out))
    _, rows = read_csv(out / "results.csv")
    assert sorted({r["method"] for r in rows}) == ["dps", "none", "rbf+dps", "svdd+dps"]
    assert len(rows) == 4 * 2
    for r in rows:
        assert r["reward"] == "learned-counter" and int(r["nfe_used"]) <= int(r["nfe"])
        images_reward = float(r["given_reward"])
        assert images_reward <= 0 and images_reward != -float(r["rss"])  # the counter's score, not the exact -RSS
        if r["method"] == "dps":  # at equal NFE: 30 // 10 = 3 guided chains of 10 steps, not one chain of 10 NFE
            assert int(r["nfe_used"]) == 30
    md = (out / "results.md").read_text()
    assert "4. RBF+DPS beats DPS and SVDD+DPS (V.S., NFE 30)" in md
    assert "held-out accuracy, RBF+DPS vs SVDD+DPS" in md


# -----------------------------------------------------------------------------------------------
# Planning, the CSV file, statistics


def test_plan_skips_what_the_paper_does_not_run():
    cfg = experiments.config_from_args(args("--methods", "bon,sop,rbf,dps", "--dynamics", "linear-ode,vp-sde",
                                      "--nfe", "10,30", "--prompts", "3", "--batch", "2", "--seeds", "2"))
    units, notes = experiments.plan(cfg)
    # bon: L.O. only, needs 10 (n = 1 x 10 steps); sop: needs 42; rbf: needs 2 x (1 + 9) = 20; dps: not differentiable
    runs = sorted({(u.method, u.dynamics, u.nfe) for u in units})
    assert runs == [("bon", "linear-ode", 10), ("bon", "linear-ode", 30), ("rbf", "linear-ode", 30), ("rbf", "vp-sde", 30)]
    assert len(units) == len(runs) * 2 * 2  # 2 seeds x 2 chunks ([0, 1], [2])
    assert sorted({tuple(u.prompt_ids) for u in units}) == [(0, 1), (2,)]
    assert [u.nfe for u in units] == sorted(u.nfe for u in units)  # cheapest budgets first
    text = "\n".join(notes)
    assert "bon vp-sde: BoN and SoP are Linear-ODE methods" in text
    assert "sop linear-ode NFE 30: below its minimum budget of 42" in text
    assert "rbf vp-sde NFE 10: below its minimum budget of 20" in text
    assert "dps linear-ode: gradient guidance needs a differentiable reward" in text


@pytest.mark.parametrize("argv, message", [
    (["--methods", "rbf,best"], "--methods: unknown ['best']"),
    (["--dynamics", "vp"], "--dynamics: unknown ['vp']"),
    (["--nfe", "50,lots"], "--nfe takes comma-separated integers"),
    (["--prompts", "0"], "--prompts takes a number >= 1 or an existing file"),
    (["--task", "aesthetic"], "--task must be one of"),
    (["--reward", "vqascore"], "--reward must be one of"),
    (["--seeds", "0"], "--seeds is too small"),
    (["--split", "train"], "--split must be heldout or hard"),
])
def test_bad_arguments_are_value_errors(argv, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        experiments.config_from_args(args(*argv))


def test_the_ablation_dynamics_run_in_the_bench():
    dynamics = ["linear-sde", "linear-sde+time", "linear-sde+diffusion", "vp-sde"]  # v5 Table 1's rows
    cfg = experiments.config_from_args(args("--dynamics", ",".join(dynamics), "--methods", "rbf", "--nfe", "100"))
    units, _ = experiments.plan(cfg)
    assert cfg.dynamics == dynamics and {u.dynamics for u in units} == set(dynamics)


def test_diversity_is_measured_for_every_sde_dynamics_in_pixels_and_counter_features(tiny_model):
    pipe = flowscale.load_pipeline(tiny_model)
    torch.manual_seed(0)
    counter = rewards.LearnedCounter(rewards.CounterConfig()).eval()  # random weights: the measure, not its value
    dynamics = ("linear-sde", "linear-sde+time", "linear-sde+diffusion", "vp-sde")
    d = experiments.diversity(pipe, toyworld.heldout_prompts("counting", 2), steps=4, branch_step=1, samples=3,
                              dynamics=dynamics, counter=counter)
    assert tuple(d["pixel"]) == tuple(d["features"]) == dynamics
    for kind in ("pixel", "features"):
        for dyn in dynamics:
            assert len(d[kind][dyn]) == 2 and all(v > 0 for v in d[kind][dyn]), (kind, dyn, d[kind][dyn])
    assert all(v <= 4 for vs in d["features"].values() for v in vs)  # squared distances of unit vectors


def test_the_hard_split_is_selectable():
    hard = experiments.config_from_args(args("--prompts", "8", "--split", "hard")).prompts
    assert hard == toyworld.heldout_prompts("counting", 8, split="hard")
    assert all(toyworld.is_hard(toyworld.parse_prompt(p)) for p in hard)
    heldout = experiments.config_from_args(args("--prompts", "64")).prompts  # the default: every held-out prompt
    assert not all(toyworld.is_hard(toyworld.parse_prompt(p)) for p in heldout)


def test_prompts_from_a_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# counting\none red circle\n\ntwo blue squares\none red circle\n")
    cfg = experiments.config_from_args(args("--prompts", path))
    assert cfg.prompts == ["one red circle", "two blue squares"]


def test_csv_rows_are_whole_and_a_half_line_is_dropped(tmp_path):
    path = tmp_path / "results.csv"
    row = {c: str(i) for i, c in enumerate(experiments.COLUMNS)} | {"prompt": "two red circles, one blue square"}
    experiments.append_rows(path, [row, row | {"seed": "1"}])
    experiments.append_rows(path, [row | {"seed": "2"}])
    assert path.read_text().count("\n") == 4  # header + 3 rows, the comma in the prompt quoted
    with open(path, "a") as f:
        f.write("counting,counting,10,rbf")  # a killed process
    rows = experiments.read_rows(path)
    assert [r["seed"] for r in rows] == [row["seed"], "1", "2"] and rows[0] == row
    assert path.read_text().endswith("\n") and path.read_text().count("\n") == 4


def test_mean_and_standard_error():
    s = experiments.mean_se([1.0, 2.0, 3.0, 4.0, float("nan")])  # nan = a metric the model does not have: ignored
    assert (s.mean, s.n) == (2.5, 4)
    assert s.se == pytest.approx((5 / 3) ** 0.5 / 2)  # std with ddof 1 over sqrt(n)
    assert experiments.mean_se([7.0]).n == 1 and str(experiments.mean_se([7.0])) == "7.000 ± –"


def test_paired_differences_cancel_the_spread_between_prompts():
    # b beats a by 0.1 on every prompt, while the prompts themselves spread over 0..7: unpaired, the
    # difference would be lost in that spread; paired, it is exact (se 0) and decided
    rows = [{"method": m, "dynamics": "vp-sde", "nfe": "100", "prompt_id": str(p), "seed": str(seed),
             "given_reward": str(p + seed + (0.1 if m == "rbf" else 0.0))}
            for m in ("rbf", "bon") for p in range(4) for seed in range(2)]
    rows.append(rows[0] | {"method": "rbf", "prompt_id": "9"})  # a prompt only one setting ran: not a pair
    by = experiments.by_setting(rows)
    d = experiments.paired(by, ("rbf", "vp-sde", 100), ("bon", "vp-sde", 100))
    assert d.n == 8 and d.mean == pytest.approx(0.1) and d.se == pytest.approx(0.0, abs=1e-12)
    assert experiments.verdict(d).startswith("yes: +0.100")
    assert experiments.verdict(experiments.paired(by, ("bon", "vp-sde", 100), ("rbf", "vp-sde", 100))).startswith("no")
    noisy = experiments.mean_se([0.3, -0.2, 0.1, -0.1])  # mean 0.025, se 0.11: within 2 se
    assert experiments.verdict(noisy).startswith("inconclusive")
    assert experiments.verdict(experiments.mean_se([0.5])).startswith("inconclusive")  # n = 1: no standard error
    # numbers work as well as CSV strings, a 0.0 included; an empty cell (no such metric) is not a pair
    floats = {("a", "d", 1): {(0, 0): {"m": 0.0}, (1, 0): {"m": 1.0}, (2, 0): {"m": ""}},
              ("b", "d", 1): {(0, 0): {"m": 0.5}, (1, 0): {"m": 1.5}, (2, 0): {"m": "3"}}}
    d = experiments.paired(floats, ("b", "d", 1), ("a", "d", 1), "m")
    assert d.n == 2 and d.mean == pytest.approx(0.5) and experiments.decision(d) == "yes"


def test_chunk_seeds_are_distinct_and_fixed():
    seeds = {flowscale.chunk_seed(s, c) for s in range(5) for c in range(20)}
    assert len(seeds) == 100
    assert flowscale.chunk_seed(3, 7) == flowscale.chunk_seed(3, 7)
