"""benchmarks/paper_tables.py: the plan runs every cell its verdicts read, the report pairs rows by
(prompt, seed) and recomputes from the CSV alone, and bad options give one line and exit code 2."""

import csv
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import experiments  # noqa: E402
import paper_tables as P  # noqa: E402


def plan_cells() -> set:
    """(model, task, reward, method[/variant], dynamics, NFE) of every unit the plan's runs would run."""
    out = set()
    for run in P.RUNS:
        cfg = experiments.config_from_args(experiments.build_parser().parse_args(run.bench_args(Path("/none"))))
        assert cfg.prompts == experiments.load_prompts(str(P.PROMPTS), run.task, 0, "hard") and cfg.seeds == P.SEEDS
        for u in experiments.plan(cfg)[0]:
            method = f"{u.method}/{run.variant}" if run.variant else u.method
            out.add((run.model, run.task, cfg.reward, method, u.dynamics, u.nfe))
    return out


def test_every_comparison_reads_cells_that_the_plan_runs():
    cells = plan_cells()
    missing = [(c.label, k) for c in P.comparisons() for k in (c.a, c.b) if k not in cells]
    assert not missing, missing[:3]
    assert len(P.comparisons()) > 60  # claims 1-4 on three (model, task) pairs and the ablations


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, P.CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def row(method: str, dynamics: str, prompt: int, seed: int, given: float, nfe: int = 500) -> dict:
    return {c: "" for c in P.CSV_COLUMNS} | {
        "model": "schnell", "task": "counting", "reward": "counting", "run": "x", "method": method,
        "dynamics": dynamics, "nfe": str(nfe), "seed": str(seed), "prompt_id": str(prompt), "prompt": f"p{prompt}",
        "given_reward": repr(given), "rss": repr(-given), "accuracy": repr(float(given == 0)), "fidelity": "0.5",
        "counter_accuracy": "1.0", "nfe_used": "500", "nfe_per_step": "50", "seconds": "1.0"}


def test_the_report_pairs_rows_by_prompt_and_seed_from_the_csv_alone(tmp_path):
    rng = np.random.default_rng(0)
    bon = {(p, s): float(-rng.integers(0, 4)) for p in range(8) for s in range(2)}
    rbf = {k: v + float(rng.integers(0, 3)) for k, v in bon.items()}
    del rbf[7, 1]  # a pair that only one setting ran is left out of the paired difference
    rows = [row("rbf", "vp-sde", p, s, v) for (p, s), v in rbf.items()]
    rows += [row("bon", "linear-ode", p, s, v) for (p, s), v in reversed(list(bon.items()))]  # another order
    rows += [row("none", "linear-ode", p, s, -3.0, nfe=10) for p, s in bon]
    write_csv(tmp_path / "paper.csv", rows)
    (tmp_path / "paper_diversity.csv").write_text(",".join(P.DIVERSITY_COLUMNS) + "\n")
    assert P.main(["--report-only", "--docs", str(tmp_path)]) == 0
    d = np.array([rbf[k] - bon[k] for k in rbf])
    expected = f"{d.mean():+.3f} ± {d.std(ddof=1) / math.sqrt(len(d)):.3f}"
    line = next(x for x in (tmp_path / "paper.md").read_text().splitlines() if x.count("|") > 3 and x.split("|")[2].strip() == "rbf vp-sde vs bon linear-ode")
    cells = [c.strip() for c in line.split("|")]
    assert cells[3] == expected and cells[8] == str(len(d)), line
    assert cells[9] == experiments.decision(experiments.mean_se(list(d)))
    assert (tmp_path / "paper_table1.png").is_file()
    # the verdict table: claim 3 at 500 NFE ran 2 of its comparisons (vs BoN, vs the plain sampler)
    line = next(x for x in (tmp_path / "paper.md").read_text().splitlines() if x.startswith("| 3 (schnell counting, 500 NFE)"))
    cells = [c.strip() for c in line.split("|")]
    n_planned = sum(c.decides for c in P.comparisons() if c.claim == "3 (schnell counting, 500 NFE)")
    decisions = [experiments.decision(experiments.mean_se(list(d))), "yes"]  # rbf >= plain -3 everywhere, most above
    assert cells[3].endswith(f"(ran 2 of {n_planned})") and cells[4] == "rbf vp-sde vs bon linear-ode", line
    assert cells[5] == expected and cells[8] == P.claim_verdict(decisions) + " so far", line


def test_the_claim_verdict_rule():
    assert P.claim_verdict(["yes", "yes", "inconclusive", "inconclusive"]) == "reproduced"
    assert P.claim_verdict(["yes", "inconclusive", "inconclusive"]) == "inconclusive"  # under half clear
    assert P.claim_verdict(["yes", "yes", "yes", "no"]) == "inconclusive"  # both ways
    assert P.claim_verdict(["no", "inconclusive"]) == "not reproduced"
    assert P.claim_verdict(["inconclusive"] * 3) == "inconclusive"
    assert set(map(P.paper_key, (c.claim for c in P.comparisons()))) == set(P.PAPER)  # every claim has the paper's


