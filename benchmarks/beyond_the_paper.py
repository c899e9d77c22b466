"""Beyond the paper, on the embedded models: how RBF spends its budget (allocation) and how it scores a
particle (lookahead), at equal NFE and at equal wall-clock.

    python benchmarks/beyond_the_paper.py                    # run (resumable) and report
    python benchmarks/beyond_the_paper.py --report-only      # the report from the rows already written
    python benchmarks/beyond_the_paper.py --retime           # and time every setting again, quietly

Every run is a `python flowscale.py bench` run of RBF on the VP-SDE (the paper's headline setting,
10 steps, exp grid, g = 3t^2, N = 2 chains) with the counting task's given reward -RSS, on the first
PROMPTS prompts of the hard held-out split x SEEDS seeds, on both embedded models. The plan below is
fixed before the run, not chosen by its results:

    rollover    Alg. 2 (the default); on schnell at 100, 300 and 500 NFE, the reward-vs-cost curve
    uniform     a fixed quota per step (the ablation)
    threshold   advance when a candidate's reward reaches 0 (every count right: the top of -RSS);
                a chain that passes it at the last stage stops spending
    ode:3       rollover, each candidate scored on the end point of 3 Euler steps of the model's
                ODE instead of Tweedie's x0_hat (3 NFE per candidate)

at the budgets of BUDGETS (all four at 500 NFE on both models).

Comparisons are paired over (prompt, seed): the same prompt and seed under two settings, mean
difference +- its standard error (experiments.paired). Verdict rule, fixed in advance, the bench's own
(experiments.decision): "yes" / "no" (b better / worse than a) when the paired mean differs from 0 by
more than 2 standard errors, else "inconclusive". Held-out metrics
beside the given reward: the exact accuracy (the same detector as -RSS: not independent), the
learned counter's accuracy (a CNN, independent of the detector) and the fidelity to a clean
re-render. Wall seconds are per prompt (a call's time over its 16 prompts).

Output: out/beyond/<model>/<setting>/ (the bench folders, resumable), then docs/results/beyond.md
(the tables), docs/results/beyond.png (accuracy vs NFE and vs wall seconds) and docs/results/beyond.csv
(every row: model, setting, NFE, seed, prompt and its metrics, from which every table is recomputed).
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import experiments  # noqa: E402

MODELS = {"schnell": "weights/mini-flux-schnell", "dev": "weights/mini-flux-dev"}
SETTINGS = {  # name -> the knobs of rbf (flowscale.generate / the bench's options of the same names)
    "rollover": {},
    "uniform": {"allocation": "uniform"},
    "threshold": {"allocation": "threshold", "threshold": 0.0},
    "ode:3": {"lookahead": "ode:3"},
}
# model -> setting -> NFE budgets: the full plan on the default (schnell), the main contrasts at 500 NFE
# on dev (about 55 and 35 minutes on 2 cores at ~95 NFE/s; the reward is scored on every candidate)
BUDGETS = {"schnell": {"rollover": "100,300,500", "uniform": "500", "threshold": "100,500", "ode:3": "500"},
           "dev": {"rollover": "100,500", "threshold": "500", "ode:3": "500"}}
PROMPTS, SEEDS = 64, 2
HELD_OUT = ("accuracy", "counter_accuracy", "fidelity")
# (label, setting a, setting b, NFE): b - a, paired
PAIRS = [("uniform - rollover", "rollover", "uniform", 500), ("threshold - rollover", "rollover", "threshold", 100),
         ("threshold - rollover", "rollover", "threshold", 500), ("ode:3 - tweedie", "rollover", "ode:3", 500)]


def bench_args(model: str, setting: str, out: Path) -> list[str]:
    extra = [a for k, v in SETTINGS[setting].items() for a in (f"--{k}", str(v))]
    nfe = BUDGETS[model][setting]
    return ["--task", "counting", "--split", "hard", "--prompts", str(PROMPTS), "--seeds", str(SEEDS),
            "--methods", "rbf", "--dynamics", "vp-sde", "--nfe", nfe, "--batch", "16", "--model", MODELS[model],
            "--diversity-prompts", "1", "--diversity-samples", "2", "--out", str(out), *extra]


def load(out: Path) -> dict[tuple[str, int], dict[tuple[int, int], dict]]:
    """setting rows by (setting, NFE) -> {(prompt_id, seed): row with float metrics}"""
    table = {}
    for setting in SETTINGS:
        for row in experiments.read_rows(out / setting.replace(":", "") / "results.csv"):
            values = {m: float(row[m]) for m in ("given_reward", "seconds", "nfe_used", *HELD_OUT)}
            table.setdefault((setting, int(row["nfe"])), {})[(int(row["prompt_id"]), int(row["seed"]))] = values
    return table


CSV_COLUMNS = ["model", "setting", "nfe", "seed", "prompt_id", "prompt", "given_reward", "accuracy",
               "counter_accuracy", "fidelity", "nfe_used", "seconds"]


def export_csv(root: Path, path: Path) -> int:
    """Every row of every bench folder in one CSV (the raw data of the report, one row per model,
    setting, NFE, seed and prompt); returns the number of rows."""
    out = []
    for model in MODELS:
        for setting in SETTINGS:
            for row in experiments.read_rows(root / model / setting.replace(":", "") / "results.csv"):
                out.append([model, setting] + [row[c] for c in CSV_COLUMNS[2:]])
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([CSV_COLUMNS] + out)
    return len(out)


def report(root: Path) -> str:
    lines = ["# Beyond the paper on the embedded models: RBF's allocation and lookahead", "",
             f"Written by `python benchmarks/beyond_the_paper.py` (its docstring has the plan). RBF on the VP-SDE, "
             f"10 steps, N = 2 chains, given reward -RSS, the first {PROMPTS} hard held-out counting prompts x "
             f"{SEEDS} seeds. Mean +- standard error over (prompt, seed). 's / prompt (run)': the run's own wall "
             f"seconds (its cores were shared at times); 's / prompt (quiet)': the same settings timed again on "
             f"16 prompts with nothing else running (`--retime`), which the equal wall-clock pairing uses.", ""]
    for model in MODELS:
        table = load(root / model)
        if not table:
            continue
        quiet = quiet_seconds(root, model) or {}
        lines += [f"## {model}", "", "| setting | NFE | -RSS (given) | accuracy (exact) | learned-counter acc. | "
                  "fidelity | NFE used | s / prompt (run) | s / prompt (quiet) | n |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for (setting, nfe), rows in sorted(table.items(), key=lambda kv: (list(SETTINGS).index(kv[0][0]), kv[0][1])):
            cells = []
            for metric in ("given_reward", *HELD_OUT):
                st = experiments.mean_se([r[metric] for r in rows.values()])
                cells.append(f"{st.mean:.3f} +- {st.se:.3f}")
            cells.append(f"{np.mean([r['nfe_used'] for r in rows.values()]):.1f}")
            cells.append(f"{np.mean([r['seconds'] for r in rows.values()]):.2f}")
            cells.append(f"{quiet[setting, nfe]:.2f}" if (setting, nfe) in quiet else "")
            lines.append(f"| {setting} | {nfe} | " + " | ".join(cells) + f" | {len(rows)} |")
        lines += ["", "Paired differences (b - a over the same prompt and seed):", "",
                  "| comparison | NFE | d(-RSS) | d(accuracy) | d(learned-counter acc.) | d(fidelity) | "
                  "d(s / prompt, run) | n | b better on -RSS? (beyond 2 SE) |", "|---|---|---|---|---|---|---|---|---|"]
        for label, a, b, nfe in PAIRS + equal_time_pairs(table, quiet or run_seconds(table)):
            nfe_a, nfe_b = (nfe, nfe) if isinstance(nfe, int) else nfe
            if (a, nfe_a) not in table or (b, nfe_b) not in table:
                continue
            diffs = {metric: experiments.paired(table, (b, nfe_b), (a, nfe_a), metric)
                     for metric in ("given_reward", *HELD_OUT, "seconds")}
            cells = [f"{d.mean:+.3f} +- {d.se:.3f}" for d in diffs.values()]
            at = nfe if isinstance(nfe, int) else f"{nfe_b} vs {nfe_a}"
            lines.append(f"| {label} | {at} | " + " | ".join(cells) +
                         f" | {diffs['given_reward'].n} | {experiments.decision(diffs['given_reward'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def equal_time_pairs(table: dict, seconds: dict) -> list:
    """threshold at 500 NFE against rollover at the budget whose wall seconds per prompt are nearest to
    threshold's (its curve: 100, 300, 500 on schnell): the comparison at (about) equal wall-clock.
    `seconds`: (setting, NFE) -> seconds per prompt (the quiet re-timing when there is one)."""
    budgets = [nfe for (s, nfe) in seconds if s == "rollover"]
    if ("threshold", 500) not in seconds or not budgets:
        return []
    nearest = min(budgets, key=lambda nfe: abs(seconds["rollover", nfe] - seconds["threshold", 500]))
    return [("threshold - rollover, equal wall-clock", "rollover", "threshold", (nearest, 500))]


def run_seconds(table: dict) -> dict:
    """(setting, NFE) -> mean wall seconds per prompt of the run itself."""
    return {k: float(np.mean([r["seconds"] for r in rows.values()])) for k, rows in table.items()}


def retime(root: Path, model: str) -> dict:
    """Wall seconds per prompt of every (setting, NFE) of the plan on `model`, measured again one after
    the other on the run's first chunk (16 prompts, seed 0) with nothing else running: the run's own
    seconds include whatever else shared the cores while it ran. Written to <root>/<model>/retime.json."""
    import flowscale

    pipe = flowscale.load_pipeline(ROOT / MODELS[model])
    prompts = flowscale.heldout_prompts("counting", 16, split="hard")
    out = {}
    for setting, budgets in BUDGETS[model].items():
        for nfe in map(int, budgets.split(",")):
            generation = flowscale.generate(pipe, prompts, method="rbf", dynamics="vp-sde", nfe=nfe, reward="counting",
                                            seed=flowscale.chunk_seed(0, 0), **SETTINGS[setting])
            out[f"{setting} {nfe}"] = {"seconds": generation.seconds / len(prompts)} | \
                {k: v / len(prompts) for k, v in generation.result.seconds.items()}
            print(f"retime {model} {setting} {nfe}: {out[f'{setting} {nfe}']['seconds']:.2f} s / prompt", flush=True)
    (root / model / "retime.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def quiet_seconds(root: Path, model: str) -> dict | None:
    path = root / model / "retime.json"
    if not path.is_file():
        return None
    timed = json.loads(path.read_text())  # "setting NFE" -> seconds per prompt and their split
    return {(k.rsplit(" ", 1)[0], int(k.rsplit(" ", 1)[1])): v["seconds"] for k, v in timed.items()}


def figure(root: Path, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(MODELS), 2, figsize=(10, 4 * len(MODELS)), squeeze=False)
    colours = {"rollover": "tab:blue", "uniform": "tab:orange", "threshold": "tab:green", "ode:3": "tab:purple"}
    for row, model in enumerate(MODELS):
        table = load(root / model)
        seconds = quiet_seconds(root, model) or run_seconds(table)
        for setting in SETTINGS:
            points = sorted(nfe for (s, nfe) in table if s == setting and (s, nfe) in seconds)
            if not points:
                continue
            acc = [experiments.mean_se([r["accuracy"] for r in table[(setting, p)].values()]) for p in points]
            secs = [seconds[setting, p] for p in points]
            for ax, xs in zip(axes[row], (points, secs)):
                ax.errorbar(xs, [a.mean for a in acc], yerr=[a.se for a in acc], marker="o", capsize=3,
                            color=colours[setting], label=setting)
        axes[row][0].set(xscale="log", xlabel="NFE budget per prompt", ylabel="exact counting accuracy",
                         title=f"{model}: accuracy vs NFE")
        axes[row][1].set(xscale="log", xlabel="wall seconds per prompt (2 CPU cores)", ylabel="exact counting accuracy",
                         title=f"{model}: accuracy vs wall-clock")
        axes[row][0].legend()
        for ax in axes[row]:  # plain numbers on the log axes
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
            ax.tick_params(axis="x", which="both", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/beyond", help="root of the bench folders (resumable)")
    p.add_argument("--report-only", action="store_true", help="only write the report from the rows on disk")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    p.add_argument("--retime", action="store_true",
                   help="after the runs, time every setting again on 16 prompts (nothing else should run meanwhile)")
    args = p.parse_args()
    root = Path(args.out)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"beyond_the_paper: error: unknown model {unknown[0]!r}; use {', '.join(MODELS)}", file=sys.stderr)
        return 2
    if not args.report_only:
        for model in models:
            for setting in BUDGETS[model]:
                code = experiments.main(bench_args(model, setting, root / model / setting.replace(":", "")))
                if code:
                    return code
    if args.retime:
        for model in models:
            retime(root, model)
    docs = ROOT / "docs" / "results"
    (docs / "beyond.md").write_text(report(root))
    figure(root, docs / "beyond.png")
    n = export_csv(root, docs / "beyond.csv")
    print(f"wrote {docs / 'beyond.md'}, {docs / 'beyond.png'} and {docs / 'beyond.csv'} ({n} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
