"""benchmarks/counter_agreement.py: the two counters' agreement, checked where the answer is known."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import counter_agreement as CA  # noqa: E402
import rewards as R  # noqa: E402
import toyworld as T  # noqa: E402

PROMPTS = T.heldout_prompts("counting", 16, split="hard")


@pytest.fixture(scope="module")
def counter():
    return R.load_counter()


def renders(prompts, seed=0):
    return T.render_batch([T.parse_prompt(p) for p in prompts], np.random.default_rng(seed))


def test_detector_counts_are_the_rendered_groups(counter):
    categories = counter.config.categories
    found = CA.detector_counts(renders(PROMPTS), categories)  # (B, C)
    for b, prompt in enumerate(PROMPTS):
        want = torch.zeros(len(categories))
        for g in T.parse_prompt(prompt).groups:
            want[categories.index(f"{g.colour} {g.shape}")] = g.count
        assert torch.equal(found[b], want), prompt
    totals = CA.colour_totals(found, categories)  # (B, colours): the shapes summed away
    assert torch.equal(totals.sum(1), found.sum(1))


def test_the_counters_agree_on_clean_renders_and_a_wrong_render_shows(counter):
    a = CA.agreement(counter, renders(PROMPTS), PROMPTS)
    m = a.asked
    assert bool((a.learned == a.found)[m].all()) and bool((a.found == a.target)[m].all())
    # the same images judged against other prompts: the detector still sees what is drawn, so it
    # disagrees with those prompts' counts while it still agrees with the counter
    shifted = PROMPTS[1:] + PROMPTS[:1]
    b = CA.agreement(counter, renders(PROMPTS), shifted)
    assert not bool((b.found == b.target)[b.asked].all())
    assert bool((b.learned == b.found)[a.asked].all())


def test_paired_difference_of_hits():
    a = torch.tensor([True, False, False, True])
    b = torch.tensor([True, True, False, True])
    assert CA.paired(b, a) == f"+0.250 ± {0.5 / 2:.3f}"  # d = (0, 1, 0, 0): mean 1/4, sd 1/2, n = 4


def test_chance_agreement_of_independent_count_distributions():
    # counter counts 1 on every category, the detector 1 on half and 2 on half: chance = 1 * 1/2
    asked = torch.ones(2, 2, dtype=torch.bool)
    a = CA.Agreement(torch.ones(2, 2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]), torch.ones(2, 2), asked)
    assert a.chance() == pytest.approx(0.5)


def test_a_bad_prompt_count_is_one_line_and_exit_code_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["counter_agreement.py", "--prompts", "0"])
    with pytest.raises(SystemExit) as exit_:
        CA.main()
    assert exit_.value.code == 2
    assert "--prompts must be a number from 1 to" in capsys.readouterr().err