def test_bad_options_are_one_line_and_exit_code_2(tmp_path, capsys):
    assert P.main(["--only", "schnell-counting-nope", "--list"]) == 2
    assert P.main(["--report-only", "--docs", str(tmp_path)]) == 2  # no CSV yet
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("paper_tables: error:") for e in err)


def test_the_grid_prompt_is_the_first_the_plain_sampler_gets_wrong_and_its_images_are_the_runs(tmp_path):
    import flowscale

    rows = [row("none", "linear-ode", p, s, 0.0 if p < 3 else -1.0, nfe=10) for p in range(6) for s in range(2)]
    rows = [r | {"accuracy": "0.0"} if (r["prompt_id"], r["seed"]) == ("4", "1") else r for r in rows]
    assert P.grid_prompt(rows) == 3  # seed 0 decides; prompt 4's wrong seed 1 does not count
    # the run's image of prompt 3 (chunk 0) under RBF at 20 NFE: generated as the bench's unit does
    pipe = flowscale.load_pipeline()
    prompts = flowscale.heldout_prompts("counting", 16, split="hard")
    g = flowscale.generate(pipe, prompts, method="rbf", dynamics="vp-sde", nfe=20, reward="counting",
                           seed=flowscale.chunk_seed(0, 0))
    rows.append(row("rbf", "vp-sde", 3, 0, g.reward[3], nfe=20) | {"image_sha": experiments.image_sha(g.images[3])})
    rows.append(row("bon", "linear-ode", 3, 0, -1.0, nfe=20) | {"image_sha": "not-the-image"})
    equal = P.figure_grid(rows, tmp_path / "grid.png", nfe=20)
    # the plain sampler's row has no image_sha here: drawn, and said to differ
    assert equal == {("rbf", "vp-sde"): True, ("bon", "linear-ode"): False, ("none", "linear-ode"): False}
    assert (tmp_path / "grid.png").is_file()


def test_the_committed_run_folders_belong_to_the_shipped_weights(monkeypatch):
    # paper_runs/ is committed as the plan runs; weights retrained without starting the plan again
    # would leave rows of the old model beside the new one (the bench refuses to resume; this says so first)
    root = Path(P.__file__).resolve().parent.parent
    monkeypatch.chdir(root)  # the plan names the models relative to the checkout, as paper_tables runs them
    for run in P.RUNS:
        folder = root / "docs" / "results" / "paper_runs" / run.name
        if (folder / "bench.json").is_file():
            cfg = experiments.config_from_args(experiments.build_parser().parse_args(run.bench_args(folder.parent)))
            assert experiments.read_meta(folder / "bench.json")["model"] == experiments.model_id(cfg), run.name


def test_status_counts_the_rows_of_each_run_without_touching_the_files(tmp_path, capsys):
    run = P.RUNS[0]
    cfg = experiments.config_from_args(experiments.build_parser().parse_args(run.bench_args(tmp_path)))
    unit = experiments.plan(cfg)[0][-1]  # one of 500 NFE
    (tmp_path / run.name).mkdir()
    path = tmp_path / run.name / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, experiments.COLUMNS)
        w.writeheader()
        w.writerow({c: "" for c in experiments.COLUMNS} | dict(zip(experiments.KEY, experiments.unit_keys(cfg, unit)[0])))
        f.write("half,a,line")  # a run writing its next row
    before = path.read_text()
    assert P.main(["--status", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    total = sum(r.nfe_per_prompt() for r in P.RUNS) * P.PROMPTS * P.SEEDS
    assert lines[0].startswith(f"{run.name}: 1 of ") and lines[1].startswith(f"{P.RUNS[1].name}: 0 of ")
    assert unit.nfe == P.TABLE1_NFE and lines[-1] == f"total: {total - unit.nfe:,} NFE to go"
    assert path.read_text() == before


def test_export_reads_the_run_folders_as_they_stand(tmp_path):
    # a run going on: its whole rows are exported, its half-written last line is neither read nor cut
    run = P.RUNS[0]
    cfg = experiments.config_from_args(experiments.build_parser().parse_args(run.bench_args(tmp_path)))
    unit = experiments.plan(cfg)[0][0]
    (tmp_path / run.name).mkdir()
    path = tmp_path / run.name / "results.csv"
    base = {c: "0.5" for c in experiments.COLUMNS}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, experiments.COLUMNS)
        w.writeheader()
        for key in experiments.unit_keys(cfg, unit)[:3]:
            w.writerow(base | dict(zip(experiments.KEY, key)))
        w.writerow(base | dict(zip(experiments.KEY, experiments.unit_keys(cfg, unit)[0])))  # a repeated key
        f.write("mini-flux-schnell,counting,coun")
    before = path.read_text()
    docs = tmp_path / "docs"
    docs.mkdir()
    assert P.main(["--export", "--out", str(tmp_path), "--docs", str(docs)]) == 0
    rows = P.read_csv(docs / "paper.csv")
    assert [r["prompt_id"] for r in rows] == ["0", "1", "2"] and {r["run"] for r in rows} == {run.name}
    assert path.read_text() == before
    assert f"**Rows: 3 of the plan's {P.planned_rows()}** (the plan is still running" in (docs / "paper.md").read_text()
