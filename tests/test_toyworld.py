"""The shape world of toyworld.py: grammar round trip, train/held-out/hard split, renderer, exact
detector, fidelity score.

Accuracy checks use a few hundred seeded renders. The detector must give exact counts on >= 99%
of them, i.e. at most 3 misses in 300 (measured: 0 misses in every condition below); the
degradations are stated next to each case.
"""

import hashlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import toyworld as T
from toyworld import Group, Relation, Spec

N_RENDERS = 300


# -----------------------------------------------------------------------------------------------
# Grammar


def test_spec_prompt_round_trip_on_sampled_specs():
    rng = np.random.default_rng(0)
    for kind in ("counting", "composition"):
        for split in ("train", "heldout"):
            for _ in range(100):
                spec = T.sample_spec(rng, kind, split)
                assert T.parse_prompt(T.spec_to_prompt(spec)) == spec
                assert bool(spec.relations) == (kind == "composition")
                assert spec.n_objects <= T.MAX_OBJECTS


@st.composite
def specs(draw):
    """Any valid spec: 1-4 distinct categories, counts 1..8 summing to <= 10, optional relations
    between consecutive groups."""
    n = draw(st.integers(1, T.MAX_GROUPS))
    cats = draw(st.lists(st.sampled_from(T.CATEGORIES), min_size=n, max_size=n, unique=True))
    counts = draw(st.lists(st.integers(1, 8), min_size=n, max_size=n).filter(lambda c: sum(c) <= T.MAX_OBJECTS))
    relations, i = [], 0
    while i < n - 1:
        if draw(st.booleans()):
            relations.append(Relation(i, draw(st.sampled_from(T.RELATIONS)), i + 1))
            i += 1
        i += 1
    return Spec(tuple(Group(k, c, s) for k, (c, s) in zip(counts, cats)), tuple(relations))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(specs())
def test_spec_prompt_round_trip_on_any_spec(spec):
    prompt = T.spec_to_prompt(spec)
    assert T.parse_prompt(prompt) == spec
    assert set(prompt.split()) <= set(T.VOCABULARY)


def test_parse_accepts_spelling_variants():
    canonical = T.parse_prompt("a red circle left of two blue squares")
    assert T.parse_prompt("  One RED circle left of two blue squares. ") == canonical
    assert canonical == Spec((Group(1, "red", "circle"), Group(2, "blue", "square")),
                             (Relation(0, "left of", 1),))
    # Count 1 reads "one" without relations, "a" with them.
    assert T.spec_to_prompt(Spec((Group(1, "green", "triangle"),))) == "one green triangle"
    # A relation binds the single group after it; the next clause is independent.
    spec = T.parse_prompt("a red circle above a blue square and two green triangles")
    assert spec.relations == (Relation(0, "above", 1),) and len(spec.groups) == 3


def test_unknown_words_name_the_words_and_the_vocabulary():
    with pytest.raises(ValueError) as e:
        T.parse_prompt("three purple circles and one blue hexagon")
    message = str(e.value)
    assert "'hexagon'" in message and "'purple'" in message
    assert all(word in message for word in T.VOCABULARY)


@pytest.mark.parametrize("prompt, needle", [
    ("one red circles", "singular"),
    ("two red circle", "plural"),
    ("a red circle left a blue square", "'of'"),
    ("red circle", "count"),
    ("one red circle and two red circles", "once per prompt"),
    ("eight red circles and three blue squares", "at most 10"),
    ("nine red circles", "outside the shape world"),
    ("one red circle and one red square and one blue circle and one blue square and one green circle",
     "at most 4 object groups"),
    ("", "count"),
])
def test_grammar_errors_are_value_errors(prompt, needle):
    with pytest.raises(ValueError, match=needle):
        T.parse_prompt(prompt)


# -----------------------------------------------------------------------------------------------
# Train / held-out split


