"""Do the two counters agree on generated images? The learned counter (rewards.LearnedCounter, a CNN) and
the exact detector (toyworld.detect) count the objects of each category, on clean renders of the prompts
and on the embedded models' own samples.

    python benchmarks/counter_agreement.py                 # 64 hard held-out counting prompts, both models
    python benchmarks/counter_agreement.py --prompts 200

The learned counter is the held-out metric that shares none of the detector's machinery
(docs/RESULTS.md), so this says how far its verdicts can be read as a second opinion. For every image
and every category the prompt asks for, the counter's rounded count is compared with the detector's
count (and both with the asked count), beside the agreement that chance alone would give (two
independent draws from the two counters' own count distributions). The "images" columns ask that every
asked category agrees; "colour" totals sum each colour over the three shapes (a disagreement that is
only about shape then vanishes).
Shares are over the (image, category) or image pairs, with the binomial standard error. Samples (seed 0,
10 steps): the plain Linear-ODE sampler of both models (the sharpest images they make), and on schnell,
with the detector's -RSS as the given reward at 500 NFE, BoN on the Linear-ODE (sharp images, selected)
and RBF on the VP-SDE (the paper's headline setting, blurrier images). Each search is then paired with
the plain sampler over the asked (prompt, category) pairs: does the counter see the detector's gain?
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import experiments  # noqa: E402
import flowscale  # noqa: E402
import rewards as R  # noqa: E402
import toyworld  # noqa: E402

# (model folder, method, dynamics, NFE): the sharpest samples (the plain Linear-ODE sampler) of both models,
# then two searches on the detector's -RSS whose gains the counter should see if they are real: BoN (sharp
# images) and the paper's headline setting, RBF on the VP-SDE
SAMPLES = (("weights/mini-flux-schnell", "none", "linear-ode", 10), ("weights/mini-flux-dev", "none", "linear-ode", 10),
           ("weights/mini-flux-schnell", "bon", "linear-ode", 500), ("weights/mini-flux-schnell", "rbf", "vp-sde", 500))


def detector_counts(images: torch.Tensor, categories: tuple[str, ...]) -> torch.Tensor:
    """(B, C) objects per category ("colour shape") as the exact detector finds them, in the given order."""
    seen = [toyworld.count(found) for found in toyworld.detect(images)]  # (colour, shape) -> count, per image
    return torch.tensor([[s.get(tuple(c.split()), 0) for c in categories] for s in seen], dtype=torch.float32)


def colour_totals(counts: torch.Tensor, categories: tuple[str, ...]) -> torch.Tensor:
    """(B, C) -> (B, colours): each colour's count summed over its shapes."""
    colours = sorted({c.split()[0] for c in categories})
    return torch.stack([counts[:, [i for i, c in enumerate(categories) if c.split()[0] == k]].sum(1)
                        for k in colours], 1)


def share(hits: torch.Tensor) -> str:
    p, n = hits.float().mean().item(), hits.numel()
    return f"{p:.3f} ± {(p * (1 - p) / n) ** 0.5:.3f}"


@dataclass
class Agreement:
    """One image set's counts, (B, C) over images x the counter's categories, and `asked` marking the
    categories each prompt asks for (the same for every image set of the same prompts)."""

    learned: torch.Tensor  # (B, C) the counter's rounded counts
    found: torch.Tensor  # (B, C) the detector's counts
    target: torch.Tensor  # (B, C) the asked counts (0 where not asked)
    asked: torch.Tensor  # (B, C) bool

    def chance(self) -> float:
        """How often two independent draws from the two counters' own count distributions (over the asked
        categories) would agree: the agreement to expect if the counters read nothing in common."""
        learned, found = self.learned[self.asked], self.found[self.asked]
        return sum(((learned == k).float().mean() * (found == k).float().mean()).item()
                   for k in torch.unique(torch.cat([learned, found])))

    def cells(self, categories: tuple[str, ...]) -> list[str]:
        same, m = self.learned == self.found, self.asked
        return [share(same[m]), f"{self.chance():.3f}", share((same | ~m).all(1)),
                share((colour_totals(self.learned, categories) == colour_totals(self.found, categories)).all(1)),
                share((self.found == self.target)[m]), share((self.learned == self.target)[m])]


def agreement(counter: R.LearnedCounter, images: torch.Tensor, prompts: list[str]) -> Agreement:
    with torch.no_grad():
        learned = counter.counts(images).round()  # (B, C)
    target, mask = counter.targets(prompts)
    return Agreement(learned, detector_counts(images, counter.config.categories), target, mask.bool())


def paired(b: torch.Tensor, a: torch.Tensor) -> str:
    """b - a over the same (prompt, category) pairs, mean ± standard error (experiments.mean_se)."""
    d = experiments.mean_se((b.float() - a.float()).tolist())
    return f"{d.mean:+.3f} ± {d.se:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64, help="first N hard held-out counting prompts")
    args = parser.parse_args()
    try:
        prompts = flowscale.heldout_prompts("counting", args.prompts, split="hard")
    except ValueError as e:
        parser.error(str(e))
    counter = R.load_counter()
    categories = counter.config.categories
    print(f"{args.prompts} hard held-out counting prompts; shares ± binomial standard error\n")
    print("| images | asked categories: counter = detector | the same by chance | images: every asked category "
          "agrees | images: every colour total agrees | detector = asked | counter = asked |")
    print("|---|---|---|---|---|---|---|")
    renders = toyworld.render_batch([toyworld.parse_prompt(p) for p in prompts], np.random.default_rng(0))
    cells = agreement(counter, renders, prompts).cells(categories)
    print("| clean renders of the prompts | " + " | ".join(cells) + " |")
    runs = []
    for folder, method, dynamics, nfe in SAMPLES:
        images = flowscale.generate(flowscale.load_pipeline(folder), prompts, method=method, dynamics=dynamics,
                                    nfe=nfe, reward="counting", seed=0, progress=True).images
        runs.append(agreement(counter, images, prompts))
        label = f"{Path(folder).name}, {method} {dynamics}, {nfe} NFE"
        print(f"| {label} | " + " | ".join(runs[-1].cells(categories)) + " |", flush=True)
    plain, m = runs[0], runs[0].asked  # schnell's plain sampler, the base of both searches
    print(f"\nSearch - plain L.O. on schnell, paired over the {int(m.sum())} asked (prompt, category) pairs:\n")
    print("| search (given reward -RSS) | detector = asked | counter = asked |")
    print("|---|---|---|")
    for (_, method, dynamics, nfe), s in zip(SAMPLES[2:], runs[2:]):
        detector = paired(s.found[m] == s.target[m], plain.found[m] == plain.target[m])
        learned = paired(s.learned[m] == s.target[m], plain.learned[m] == plain.target[m])
        print(f"| {method} {dynamics}, {nfe} NFE | {detector} | {learned} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
