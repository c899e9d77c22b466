"""The paper's experiments in miniature on the embedded models: Table 1, Tables 4-5 (Figs. 12-13), the
ablations of v5 Table 1 and of Alg. 2, and claim 4 at equal NFE, with paired statistics and verdicts.

    python benchmarks/paper_tables.py --procs 2               # run the plan (resumable), then the report
    python benchmarks/paper_tables.py --only schnell-counting-table1 --procs 2   # one run of the plan
    python benchmarks/paper_tables.py --list                  # the plan: commands and NFE per run
    python benchmarks/paper_tables.py --status                # how far each run is (read-only)
    python benchmarks/paper_tables.py --export                # the report of the rows so far, runs going on or not
    python benchmarks/paper_tables.py --report-only           # the report from docs/results/paper.csv alone

Every run is a `python flowscale.py bench` run (under `torchrun --standalone --nproc_per_node K` with
--procs K > 1), in its own folder docs/results/paper_runs/<run>/, resumable and sharded as the bench is.
The plan takes longer than a working session, so those folders are committed as the run goes: their
results.csv, bench.json (the model's name and weights fingerprint: a resume under other weights is
refused), diversity.json and the images the resume checks (their .gitignore leaves out the bench's
own reports and figures, which this report replaces). The plan
(RUNS below) is fixed before any result, not chosen by them:

  * Prompts: the first PROMPTS prompts of the task's hard held-out split (toyworld.heldout_prompts,
    seed 0: never seen in training) x seeds 0 .. SEEDS - 1, the same in every run of a task.
  * The paper's setting: 10 steps, the exp grid, g = 3t^2, App. D's method sizes scaled to the budget;
    the networks in bf16 (the search math in float32).
  * Table 1 at 500 NFE: every method x dynamics (BoN and SoP on the Linear-ODE only, as the paper),
    base = the plain sampler; for both tasks on the default mini-flux-schnell, and for counting on the
    undistilled mini-flux-dev.
  * Tables 4-5: BoN (Linear-ODE) and RBF (VP-SDE) at 50, 100, 300, 500 and 1000 NFE, both tasks, schnell.
  * Ablations on schnell counting at 500 NFE: RBF under v5 Table 1's four dynamics (Linear-SDE, + the
    VP path's times only, + its diffusion scaling only, VP-SDE) with the diversity of 16 samples from
    one x_t on 32 prompts; RBF with rollover off; RBF with one initial particle (Alg. 2 as printed)
    instead of the official code's 10% of the budget.
  * Claim 4 at equal NFE (300): the learned counter as the given reward; DPS given the budget as
    300 // 10 guided chains, the best by the given reward, beside SVDD+DPS and RBF+DPS; the exact
    counts and the fidelity held out.
  * Why the SDE samples are less sharp than the ODE's (our explanation, checked on fidelity): the plain
    samplers and RBF VP-SDE at 500 NFE with the returned sample finished to t = 0 by one more Euler
    step of the model's ODE (--lookahead ode:2), paired with the same settings returning x0_hat.

Held-out metrics: `counter_accuracy` (exact counts by the learned counter, a CNN sharing none of the
exact detector's machinery) is independent of the detector-based given rewards; `accuracy`,
`rss`, `composition` and `fidelity` (match to a clean re-render of the detected scene) all read the
exact detector's detections, so beside a detector-based given reward they are not independent, and
the report says so. Against claim 4's learned-counter reward the detector's metrics are independent.

Statistics: cells are mean +- standard error over (prompt, seed); every comparison is the paired
difference b - a over the (prompt, seed) pairs both ran, with its standard error; the verdict rule,
fixed in advance, is the bench's (experiments.decision): "yes" / "no" when the paired mean lies more
than 2 standard errors above / below 0, else "inconclusive".

Output: docs/results/paper.csv (every row of every run: the raw data), docs/results/paper_diversity.csv,
docs/results/paper.md (the tables and the paired comparisons, recomputed from those two CSVs alone by
--report-only) and the figures paper_table1.png, paper_curves.png, paper_ablation.png and paper_grid.png
(the first hard counting prompt that the plain sampler gets wrong under every Table 1 setting).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import experiments  # noqa: E402

MODELS = {"schnell": "weights/mini-flux-schnell", "dev": "weights/mini-flux-dev"}
PROMPTS, SEEDS, STEPS, TABLE1_NFE, DPS_NFE = 64, 2, 10, 500, 300
CURVE_NFE = (50, 100, 300, 500, 1000)
TABLE1_METHODS = "none,bon,sop,smc,code,svdd,rbf"
DYNAMICS = "linear-ode,linear-sde,vp-sde"
DIVERSITY = ("--diversity-prompts", "32", "--diversity-samples", "16")
NO_DIVERSITY = ("--diversity-prompts", "1", "--diversity-samples", "2")  # the bench always measures some


@dataclass(frozen=True)
class Run:
    name: str  # its folder under --out, and its name in the report
    model: str  # a key of MODELS
    task: str  # "counting" | "composition"
    methods: str  # --methods
    dynamics: str  # --dynamics
    nfe: str  # --nfe
    extra: tuple[str, ...] = NO_DIVERSITY  # further bench options
    variant: str = ""  # appended to the method of its rows ("rbf/no-rollover"); "" = the method's defaults
    reward: str = ""  # the given reward, "" = the task's

    def bench_args(self, out: Path) -> list[str]:
        reward = ("--reward", self.reward) if self.reward else ()
        return ["--task", self.task, *reward, "--split", "hard", "--prompts", str(PROMPTS), "--seeds", str(SEEDS),
                "--steps", str(STEPS), "--batch", "16", "--methods", self.methods, "--dynamics", self.dynamics,
                "--nfe", self.nfe, "--model", MODELS[self.model], *self.extra, "--out", str(out / self.name)]

    def nfe_per_prompt(self) -> int:
        """The budget one (prompt, seed) costs over the whole run (the plain sampler: STEPS per dynamics)."""
        cells = experiments.plan(experiments.config_from_args(
            experiments.build_parser().parse_args(self.bench_args(Path("/nonexistent")))))[0]
        return sum(u.nfe for u in cells if u.chunk == 0 and u.seed == 0)


FINISH, FINISH_NFE = "ode:2", STEPS + 1  # the finishing lookahead, and the plain sampler's budget with it
CURVE = ",".join(str(n) for n in CURVE_NFE if n != TABLE1_NFE)  # TABLE1_NFE comes from the Table 1 run
RUNS = (  # in the order they run: the headline first, so that an interrupted plan has it
    Run("schnell-counting-table1", "schnell", "counting", TABLE1_METHODS, DYNAMICS, str(TABLE1_NFE)),
    Run("schnell-counting-bon", "schnell", "counting", "bon", "linear-ode", CURVE),
    Run("schnell-counting-rbf", "schnell", "counting", "rbf", "vp-sde", CURVE),
    Run("schnell-counting-ablation", "schnell", "counting", "rbf", "linear-sde+time,linear-sde+diffusion",
        str(TABLE1_NFE), DIVERSITY),
    Run("schnell-counting-no-rollover", "schnell", "counting", "rbf", "vp-sde", str(TABLE1_NFE),
        NO_DIVERSITY + ("--no-rollover",), "no-rollover"),
    Run("schnell-counting-one-particle", "schnell", "counting", "rbf", "vp-sde", str(TABLE1_NFE),
        NO_DIVERSITY + ("--init-particles", "1"), "one-particle"),
    Run("schnell-counting-dps", "schnell", "counting", "none,dps,svdd+dps,rbf+dps", "vp-sde", str(DPS_NFE),
        reward="learned-counter"),
    Run("schnell-composition-table1", "schnell", "composition", TABLE1_METHODS, DYNAMICS, str(TABLE1_NFE)),
    Run("schnell-composition-bon", "schnell", "composition", "bon", "linear-ode", CURVE),
    Run("schnell-composition-rbf", "schnell", "composition", "rbf", "vp-sde", CURVE),
    Run("dev-counting-table1", "dev", "counting", TABLE1_METHODS, DYNAMICS, str(TABLE1_NFE), DIVERSITY),
    # Why the SDE samples are less sharp than the ODE's here (added with the plan, before any result):
    # every method returns x0_hat at the last grid time, which on the VP path is linear t ~ 0.71. The
    # same plain samplers, and RBF, with their returned sample finished to t = 0 by one more Euler step
    # of the model's ODE (lookahead ode:2: +1 NFE for the plain sampler; for RBF every scored
    # candidate is finished, 2 NFE each, within the same 500).
    Run("schnell-counting-finish", "schnell", "counting", "none", DYNAMICS, str(FINISH_NFE),
        NO_DIVERSITY + ("--lookahead", FINISH), FINISH),
    Run("schnell-counting-rbf-finish", "schnell", "counting", "rbf", "vp-sde", str(TABLE1_NFE),
        NO_DIVERSITY + ("--lookahead", FINISH), FINISH),
)
RUN_NAMES = tuple(r.name for r in RUNS)

# -----------------------------------------------------------------------------------------------
# 1. The raw data: every run's rows in one CSV, the diversity measurements in another

CSV_COLUMNS = ["model", "task", "reward", "run", "method", "dynamics", "nfe", "seed", "prompt_id", "prompt",
               "given_reward", "rss", "accuracy", "composition", "fidelity", "counter_accuracy", "nfe_used",
               "nfe_per_step", "seconds", "image_sha"]
DIVERSITY_COLUMNS = ["model", "run", "dynamics", "prompt_id", "pixel_l2", "feature_distance"]
METRICS = ("given_reward", "rss", "accuracy", "composition", "fidelity", "counter_accuracy", "nfe_used", "seconds")


def finished_rows(path: Path) -> list[dict]:
    """The whole rows of a run's results.csv, one per key (the first), read without writing: a run may
    be appending to it (a half-written last line is left out here; the bench repairs it on resume)."""
    if not path.is_file():
        return []
    text = path.read_text()
    rows, seen = [], set()
    for r in csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1])):
        if None not in r.values() and experiments.row_key(r) not in seen:
            seen.add(experiments.row_key(r))
            rows.append(r)
    return rows


def export(out: Path, docs: Path) -> tuple[int, int]:
    """docs/paper.csv from the bench folders under `out` (run order, then the bench's row order; the
    method of a run with a variant is written method/variant), and docs/paper_diversity.csv from their
    diversity.json files of more than one prompt. Returns the numbers of rows."""
    rows, div = [], []
    for run in RUNS:
        for r in finished_rows(out / run.name / "results.csv"):
            method = f"{r['method']}/{run.variant}" if run.variant else r["method"]
            rows.append([run.model, r["task"], r["reward"], run.name, method] + [r[c] for c in CSV_COLUMNS[5:]])
        path = out / run.name / "diversity.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            for dyn, pixel in saved["distances"].items():
                feats = saved.get("feature_distances", {}).get(dyn, [math.nan] * len(pixel))
                if len(pixel) > 1:
                    div += [[run.model, run.name, dyn, i, repr(p), repr(f)] for i, (p, f) in enumerate(zip(pixel, feats))]
    for path, header, body in ((docs / "paper.csv", CSV_COLUMNS, rows), (docs / "paper_diversity.csv", DIVERSITY_COLUMNS, div)):
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([header] + body)
        experiments.flowscale.write_atomic(path, buf.getvalue())  # never a half-written file
    return len(rows), len(div)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -----------------------------------------------------------------------------------------------
# 2. Cells and paired comparisons


Cell = tuple[str, str, str, str, str, int]  # (model, task, reward, method, dynamics, nfe)


def cells(rows: list[dict]) -> dict[Cell, dict[tuple[int, int], dict]]:
    """The rows of every setting keyed by (prompt_id, seed), the pairs of a paired comparison."""
    out: dict = {}
    for r in rows:
        key = (r["model"], r["task"], r["reward"], r["method"], r["dynamics"], int(r["nfe"]))
        out.setdefault(key, {})[int(r["prompt_id"]), int(r["seed"])] = r
    return out


def stat(cell: dict, metric: str) -> experiments.Stat:
    return experiments.mean_se([experiments._metric(r, metric) for r in cell.values()])


def paired(by: dict, b: Cell, a: Cell, metric: str) -> experiments.Stat:
    """metric(b) - metric(a) over the (prompt, seed) pairs both ran; -RSS for rss (higher is better)."""
    d = experiments.paired({0: by.get(b, {}), 1: by.get(a, {})}, 0, 1, metric)
    return experiments.Stat(-d.mean, d.se, d.n) if metric == "rss" else d


def _c(model: str, task: str, method: str, dynamics: str, nfe: int, reward: str = "") -> Cell:
    plain = method == "none"
    return (model, task, reward or task, method, dynamics, STEPS if plain else nfe)


@dataclass(frozen=True)
class Comparison:
    claim: str  # which claim or ablation it belongs to (a group of the verdict table)
    label: str  # "b vs a"
    b: Cell
    a: Cell
    decides: bool = True  # False: reported beside the claim, not counted in its verdict (no claim of the paper)
    headline: bool = False  # the comparison of the claim whose numbers stand beside the paper's
    metric: str = "given_reward"  # what its verdict reads (the explanation checks read a held-out metric)


def comparisons() -> list[Comparison]:
    """Every comparison a verdict rests on, fixed with the plan: b - a, paired over (prompt, seed)."""
    out = []
    for model, task in (("schnell", "counting"), ("schnell", "composition"), ("dev", "counting")):
        tag = f"{model} {task}"
        for m in experiments.PARTICLE_METHODS:
            for d in ("linear-sde", "vp-sde"):
                out.append(Comparison(f"1 ({tag})", f"{m} {d} vs {m} linear-ode",
                                      _c(model, task, m, d, TABLE1_NFE), _c(model, task, m, "linear-ode", TABLE1_NFE),
                                      headline=(m, d) == ("rbf", "vp-sde")))
        for m in experiments.PARTICLE_METHODS:
            out.append(Comparison(f"2 ({tag})", f"{m} vp-sde vs {m} linear-sde", _c(model, task, m, "vp-sde", TABLE1_NFE),
                                  _c(model, task, m, "linear-sde", TABLE1_NFE), headline=m == "rbf"))
        rbf = _c(model, task, "rbf", "vp-sde", TABLE1_NFE)
        for m in TABLE1_METHODS.split(","):
            for d in DYNAMICS.split(","):
                if (m, d) != ("rbf", "vp-sde") and (m not in experiments.LINEAR_ODE_ONLY or d == "linear-ode") \
                        and (m != "none" or d == "linear-ode"):
                    out.append(Comparison(f"3 ({tag}, {TABLE1_NFE} NFE)", f"rbf vp-sde vs {m} {d}", rbf,
                                          _c(model, task, m, d, TABLE1_NFE), headline=m == "bon"))
    for task in ("counting", "composition"):
        for n in CURVE_NFE:
            out.append(Comparison(f"3 (schnell {task}, curves)", f"rbf vp-sde vs bon linear-ode at {n}",
                                  _c("schnell", task, "rbf", "vp-sde", n), _c("schnell", task, "bon", "linear-ode", n),
                                  headline=n == CURVE_NFE[-1]))
        for m, d in (("bon", "linear-ode"), ("rbf", "vp-sde")):
            for lo, hi in zip(CURVE_NFE[2:], CURVE_NFE[3:]):
                # the paper: BoN plateaus after ~300 NFE (described, no verdict), RBF keeps improving
                out.append(Comparison(f"3 (schnell {task}, curves)", f"{m} {d} at {hi} vs at {lo}",
                                      _c("schnell", task, m, d, hi), _c("schnell", task, m, d, lo), decides=m == "rbf"))
    rbf = _c("schnell", "counting", "rbf", "vp-sde", TABLE1_NFE)
    for d in ("linear-sde", "linear-sde+time", "linear-sde+diffusion"):
        out.append(Comparison("ablation: dynamics", f"rbf vp-sde vs rbf {d}", rbf,
                              _c("schnell", "counting", "rbf", d, TABLE1_NFE), headline=d == "linear-sde"))
    for variant in ("no-rollover", "one-particle"):  # the paper's Alg. 2 starts from one particle: no claim
        out.append(Comparison("ablation: Alg. 2", f"rbf vs rbf/{variant} (vp-sde)", rbf,
                              _c("schnell", "counting", f"rbf/{variant}", "vp-sde", TABLE1_NFE),
                              decides=variant == "no-rollover", headline=variant == "no-rollover"))
    for d in DYNAMICS.split(","):  # the finished sample is sharper: fidelity, which the search does not see
        out.append(Comparison("why: the returned x0_hat", f"plain {d} finished vs not",
                              _c("schnell", "counting", f"none/{FINISH}", d, FINISH_NFE),
                              _c("schnell", "counting", "none", d, STEPS), headline=d == "vp-sde", metric="fidelity"))
    out.append(Comparison("why: the returned x0_hat", "rbf vp-sde finished vs not",
                          _c("schnell", "counting", f"rbf/{FINISH}", "vp-sde", TABLE1_NFE), rbf, metric="fidelity"))
    for m in ("dps", "svdd+dps", "none"):
        out.append(Comparison(f"4 (schnell counting, {DPS_NFE} NFE)", f"rbf+dps vs {m}",
                              _c("schnell", "counting", "rbf+dps", "vp-sde", DPS_NFE, "learned-counter"),
                              _c("schnell", "counting", m, "vp-sde", DPS_NFE, "learned-counter"), headline=m == "dps"))
    return out


# What the paper reports for each claim (v1 Table 1, v5 Tables 1, 2, 4, 5), beside which the verdict
# table puts ours; the key is a comparison's claim group up to its first " (", or "curves" for the curves.
PAPER = {
    "1": "SDE particle methods beat their Linear-ODE versions: Table 1 (compositional, 500 NFE) +2.5% to "
         "+17.4% VQAScore (RBF V.S. 0.925 vs L.O. 0.788); counting: VP-SDE methods reach 4-6x base FLUX's accuracy",
    "2": "VP-SDE beats Linear-SDE for every particle method: Table 1 +1.7% (SMC) to +3.0% (CoDe), RBF 0.925 vs "
         "0.900 (+2.8%); diversity (LPIPS-MPD) 0.509 vs 0.158 (v5 Table 1)",
    "3": "RBF (VP-SDE) beats every method x dynamics at 500 NFE: Table 1 0.925 vs BoN 0.879 (+5.2%), next best "
         "SVDD V.S. 0.915; Table 4 accuracy 0.80 vs BoN 0.58 (+38%)",
    "curves": "RBF beats BoN at every NFE and keeps improving while BoN plateaus after ~300: Table 4 accuracy "
              "BoN 0.40/0.51/0.57/0.58/0.59 vs RBF 0.41/0.59/0.72/0.80/0.88 at 50/100/300/500/1000 NFE "
              "(+0.29 at 1000); Table 5 +0.027 to +0.046 VQAScore",
    "ablation: dynamics": "v5 Table 1 (RBF): VP-SDE 0.925 beats Linear-SDE 0.900 (+2.8%), + SNR-matched time "
                          "only 0.908, + diffusion scaling only 0.702",
    "ablation: Alg. 2": "rollover is the method's contribution (Alg. 2); the paper prints no rollover-off row; "
                        "one initial particle (Alg. 2 as printed) vs the official code's 10%: no claim",
    "why: the returned x0_hat": "no claim: the paper (and its code) returns x0_hat at the last grid time; "
                                "our check, on fidelity, of why the SDE samples are less sharp than the ODE's here",
    "4": "guidance combines with search: v5 Table 2 (aesthetic, given) RBF+DPS 7.170 vs DPS 6.438 (+11.4%), "
         "SVDD+DPS 6.887 (+4.1%), FLUX 5.795 (+23.7%); held-out ImageReward 1.152 vs 0.605, 1.077, 0.991",
}


def paper_key(claim: str) -> str:
    return "curves" if "curves" in claim else claim.split(" (")[0]


def claim_verdict(decisions: list[str], explanation: bool = False) -> str:
    """The rule fixed with the plan, over the paired verdicts (on the given reward) that decide a claim:
    reproduced when at least half are "yes" and none is "no"; not reproduced when some are "no" and
    none is "yes"; else inconclusive (too few clear results, or results both ways).
    An explanation of ours (not a claim of the paper) is "confirmed" / "refuted" by the same rule."""
    yes, no = decisions.count("yes"), decisions.count("no")
    if yes and not no and 2 * yes >= len(decisions):
        return "confirmed" if explanation else "reproduced"
    if no and not yes:
        return "refuted" if explanation else "not reproduced"
    return "inconclusive"


def held_out(reward: str) -> tuple[str, ...]:
    """The metrics reported beside the given reward: for the detector-based rewards the independent
    learned counter first, then the detector's own; for the learned counter the detector's."""
    if reward == "learned-counter":
        return ("accuracy", "rss", "fidelity")
    return ("counter_accuracy", "accuracy", "fidelity") if reward == "counting" else \
        ("counter_accuracy", "composition", "fidelity")


# -----------------------------------------------------------------------------------------------
# 3. The report


LABEL = {**experiments.LABEL, "rbf/no-rollover": "RBF, rollover off", "rbf/one-particle": "RBF, 1 initial particle",
         f"none/{FINISH}": "plain, finished to t = 0", f"rbf/{FINISH}": "RBF, candidates finished to t = 0"}


def _label(method: str, dynamics: str) -> str:
    return f"{LABEL[method]} {experiments.ABBR[dynamics]}"


def table1(by: dict, model: str, task: str) -> list[str]:
    reward = task
    cols = [(m, d) for m in TABLE1_METHODS.split(",") for d in DYNAMICS.split(",")
            if _c(model, task, m, d, TABLE1_NFE) in by]
    if not cols:
        return []
    lines = [f"### Table 1 layout: {model}, {task}, {TABLE1_NFE} NFE (plain: {STEPS})", "",
             "| metric | " + " | ".join(_label(m, d) for m, d in cols) + " |", "|---|" + "---|" * len(cols)]
    for metric in ("given_reward", *held_out(reward), "seconds"):
        name = {"given_reward": f"given: {reward} †", "seconds": "s / prompt"}.get(metric, metric)
        lines.append(f"| {name} | " + " | ".join(str(stat(by[_c(model, task, m, d, TABLE1_NFE)], metric))
                                                 for m, d in cols) + " |")
    return lines + [""]


def curves(by: dict, task: str) -> list[str]:
    if not any(_c("schnell", task, m, d, n) in by for m, d in (("bon", "linear-ode"), ("rbf", "vp-sde")) for n in CURVE_NFE):
        return []
    lines = [f"### Tables 4-5 layout: schnell, {task}", "",
             f"| method | NFE | given: {task} † | " + " | ".join(held_out(task)) + " | NFE used | s / prompt | n |",
             "|---|---|---|" + "---|" * len(held_out(task)) + "---|---|---|"]
    for m, d in (("bon", "linear-ode"), ("rbf", "vp-sde")):
        for n in CURVE_NFE:
            cell = by.get(_c("schnell", task, m, d, n))
            if cell:
                lines.append(f"| {_label(m, d)} | {n} | " + " | ".join(
                    str(stat(cell, k)) for k in ("given_reward", *held_out(task))) +
                    f" | {stat(cell, 'nfe_used').mean:.1f} | {stat(cell, 'seconds').mean:.2f} | {len(cell)} |")
    return lines + [""]


def settings_table(by: dict, title: str, keys: list[Cell]) -> list[str]:
    keys = [k for k in keys if k in by]
    if not keys:
        return []
    reward = keys[0][2]
    lines = [f"### {title}", "", f"| setting | given: {reward} † | " + " | ".join(held_out(reward)) +
             " | NFE used | s / prompt | n |", "|---|---|" + "---|" * len(held_out(reward)) + "---|---|---|"]
    for k in keys:
        lines.append(f"| {_label(k[3], k[4])} ({k[5]} NFE) | " + " | ".join(
            str(stat(by[k], m)) for m in ("given_reward", *held_out(reward))) +
            f" | {stat(by[k], 'nfe_used').mean:.1f} | {stat(by[k], 'seconds').mean:.2f} | {len(by[k])} |")
    return lines + [""]


def diversity_table(div: list[dict]) -> list[str]:
    """Per model: every dynamics' mean distance, and VP-SDE minus each other, paired over the prompts."""
    lines = []
    for model in MODELS:
        rows = [r for r in div if r["model"] == model]
        per = {}
        for r in rows:
            per.setdefault(r["dynamics"], {})[int(r["prompt_id"])] = r
        if "vp-sde" not in per:
            continue
        n = len(per["vp-sde"])
        lines += [f"### Diversity from one x_t: {model}, {n} prompts x 16 samples", "",
                  "| dynamics | pixel L2 | learned-counter features | features: VP-SDE minus this (paired) | verdict |",
                  "|---|---|---|---|---|"]
        for dyn, values in per.items():
            pix = experiments.mean_se([float(v["pixel_l2"]) for v in values.values()])
            feat = experiments.mean_se([float(v["feature_distance"]) for v in values.values()])
            if dyn == "vp-sde":
                lines.append(f"| {dyn} | {pix} | {feat} | | |")
                continue
            d = experiments.mean_se([float(per["vp-sde"][i]["feature_distance"]) - float(v["feature_distance"])
                                     for i, v in values.items() if i in per["vp-sde"]])
            lines.append(f"| {dyn} | {pix} | {feat} | {d} | {experiments.decision(d)} |")
        lines.append("")
    return lines