def test_split_is_the_documented_hash_and_is_deterministic():
    rng = np.random.default_rng(1)
    for _ in range(200):
        prompt = T.spec_to_prompt(T.sample_spec(rng, "any", "train" if rng.random() < 0.5 else "heldout"))
        h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
        assert T.prompt_split(prompt) == ("heldout" if h % 100 < 15 else "train")
    assert T.heldout_prompts("counting", 50, seed=3) == T.heldout_prompts("counting", 50, seed=3)
    assert T.heldout_prompts("composition", 50, seed=3) == T.heldout_prompts("composition", 50, seed=3)


def test_split_is_disjoint_and_about_15_percent():
    train = T.train_prompts()
    assert train == T.train_prompts()
    assert len(set(train)) == len(train)
    assert {w for p in train for w in p.split()} == set(T.VOCABULARY)   # the tokenizers see every word
    heldout = T.heldout_prompts("counting", 200) + T.heldout_prompts("composition", 200)
    assert not set(train) & set(heldout)
    assert all(T.prompt_split(p) == "heldout" for p in heldout)
    assert all(T.prompt_split(p) == "train" for p in train)
    assert {len(T.parse_prompt(p).relations) > 0 for p in T.heldout_prompts("composition", 50)} == {True}
    # The held-out share among distinct prompts: the hash acts as a fair coin with p = 0.15, so
    # over n prompts the share has std sqrt(p (1 - p) / n); allow 4 std.
    rng = np.random.default_rng(2)
    prompts = {T.spec_to_prompt(T._sample_counting(rng)) for _ in range(3000)}
    prompts |= {T.spec_to_prompt(T._sample_composition(rng)) for _ in range(3000)}
    share = np.mean([T.prompt_split(p) == "heldout" for p in prompts])
    assert abs(share - 0.15) < 4 * np.sqrt(0.15 * 0.85 / len(prompts)), (share, len(prompts))


def test_every_v1_prompt_is_still_valid():
    # The first world: counts one..five, at most 6 objects in at most 3 counting groups.
    rng = np.random.default_rng(4)
    for _ in range(300):
        n = int(rng.integers(1, 4))
        counts = rng.integers(1, 6, size=n)
        if counts.sum() > 6:
            continue
        cats = [T.CATEGORIES[i] for i in rng.choice(len(T.CATEGORIES), n, replace=False)]
        spec = Spec(tuple(Group(int(k), c, s) for k, (c, s) in zip(counts, cats)))
        assert T.parse_prompt(T.spec_to_prompt(spec)) == spec


def test_hard_split_is_held_out_and_defined_by_structure():
    hard = T.heldout_prompts("counting", 200, split="hard") + T.heldout_prompts("composition", 100, split="hard")
    assert len(set(hard)) == 300
    for prompt in hard:
        spec = T.parse_prompt(prompt)
        assert T.prompt_split(prompt) == "heldout"
        assert len(spec.groups) >= 3 or spec.n_objects >= 7
    # ... and every held-out prompt of that structure can be drawn: the first k are fixed by the rule.
    assert T.heldout_prompts("counting", 8, split="hard") == hard[:8]
    easy = [p for p in T.heldout_prompts("counting", 200) if not T.is_hard(T.parse_prompt(p))]
    assert easy and not set(easy) & set(hard)


def test_bad_kind_or_split_is_a_value_error():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kind"):
        T.sample_spec(rng, "counts")
    with pytest.raises(ValueError, match="split"):
        T.sample_spec(rng, "any", "test")
    with pytest.raises(ValueError, match="evaluation prompts"):
        T.heldout_prompts("counting", 4, split="train")


# -----------------------------------------------------------------------------------------------
# Renderer


def test_shape_coverage_matches_the_analytic_area():
    # Supersampling at 4x4 per pixel: the area error is at most ~ perimeter x (1/4 px) / 2.
    for side, x0, y0 in ((7.3, 3.6, 5.2), (10.0, 2.0, 2.0), (8.55, 10.1, 1.9)):
        rows, cols = range(0, T.IMAGE_SIZE), range(0, T.IMAGE_SIZE)
        for shape, area, perimeter in (("circle", np.pi * side ** 2 / 4, np.pi * side),
                                       ("square", side ** 2, 4 * side),
                                       ("triangle", side ** 2 / 2, (1 + np.sqrt(5)) * side)):
            got = T.shape_coverage(shape, x0, y0, side, rows, cols).sum()
            assert abs(got - area) <= perimeter / 8, (shape, side, got, area)