def comparison_table(by: dict) -> list[str]:
    lines = ["## Paired comparisons", "",
             "b − a over the (prompt, seed) pairs both ran, mean ± standard error; −RSS where RSS is named "
             "(higher is better everywhere); verdict on the given reward (or the metric named): yes / no beyond "
             "2 SE, else inconclusive.",
             "", "| claim | b vs a | d(given) | d(held-out 1) | d(held-out 2) | d(held-out 3) | d(s / prompt) | n | "
             "b better? |", "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons():
        if c.a not in by or c.b not in by:
            continue
        metrics = ("given_reward", *held_out(c.b[2]), "seconds")
        diffs = [paired(by, c.b, c.a, m) for m in metrics]
        cells = [f"{d.mean:+.3f} ± {d.se:.3f}" + ("" if i in (0, 4) else f" ({metrics[i]})") for i, d in enumerate(diffs)]
        lines.append(f"| {c.claim} | {c.label} | " + " | ".join(cells) + f" | {diffs[0].n} | "
                     f"{experiments.decision(paired(by, c.b, c.a, c.metric))}"
                     f"{'' if c.metric == 'given_reward' else f' ({c.metric})'} |")
    return lines + [""]


def task_metric(reward: str) -> str:
    """The metric whose relative gain stands beside the paper's: the paper's Table 4 reports counting
    accuracy, Table 1 the compositional score; under the learned-counter reward the exact accuracy."""
    return "composition" if reward == "composition" else "accuracy"


def verdict_table(by: dict) -> list[str]:
    lines = ["## Verdicts", "",
             "Per claim: the paired verdicts (2 SE; on the given reward, on fidelity for our explanation checks) "
             "of the comparisons that decide it, the rule of `claim_verdict` (fixed with the plan), and its "
             "headline comparison beside the paper's numbers (relative gain of b over a where the scales differ).", "",
             "| claim | the paper | yes / no / inconclusive | headline b vs a | d (the verdict's metric) | "
             "b, a (metric) | relative gain | verdict |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[str, list[Comparison]] = {}
    planned: dict[str, int] = {}
    for c in comparisons():
        planned[c.claim] = planned.get(c.claim, 0) + c.decides
        if c.a in by and c.b in by:
            groups.setdefault(c.claim, []).append(c)
    for claim, cs in groups.items():
        decisions = [experiments.decision(paired(by, c.b, c.a, c.metric)) for c in cs if c.decides]
        partial = f" (ran {len(decisions)} of {planned[claim]})" if len(decisions) < planned[claim] else ""
        head = next((c for c in cs if c.headline), cs[0])
        d = paired(by, head.b, head.a, head.metric)
        metric = task_metric(head.b[2]) if head.metric == "given_reward" else head.metric
        b, a = stat(by[head.b], metric), stat(by[head.a], metric)
        gain = f"{(b.mean - a.mean) / abs(a.mean):+.0%}" if a.mean else "– (a = 0)"
        verdict = claim_verdict(decisions, explanation=claim.startswith("why")) + (" so far" if partial else "")
        lines.append(f"| {claim} | {PAPER[paper_key(claim)]} | {decisions.count('yes')} / {decisions.count('no')} / "
                     f"{decisions.count('inconclusive')}{partial} | {head.label} | {d.mean:+.3f} ± {d.se:.3f} | "
                     f"{b.mean:.3f}, {a.mean:.3f} ({metric}) | {gain} | {verdict} |")
    return lines + [""]


def report(rows: list[dict], div: list[dict]) -> str:
    by = cells(rows)
    md = ["# The paper's tables in miniature: the generated report", "",
          "Written by `python benchmarks/paper_tables.py` (its docstring has the plan) from "
          "`docs/results/paper.csv` and `paper_diversity.csv`; `--report-only` recomputes it from them. "
          f"The first {PROMPTS} hard held-out prompts of each task x {SEEDS} seeds, {STEPS} steps. Cells: mean ± "
          "standard error over (prompt, seed); † = the reward the search maximises. counter_accuracy (a CNN) is "
          "independent of the exact detector; accuracy, rss, composition and fidelity all read the detector's "
          "detections. s / prompt: wall seconds of a 16-prompt call per prompt, in whatever process layout the "
          "run used (see RESULTS.md).", "",
          f"**Rows: {len(rows)} of the plan's {planned_rows()}**" +
          ("." if len(rows) >= planned_rows() else " (the plan is still running: verdicts marked 'so far' rest "
                                                  "on part of their comparisons)."), ""]
    for model, task in (("schnell", "counting"), ("schnell", "composition"), ("dev", "counting")):
        md += table1(by, model, task)
    for task in ("counting", "composition"):
        md += curves(by, task)
    md += settings_table(by, f"Ablation of v5 Table 1: RBF under four dynamics (schnell, counting)",
                         [_c("schnell", "counting", "rbf", d, TABLE1_NFE)
                          for d in ("linear-sde", "linear-sde+time", "linear-sde+diffusion", "vp-sde")])
    md += diversity_table(div)
    md += settings_table(by, "Ablation of Alg. 2 (schnell, counting, VP-SDE)",
                         [_c("schnell", "counting", m, "vp-sde", TABLE1_NFE)
                          for m in ("rbf", "rbf/no-rollover", "rbf/one-particle")])
    md += settings_table(by, f"Why the SDE samples are less sharp: the returned sample finished to t = 0 ({FINISH}; "
                             f"schnell, counting)",
                         [_c("schnell", "counting", m, d, n) for d in DYNAMICS.split(",")
                          for m, n in (("none", STEPS), (f"none/{FINISH}", FINISH_NFE))]
                         + [_c("schnell", "counting", m, "vp-sde", TABLE1_NFE) for m in ("rbf", f"rbf/{FINISH}")])
    md += settings_table(by, f"Claim 4 at equal NFE: the learned counter as the given reward (schnell, counting)",
                         [_c("schnell", "counting", m, "vp-sde", DPS_NFE, "learned-counter")
                          for m in ("none", "dps", "svdd+dps", "rbf+dps")])
    md += verdict_table(by)
    md += comparison_table(by)
    return "\n".join(md)


# -----------------------------------------------------------------------------------------------
# 4. Figures: one colour per dynamics (experiments.DYNAMICS_COLOUR), as in every figure of the project


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure_table1(by: dict, path: Path) -> bool:
    """One row per (model, task), one panel per method: the given reward of each dynamics at 500 NFE."""
    groups = [(m, t) for m, t in (("schnell", "counting"), ("schnell", "composition"), ("dev", "counting"))
              if _c(m, t, "none", "linear-ode", 0) in by]
    if not groups:
        return False
    plt = _plt()
    methods = TABLE1_METHODS.split(",")
    fig, axes = plt.subplots(len(groups), len(methods), figsize=(2.1 * len(methods), 2.6 * len(groups)),
                             squeeze=False, sharey="row")
    for i, (model, task) in enumerate(groups):
        for j, m in enumerate(methods):
            ax = axes[i][j]
            dyn = [d for d in DYNAMICS.split(",") if _c(model, task, m, d, TABLE1_NFE) in by]
            st = [stat(by[_c(model, task, m, d, TABLE1_NFE)], "given_reward") for d in dyn]
            ax.bar(range(len(dyn)), [s.mean for s in st], yerr=[0 if math.isnan(s.se) else s.se for s in st],
                   color=[experiments.DYNAMICS_COLOUR[d] for d in dyn], capsize=3)
            ax.set_xticks(range(len(dyn)), [experiments.ABBR[d] for d in dyn], fontsize=7)
            ax.set_title(f"{LABEL[m]}" + (f" ({STEPS} NFE)" if m == "none" else ""), fontsize=9)
        axes[i][0].set_ylabel(f"{model} {task}\ngiven reward", fontsize=8)
    fig.suptitle(f"Table 1 in miniature: given reward at {TABLE1_NFE} NFE, mean ± se over {PROMPTS} prompts x "
                 f"{SEEDS} seeds (grey L.O., orange L.S., blue V.S.)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def figure_curves(by: dict, path: Path) -> bool:
    """The paper's Figs. 12-13: BoN (Linear-ODE) and RBF (VP-SDE) against log NFE, one row per task: the
    given reward, the paper's Table 4 metric where it is not the given reward (counting: exact-count
    accuracy), and the fidelity (sharpness, the role of the paper's aesthetic score)."""
    tasks = [t for t in ("counting", "composition") if any(_c("schnell", t, "rbf", "vp-sde", n) in by for n in CURVE_NFE)]
    if not tasks:
        return False
    panels = {"counting": ("given_reward", "accuracy", "fidelity"), "composition": ("given_reward", "fidelity")}
    title = {"given_reward": "given reward", "accuracy": "exact-count accuracy (detector)",
             "fidelity": "fidelity (vs a clean re-render)"}
    plt = _plt()
    fig, axes = plt.subplots(len(tasks), 3, figsize=(14, 3.6 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for ax, metric in zip(axes[i], panels[task]):
            for m, d in (("bon", "linear-ode"), ("rbf", "vp-sde")):
                pts = [(n, stat(by[_c("schnell", task, m, d, n)], metric)) for n in CURVE_NFE
                       if _c("schnell", task, m, d, n) in by]
                ax.errorbar([n for n, _ in pts], [s.mean for _, s in pts], yerr=[s.se for _, s in pts], marker="o",
                            capsize=3, color=experiments.DYNAMICS_COLOUR[d], label=_label(m, d))
            ax.set_xscale("log")
            ax.set_xticks(CURVE_NFE, [str(n) for n in CURVE_NFE])
            ax.minorticks_off()
            ax.set(xlabel="NFE per prompt (log scale)", title=f"schnell, {task}: {title[metric]}")
        for ax in axes[i][len(panels[task]):]:
            ax.set_visible(False)
        axes[i][0].legend(fontsize=8)
    fig.suptitle(f"Reward against NFE (Figs. 12-13 in miniature): mean ± se over {PROMPTS} prompts x {SEEDS} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def figure_ablation(by: dict, div: list[dict], path: Path) -> bool:
    """v5 Table 1's ablation: RBF's given reward and the samples' diversity under the four dynamics."""
    order = ("linear-sde", "linear-sde+time", "linear-sde+diffusion", "vp-sde")
    dyn = [d for d in order if _c("schnell", "counting", "rbf", d, TABLE1_NFE) in by]
    if not dyn:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    st = [stat(by[_c("schnell", "counting", "rbf", d, TABLE1_NFE)], "given_reward") for d in dyn]
    axes[0].bar(range(len(dyn)), [s.mean for s in st], yerr=[s.se for s in st], capsize=3,
                color=[experiments.DYNAMICS_COLOUR[d] for d in dyn])
    axes[0].set_xticks(range(len(dyn)), [experiments.ABBR[d] for d in dyn], fontsize=8)
    axes[0].set_title(f"RBF at {TABLE1_NFE} NFE: given −RSS (schnell, counting)", fontsize=9)
    feats = {d: [float(r["feature_distance"]) for r in div if r["model"] == "schnell" and r["dynamics"] == d]
             for d in order}
    have = [d for d in order if feats[d]]
    fs = [experiments.mean_se(feats[d]) for d in have]
    axes[1].bar(range(len(have)), [s.mean for s in fs], yerr=[s.se for s in fs], capsize=3,
                color=[experiments.DYNAMICS_COLOUR[d] for d in have])
    axes[1].set_xticks(range(len(have)), [experiments.ABBR[d] for d in have], fontsize=8)
    axes[1].set_title("diversity from one x_t: learned-counter feature distance", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def grid_prompt(rows: list[dict], model: str = "schnell", task: str = "counting") -> int | None:
    """The grid's prompt, by a rule fixed in advance: the first prompt_id whose plain Linear-ODE sample
    (seed 0) is wrong (accuracy 0 on counting, composition < 1 otherwise); None before that run."""
    metric = "accuracy" if task == "counting" else "composition"
    wrong = sorted(int(r["prompt_id"]) for r in rows if (r["model"], r["task"], r["reward"], r["method"], r["dynamics"],
                                                          r["seed"]) == (model, task, task, "none", "linear-ode", "0")
                   and float(r[metric]) < 1)
    return wrong[0] if wrong else None


def figure_grid(rows: list[dict], path: Path, model: str = "schnell", task: str = "counting",
                nfe: int = TABLE1_NFE) -> dict[tuple[str, str], bool] | None:
    """The grid prompt's image under every Table 1 method (columns) and dynamics (rows), seed 0. The run
    keeps no image of that prompt, so each is generated again: the same call as the run's up to that
    prompt (its chunk's first prompts, the chunk's seed), whose result for it does not depend on the
    prompts after it; the caption says whether the image equals the run's row (image_sha). Returns
    {(method, dynamics): equal} of the settings drawn, None before the plain sampler's run."""
    import flowscale

    pid = grid_prompt(rows, model, task)
    if pid is None:
        return None
    by, equal = cells(rows), {}
    prompts = flowscale.heldout_prompts(task, PROMPTS, split="hard")
    chunk = pid // 16  # the runs' --batch
    pipe = flowscale.load_pipeline(ROOT / MODELS[model])
    methods, dyns = TABLE1_METHODS.split(","), DYNAMICS.split(",")
    images, captions = [], []
    for d in dyns:
        images.append([]), captions.append([])
        for m in methods:
            row = by.get(_c(model, task, m, d, nfe), {}).get((pid, 0))
            if row is None:
                images[-1].append(torch.full((3, 8, 8), 0.85))
                captions[-1].append("not run")
                continue
            g = flowscale.generate(pipe, prompts[16 * chunk:pid + 1], method=m, dynamics=d, nfe=int(row["nfe"]),
                                   num_steps=STEPS, reward=task, seed=flowscale.chunk_seed(0, chunk))
            image = g.images[pid - 16 * chunk]
            same = equal[m, d] = experiments.image_sha(image) == row["image_sha"]
            images[-1].append(image)
            reward = float(row["given_reward"]) + 0.0  # + 0.0: a reward of -0.0 prints as 0.00
            captions[-1].append(f"reward {reward:.2f}" + ("" if same else " (≠ run's image)"))
    flowscale.save_grid(dyns, [LABEL[m] for m in methods], images, captions, path,
                        title=f"{model}, \"{prompts[pid]}\" (prompt {pid}: the first the plain sampler gets wrong), "
                              f"{nfe} NFE, seed 0")
    return equal


# -----------------------------------------------------------------------------------------------
# 5. Command line


def planned_rows() -> int:
    """Rows of the whole plan: one per (run, method, dynamics, NFE, seed, prompt)."""
    total = 0
    for run in RUNS:
        cfg = experiments.config_from_args(experiments.build_parser().parse_args(run.bench_args(Path("/none"))))
        total += sum(len(u.prompt_ids) for u in experiments.plan(cfg)[0])
    return total


def status(out: Path) -> list[str]:
    """Per run of the plan: its rows in results.csv against those planned, and the NFE still to spend.
    Read-only (a run may be writing: a half-written last line is skipped, not repaired)."""
    lines, left_total = [], 0
    for run in RUNS:
        cfg = experiments.config_from_args(experiments.build_parser().parse_args(run.bench_args(out)))
        done = {experiments.row_key(r) for r in finished_rows(out / run.name / "results.csv")}
        units = experiments.plan(cfg)[0]
        rows = sum(len(u.prompt_ids) for u in units)
        have = sum(k in done for u in units for k in experiments.unit_keys(cfg, u))
        left = sum(u.nfe * sum(k not in done for k in experiments.unit_keys(cfg, u)) for u in units)
        left_total += left
        lines.append(f"{run.name}: {have} of {rows} rows, {left:,} NFE to go")
    return lines + [f"total: {left_total:,} NFE to go"]


def run_command(run: Run, out: Path, procs: int) -> list[str]:
    script = str(ROOT / "experiments.py")
    launcher = [sys.executable, script] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", script]
    return launcher + run.bench_args(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "paper_runs"),
                   help="root of the bench folders (resumable; committed as the plan runs)")
    p.add_argument("--docs", default=str(ROOT / "docs" / "results"), help="where the CSVs, report and figures go")
    p.add_argument("--only", default=None, help="comma list of runs of the plan (see --list) [all]")
    p.add_argument("--procs", type=int, default=1, help="bench processes (torchrun, one thread each) [1]")
    p.add_argument("--list", action="store_true", help="print the plan and its NFE, run nothing")
    p.add_argument("--status", action="store_true", help="how far each run of the plan is, run nothing")
    p.add_argument("--export", action="store_true",
                   help="the CSVs from the run folders as they stand (runs may be going on), then the report")
    p.add_argument("--report-only", action="store_true", help="only the report and figures from the CSVs in --docs")
    args = p.parse_args(argv)
    only = RUN_NAMES if args.only is None else tuple(s for s in args.only.split(",") if s)
    bad = [s for s in only if s not in RUN_NAMES]
    if bad or not only or args.procs < 1:
        print(f"paper_tables: error: {'--procs must be >= 1' if args.procs < 1 else f'unknown run {bad[0]!r}' if bad else 'empty --only'}"
              f"; the runs are {', '.join(RUN_NAMES)}", file=sys.stderr)
        return 2
    out, docs = Path(args.out), Path(args.docs)
    if args.list:
        total = 0
        for run in RUNS:
            if run.name in only:
                nfe = run.nfe_per_prompt() * PROMPTS * SEEDS
                total += nfe
                print(f"{run.name}: {nfe / 1e3:.0f} k NFE\n    {shlex.join(run_command(run, out, args.procs))}")
        print(f"total: {total / 1e6:.2f} M NFE")
        return 0
    if args.status:
        print("\n".join(status(out)))
        return 0
    if args.export:
        n, m = export(out, docs)
        print(f"paper_tables: {n} rows in {docs / 'paper.csv'}, {m} in {docs / 'paper_diversity.csv'}")
    elif not args.report_only:
        for run in RUNS:
            if run.name in only:
                print(f"paper_tables: {run.name}", file=sys.stderr, flush=True)
                code = subprocess.call(run_command(run, out, args.procs), cwd=ROOT)
                if code:
                    return code
        n, m = export(out, docs)
        print(f"paper_tables: {n} rows in {docs / 'paper.csv'}, {m} in {docs / 'paper_diversity.csv'}")
        if figure_grid(read_csv(docs / "paper.csv"), docs / "paper_grid.png") is not None:
            print(f"paper_tables: wrote {docs / 'paper_grid.png'}")
    if not (docs / "paper.csv").is_file():
        print(f"paper_tables: error: {docs / 'paper.csv'} does not exist; run the plan first", file=sys.stderr)
        return 2
    rows, div = read_csv(docs / "paper.csv"), read_csv(docs / "paper_diversity.csv")
    experiments.flowscale.write_atomic(docs / "paper.md", report(rows, div))
    by = cells(rows)
    figures = [name for name, made in (("paper_table1.png", figure_table1(by, docs / "paper_table1.png")),
                                       ("paper_curves.png", figure_curves(by, docs / "paper_curves.png")),
                                       ("paper_ablation.png", figure_ablation(by, div, docs / "paper_ablation.png")))
               if made]
    print(f"paper_tables: wrote {docs / 'paper.md'} and {', '.join(figures) or 'no figure yet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