def test_render_is_seeded_bounded_and_anti_aliased():
    rng = np.random.default_rng(0)
    specs = [T.sample_spec(rng, "any") for _ in range(16)]
    a = T.render_batch(specs, np.random.default_rng(5))
    b = T.render_batch(specs, np.random.default_rng(5))
    c = T.render_batch(specs, np.random.default_rng(6))
    assert a.shape == (16, 3, T.IMAGE_SIZE, T.IMAGE_SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    # Anti-aliasing: edge pixels mix background and colour (coverage strictly inside (0, 1)).
    coverage, _, _ = T.unmix(a)                                       # (B, K, H, W)
    partial = ((coverage > 0.1) & (coverage < 0.9)).any(1)
    assert partial.float().mean() > 0.03
    assert T.render(specs[0], np.random.default_rng(0), size=64).shape == (3, 64, 64)


def test_layout_has_gaps_margins_and_relations():
    rng = np.random.default_rng(3)
    for i in range(N_RENDERS):
        spec = T.sample_spec(rng, "composition" if i % 2 else "counting")
        placed = T.sample_layout(spec, rng)
        assert [(p.colour, p.shape) for p in placed].count((spec.groups[0].colour, spec.groups[0].shape)) \
            == spec.groups[0].count
        for j, p in enumerate(placed):
            assert T.MARGIN - 1e-9 <= p.x0 and p.x0 + p.side <= T.IMAGE_SIZE - T.MARGIN + 1e-9
            assert T.MARGIN - 1e-9 <= p.y0 and p.y0 + p.side <= T.IMAGE_SIZE - T.MARGIN + 1e-9
            assert p.side >= 0.85 * T.SIDE_RANGE[spec.n_objects][0]   # crowded layouts may shrink a little
            for q in placed[j + 1:]:   # separated along x or y by at least GAP
                assert (p.x0 + p.side + T.GAP <= q.x0 + 1e-9 or q.x0 + q.side + T.GAP <= p.x0 + 1e-9 or
                        p.y0 + p.side + T.GAP <= q.y0 + 1e-9 or q.y0 + q.side + T.GAP <= p.y0 + 1e-9)
        for r in spec.relations:
            subject = [p for p in placed if p.group == r.subject]
            obj = [p for p in placed if p.group == r.object]
            # Stronger than the centroid rule the reward checks: whole boxes are on either side.
            if r.relation == "left of":
                assert max(p.x0 + p.side for p in subject) < min(p.x0 for p in obj)
            elif r.relation == "right of":
                assert min(p.x0 for p in subject) > max(p.x0 + p.side for p in obj)
            elif r.relation == "above":
                assert max(p.y0 + p.side for p in subject) < min(p.y0 for p in obj)
            else:
                assert min(p.y0 for p in subject) > max(p.y0 + p.side for p in obj)


def test_gaussian_blur():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(T.gaussian_blur(x, 0.0), x)
    blurred = T.gaussian_blur(x, 1.0)
    assert blurred.shape == x.shape
    assert blurred.std() < x.std()                                   # smoother
    assert torch.allclose(T.gaussian_blur(torch.ones(1, 1, 8, 8), 1.5), torch.ones(1, 1, 8, 8))


# -----------------------------------------------------------------------------------------------
# Detector


def renders(seed, n=N_RENDERS, kind="any", size=T.IMAGE_SIZE):
    rng = np.random.default_rng(seed)
    specs = [T.sample_spec(rng, kind) for _ in range(n)]
    layouts = [T.sample_layout(s, rng, size) for s in specs]
    return specs, layouts, torch.from_numpy(np.stack([T.draw(p, size) for p in layouts]))


@pytest.fixture(scope="module")
def accuracy_set():
    return renders(seed=10)


@pytest.mark.parametrize("blur, noise", [
    (0.0, 0.0),     # clean renders
    (1.0, 0.0),     # Gaussian blur, std 1 px
    (0.0, 0.1),     # additive Gaussian noise, std 0.1 per channel (then clipped to [0, 1])
    (0.8, 0.08),    # both
])
def test_detector_counts_exactly(accuracy_set, blur, noise):
    specs, _, images = accuracy_set
    g = torch.Generator().manual_seed(0)
    images = (T.gaussian_blur(images, blur) + noise * torch.randn(images.shape, generator=g)).clamp(0, 1)
    found = T.detect(images)
    exact = sum(T.count(f) == s.counts() for f, s in zip(found, specs))
    assert exact >= 0.99 * len(specs), f"{exact}/{len(specs)} exact"


def test_detections_locate_the_objects():
    specs, layouts, images = renders(seed=11, n=100)
    for found, placed in zip(T.detect(images), layouts):
        assert len(found) == len(placed)
        for p in placed:   # each object has a detection of its category within 0.25 px of its centroid
            x, y = p.centre
            d = min(found, key=lambda d: (d.x - x) ** 2 + (d.y - y) ** 2)
            assert (d.colour, d.shape) == (p.colour, p.shape)
            assert abs(d.x - x) < 0.25 and abs(d.y - y) < 0.25
            assert d.bbox[0] <= x <= d.bbox[2] and d.bbox[1] <= y <= d.bbox[3]
            area = p.side ** 2 * T.SHAPE_AREA[p.shape]
            assert abs(d.area - area) < 0.05 * area + 1


def test_relations_of_renders_hold_under_the_detector():
    specs, _, images = renders(seed=12, n=100, kind="composition")
    for spec, found in zip(specs, T.detect(images)):
        for r in spec.relations:
            s, o = spec.groups[r.subject], spec.groups[r.object]
            subject = [d for d in found if (d.colour, d.shape) == (s.colour, s.shape)]
            obj = [d for d in found if (d.colour, d.shape) == (o.colour, o.shape)]
            assert T.relation_holds(subject, r.relation, obj)
            opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
            assert not T.relation_holds(subject, opposite[r.relation], obj)
            assert T.relation_holds(obj, opposite[r.relation], subject)


def test_detector_scales_with_image_size():
    specs, _, images = renders(seed=13, n=40, size=96)
    found = T.detect(images)
    assert sum(T.count(f) == s.counts() for f, s in zip(found, specs)) == len(specs)


def test_detector_sees_nothing_in_background_noise():
    bg = torch.tensor(T.BACKGROUND).view(1, 3, 1, 1).expand(8, 3, 48, 48)
    noisy = (bg + 0.1 * torch.randn(8, 3, 48, 48, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert T.detect(noisy) == [[] for _ in range(8)]


def test_detect_input_checks():
    _, _, images = renders(seed=14, n=2)
    assert T.detect(images[0]) == T.detect(images[:1])          # a single (3, H, W) image
    assert T.detect(images.numpy()) == T.detect(images)          # numpy input
    with pytest.raises(ValueError, match="RGB"):
        T.detect(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="relation"):
        T.relation_holds([], "near", [])


# -----------------------------------------------------------------------------------------------
# Fidelity


def test_fidelity_prefers_the_clean_render_to_blur_and_ghosts():
    specs, layouts, images = renders(seed=15, n=60)
    clean = T.fidelity(images)
    assert clean.shape == (60,) and clean.min() > 0.99          # a clean scene explains itself
    blurred = T.fidelity(T.gaussian_blur(images, 1.0))
    # A faint ghost: one more object at 30% opacity, below the detector's half-coverage threshold.
    bg = torch.tensor(T.BACKGROUND).view(1, 3, 1, 1)
    ghost = torch.from_numpy(T.draw([T.Placed("red", "circle", 0.0, 0.0, 10.0, 0)]))[None] - bg
    ghosted_images = (images + 0.3 * ghost).clamp(0, 1)
    assert [T.count(f) for f in T.detect(ghosted_images)] == [T.count(f) for f in T.detect(images)]
    ghosted = T.fidelity(ghosted_images)
    assert (blurred < clean - 0.1).all() and (ghosted < clean - 0.01).all()
    assert T.fidelity(torch.tensor(T.BACKGROUND).view(1, 3, 1, 1).expand(2, 3, 48, 48)).tolist() == [0.0, 0.0]
