"""
The shape world: a tiny text-to-image world whose rewards are exact.

The paper evaluates inference-time search on two text-to-image tasks (Kim et al. 2025, Sec. 7):
counting ("quantity-aware" prompts from T2I-CompBench++, reward -RSS from GroundingDINO counts)
and compositional prompts (GenAI-Bench, reward VQAScore). Both rewards are large models. Here the
images are 48x48 renders of coloured shapes, so the same two rewards become exact and cheap:

    grammar     prompts such as "three red circles and one blue square" (counting) or
                "a red circle left of a blue square" (composition), a `Spec` behind every prompt
    split       a fixed hash of the canonical prompt holds ~15% of all prompts out of training;
                the "hard" held-out prompts are those with >= 3 groups or >= 7 objects
    renderer    random non-overlapping layouts that respect the relations, anti-aliased
    detector    exact object detection: colour unmixing of each pixel, connected components,
                shape by fitting rendered (and blurred) circles, squares and triangles

Coordinates: x to the right, y downwards (row 0 is the top of the image), in pixels, pixel (i, j)
covering [j, j + 1] x [i, i + 1]. "above" means a smaller y.

Design choices, and why:
  * A dark background. Every palette colour has a channel near 1 where the background is near 0,
    so each colour stands out by a large RGB distance; on white, yellow would differ in the blue
    channel only.
  * Four saturated colours x three shapes = 12 categories, counts one..eight, up to 4 groups and
    at most 10 objects per image (T2I-CompBench++ numeracy asks for several categories with counts
    up to ~8), so objects of 8-18 pixels fit without overlap and stay recognisable at 48x48 (a
    3 px gap between them keeps blurred neighbours apart). This is the second version of the
    world: the first had 32x32 images, counts up to five and 6 objects, and was too easy for the
    budgets of the paper (best-of-N counted every held-out prompt right from 200 NFE). Its grammar
    is a subset of this one, so every v1 prompt still parses.
  * 48x48 instead of 32x32 at the same cost per NFE: the model reads 3x3 pixel blocks
    (`model.PixelLatent(3)`), so FLUX still sees 8x8 = 64 tokens, each 6x6 pixels (real FLUX: 16x16).
  * Relations are between two groups and are checked on centroids: "A left of B" holds when every
    A object's centroid is left of every B object's centroid. The renderer guarantees more (the
    groups are separated by a gap line), so a blurry generated image can still pass.
  * A group names its category once: "one red circle and two red circles" is rejected, so
    every fact of a prompt (a count per category, a relation) is exactly checkable.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------
# Vocabulary

COLOURS: dict[str, tuple[float, float, float]] = {  # RGB in [0, 1], saturated and far apart
    "red": (0.92, 0.13, 0.12),
    "green": (0.13, 0.78, 0.20),
    "blue": (0.18, 0.32, 0.98),
    "yellow": (0.96, 0.86, 0.14),
}
BACKGROUND = (0.07, 0.07, 0.09)        # near-black: each colour >= 0.72 away in RGB, and >= 0.73 from each other
SHAPES = ("circle", "square", "triangle")
CATEGORIES = [(c, s) for c in COLOURS for s in SHAPES]   # the 12 (colour, shape) categories, fixed order
COUNT_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
RELATIONS = ("left of", "right of", "above", "below")
MAX_OBJECTS = 10                       # objects per image (sum of all counts)
MAX_GROUPS = 4                         # (colour, shape) groups per prompt
IMAGE_SIZE = 48                        # pixels per side; the geometry below is defined at this size
HELDOUT_PERCENT = 15                   # share of canonical prompts held out of training
HARD_GROUPS, HARD_OBJECTS = 3, 7       # a held-out prompt is "hard" with >= 3 groups or >= 7 objects

VOCABULARY = sorted({"a", "and", *COUNT_WORDS, *COLOURS, *SHAPES, *(s + "s" for s in SHAPES),
                     *(w for r in RELATIONS for w in r.split())})


# -----------------------------------------------------------------------------------------------
# Specs: what a prompt asks for


@dataclass(frozen=True)
class Group:
    count: int          # number of objects, 1..8
    colour: str         # a key of COLOURS
    shape: str          # one of SHAPES


@dataclass(frozen=True)
class Relation:
    subject: int        # index of a group in Spec.groups
    relation: str       # one of RELATIONS, read "groups[subject] <relation> groups[object]"
    object: int         # index of a group; always subject + 1 (the prompt says them in a row)


@dataclass(frozen=True)
class Spec:
    groups: tuple[Group, ...]               # in prompt order; categories are distinct
    relations: tuple[Relation, ...] = ()    # each group takes part in at most one relation

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)

    def counts(self) -> dict[tuple[str, str], int]:
        """{(colour, shape): count} over the prompt's categories."""
        return {(g.colour, g.shape): g.count for g in self.groups}


def check_spec(spec: Spec) -> Spec:
    """Raise ValueError unless `spec` is a well-formed shape-world spec; return it."""
    if not spec.groups:
        raise ValueError("a spec needs at least one object group")
    if len(spec.groups) > MAX_GROUPS:
        raise ValueError(f"at most {MAX_GROUPS} object groups per prompt, got {len(spec.groups)}")
    for g in spec.groups:
        if g.colour not in COLOURS or g.shape not in SHAPES or not 1 <= g.count <= max(COUNT_WORDS.values()):
            raise ValueError(f"bad group {g}: colours {list(COLOURS)}, shapes {list(SHAPES)}, "
                             f"counts 1..{max(COUNT_WORDS.values())}")
    categories = [(g.colour, g.shape) for g in spec.groups]
    if len(set(categories)) != len(categories):
        raise ValueError(f"each colour+shape may be named once per prompt, got {categories}")
    if spec.n_objects > MAX_OBJECTS:
        raise ValueError(f"at most {MAX_OBJECTS} objects fit in one image, the prompt asks for {spec.n_objects}")
    used = [i for r in spec.relations for i in (r.subject, r.object)]
    for r in spec.relations:
        if r.relation not in RELATIONS or r.object != r.subject + 1 or not 0 <= r.subject < len(spec.groups) - 1:
            raise ValueError(f"bad relation {r}: relations are {RELATIONS} between groups i and i + 1")
    if len(set(used)) != len(used):
        raise ValueError(f"a group may take part in one relation only, got {spec.relations}")
    return spec


def group_to_text(g: Group, use_article: bool) -> str:
    if g.count == 1:
        return f"{'a' if use_article else 'one'} {g.colour} {g.shape}"
    word = next(w for w, n in COUNT_WORDS.items() if n == g.count)
    return f"{word} {g.colour} {g.shape}s"


def spec_to_prompt(spec: Spec) -> str:
    """The canonical prompt of a spec: clauses joined by "and", a clause being a group or
    "group relation group". Count 1 reads "a" in prompts with relations, "one" otherwise."""
    check_spec(spec)
    article = bool(spec.relations)
    by_subject = {r.subject: r for r in spec.relations}
    clauses, i = [], 0
    while i < len(spec.groups):
        text = group_to_text(spec.groups[i], article)
        if i in by_subject:
            text += f" {by_subject[i].relation} {group_to_text(spec.groups[i + 1], article)}"
            i += 1
        clauses.append(text)
        i += 1
    return " and ".join(clauses)


def parse_prompt(prompt: str) -> Spec:
    """Inverse of spec_to_prompt. Accepts "a" and "one" for a count of 1, any case and spacing,
    and a final full stop. A relation binds the single group after it:
    "a red circle left of a blue square and a green triangle" has one relation."""
    words = prompt.lower().replace(",", " ").strip().rstrip(".").split()
    unknown = sorted({w for w in words if w not in VOCABULARY})
    if unknown:
        raise ValueError(f"prompt {prompt!r} uses words outside the shape world: {unknown}. "
                         f"Known words: {' '.join(VOCABULARY)}")
    pos = 0

    def expect(what: str, allowed) -> str:
        nonlocal pos
        if pos >= len(words) or words[pos] not in allowed:
            got = repr(words[pos]) if pos < len(words) else "the end of the prompt"
            raise ValueError(f"prompt {prompt!r}: expected {what} at word {pos + 1}, got {got}")
        pos += 1
        return words[pos - 1]

    def group() -> Group:
        count = expect(f"a count (a, one .. {list(COUNT_WORDS)[-1]})", {"a", *COUNT_WORDS})
        n = 1 if count == "a" else COUNT_WORDS[count]
        colour = expect(f"a colour ({', '.join(COLOURS)})", COLOURS)
        shapes = SHAPES if n == 1 else tuple(s + "s" for s in SHAPES)
        shape = expect(f"a {'singular' if n == 1 else 'plural'} shape after {count!r} ({', '.join(shapes)})", shapes)
        return Group(n, colour, shape[:-1] if n > 1 else shape)

    groups, relations = [], []
    while True:
        groups.append(group())
        if pos < len(words) and words[pos] != "and":
            first = expect("'and', or a relation (left of, right of, above, below)",
                           {"left", "right", "above", "below"})
            if first in ("left", "right"):
                expect("'of'", {"of"})
                first += " of"
            relations.append(Relation(len(groups) - 1, first, len(groups)))
            groups.append(group())
        if pos == len(words):
            break
        expect("'and'", {"and"})
    return check_spec(Spec(tuple(groups), tuple(relations)))


# -----------------------------------------------------------------------------------------------
# Sampling specs and the train / held-out split


def prompt_split(prompt: str) -> str:
    """Return "train" or "heldout", fixed by a hash of the canonical prompt.

    sha256 of the canonical text (not Python's salted `hash`), so the split is the same on every
    machine and run; a prompt is held out when the hash is 0..14 mod 100, i.e. ~15% of prompts.
    Spelling variants ("one" for "a") share the canonical prompt, so they share its split.
    """
    canonical = spec_to_prompt(parse_prompt(prompt))
    h = int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def is_hard(spec: Spec) -> bool:
    """The "hard" structure: >= HARD_GROUPS groups or >= HARD_OBJECTS objects. Fixed by the prompt's
    structure (not by any model's results); the hard held-out split is held-out and hard."""
    return len(spec.groups) >= HARD_GROUPS or spec.n_objects >= HARD_OBJECTS


def _distinct_categories(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    return [CATEGORIES[i] for i in rng.choice(len(CATEGORIES), size=n, replace=False)]


def _sample_counting(rng: np.random.Generator) -> Spec:
    n_groups = int(rng.integers(1, MAX_GROUPS + 1))
    top = max(COUNT_WORDS.values())
    while True:  # counts uniform on 1..8 each, conditioned on the total fitting in the image
        counts = rng.integers(1, top + 1, size=n_groups)
        if counts.sum() <= MAX_OBJECTS:
            break
    return Spec(tuple(Group(int(n), c, s) for n, (c, s) in zip(counts, _distinct_categories(rng, n_groups))))


def _sample_composition(rng: np.random.Generator) -> Spec:
    # One relational clause, then with probability 1/2 a second clause (a relation or a lone group).
    # Counts are 1 (3/4) or 2 (1/4): composition is about binding attributes and places, not counting.
    second = rng.integers(0, 4)                        # 0, 1: none; 2: lone group; 3: a relation
    n_groups = 2 + (second >= 2) + (second == 3)
    cats = _distinct_categories(rng, n_groups)
    while True:  # counts conditioned on the total fitting in the image
        groups = tuple(Group(1 + int(rng.random() < 0.25), c, s) for c, s in cats)
        if sum(g.count for g in groups) <= MAX_OBJECTS:
            break
    relations = [Relation(0, RELATIONS[rng.integers(4)], 1)]
    if second == 3:
        relations.append(Relation(2, RELATIONS[rng.integers(4)], 3))
    return Spec(groups, tuple(relations))


SPLITS = ("train", "heldout", "hard")   # "hard": held-out prompts with is_hard(spec)


def sample_spec(rng: np.random.Generator, kind: str = "any", split: str = "train") -> Spec:
    """A random spec of `kind` ("counting", "composition" or "any" = either with probability 1/2)
    whose canonical prompt is in `split` ("train", "heldout", or "hard" = held out and is_hard);
    rejection-sampled, so the distribution is the one of the kind restricted to the split."""
    if kind not in ("any", "counting", "composition"):
        raise ValueError(f"kind must be 'any', 'counting' or 'composition', got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:
        k = kind if kind != "any" else ("counting", "composition")[rng.integers(2)]
        spec = _sample_counting(rng) if k == "counting" else _sample_composition(rng)
        in_split = prompt_split(spec_to_prompt(spec))
        if in_split == split or (split == "hard" and in_split == "heldout" and is_hard(spec)):
            return spec


def train_prompts(n: int = 4000, seed: int = 0) -> list[str]:
    """A fixed corpus of distinct training-split prompts (for training the tokenizers). It covers
    every word of VOCABULARY (checked) and holds no held-out prompt."""
    rng = np.random.default_rng(seed)
    prompts: dict[str, None] = {}
    for _ in range(50 * n):
        prompts[spec_to_prompt(sample_spec(rng, "any", "train"))] = None
        if len(prompts) == n:
            break
    missing = set(VOCABULARY) - {w for p in prompts for w in p.split()}
    assert not missing, f"training corpus misses words {missing}"
    return list(prompts)


def heldout_prompts(kind: str = "counting", n: int = 100, seed: int = 0, split: str = "heldout") -> list[str]:
    """A fixed evaluation set: n distinct prompts of `kind` from `split` ("heldout" or "hard"),
    in sampling order (so the first k of a set are fixed by the rule, not by any result)."""
    if split not in ("heldout", "hard"):
        raise ValueError(f"evaluation prompts come from 'heldout' or 'hard', got {split!r}")
    rng = np.random.default_rng(seed)
    prompts: dict[str, None] = {}
    for _ in range(50 * n):
        prompts[spec_to_prompt(sample_spec(rng, kind, split))] = None
        if len(prompts) == n:
            return list(prompts)
    raise ValueError(f"could not find {n} distinct {split} {kind} prompts; ask for fewer")


# -----------------------------------------------------------------------------------------------
# Renderer


@dataclass(frozen=True)
class Placed:
    colour: str     # a key of COLOURS
    shape: str      # one of SHAPES
    x0: float       # left edge of the bounding box, pixels
    y0: float       # top edge of the bounding box, pixels
    side: float     # bounding-box side, pixels (a square box for every shape)
    group: int      # index of the spec group it belongs to

    @property
    def centre(self) -> tuple[float, float]:
        # The centroid of the filled shape; an upright triangle's is 2/3 of the way down.
        return self.x0 + self.side / 2, self.y0 + self.side * (2 / 3 if self.shape == "triangle" else 1 / 2)


# Object side in pixels at 48x48, by number of objects in the image: large when alone, >= 7.5 when
# ten must fit with their gaps (below ~6.5 px a blurred square and circle become hard to tell).
SIDE_RANGE = {1: (13.0, 18.0), 2: (12.0, 16.0), 3: (11.0, 14.0), 4: (10.0, 13.0), 5: (9.5, 12.0),
              6: (9.0, 11.0), 7: (8.5, 10.5), 8: (8.0, 10.0), 9: (8.0, 9.0), 10: (7.5, 8.5)}
GAP = 3.0           # minimum distance between bounding boxes, pixels at 48x48 (keeps blurred objects apart)
MARGIN = 0.75       # minimum distance to the image border, pixels at 48x48


def shape_coverage(shape: str, x0: float, y0: float, side: float, rows: range, cols: range,
                   supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel in rows x cols covered by the shape with bounding box (x0, y0, side),
    measured on supersample x supersample sub-pixel centres: (len(rows), len(cols)) float32."""
    ss = supersample
    x = cols.start + (np.arange(len(cols) * ss) + 0.5) / ss                # sub-pixel centres, (w*ss,)
    y = (rows.start + (np.arange(len(rows) * ss) + 0.5) / ss)[:, None]     # (h*ss, 1)
    if shape == "circle":
        r = side / 2
        inside = (x - x0 - r) ** 2 + (y - y0 - r) ** 2 <= r * r
    elif shape == "square":
        inside = (x >= x0) & (x <= x0 + side) & (y >= y0) & (y <= y0 + side)
    else:  # upright triangle: apex at the top centre, base along the bottom edge
        inside = (y <= y0 + side) & (np.abs(x - x0 - side / 2) <= (y - y0) / 2)
    return inside.reshape(len(rows), ss, len(cols), ss).mean(axis=(1, 3), dtype=np.float32)  # (h, w)


def sample_layout(spec: Spec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> list[Placed]:
    """Random sizes and positions for every object of `spec`, no two bounding boxes closer than
    GAP, every relation true with room to spare: the two groups of a relation lie on either side
    of a random line, each keeping GAP / 2 from it.

    Objects are placed largest first, each uniformly among the still free positions (on a
    0.25-pixel lattice), which packs ten objects of >= 7.5 px where blind rejection sampling jams.
    After every 10 failed attempts the objects shrink by 2%.
    """
    check_spec(spec)
    unit, step = size / IMAGE_SIZE, 0.25 * size / IMAGE_SIZE
    gap, margin = GAP * unit, MARGIN * unit
    lo, hi = SIDE_RANGE[spec.n_objects]
    for attempt in range(200):
        # Allowed box (x_min, y_min, x_max, y_max) of each group, cut by its relation, if any.
        regions = [[margin, margin, size - margin, size - margin] for _ in spec.groups]
        for r in spec.relations:
            first, second = (r.subject, r.object) if r.relation in ("left of", "above") else (r.object, r.subject)
            axis = 0 if r.relation in ("left of", "right of") else 1          # 0: a vertical line
            share = spec.groups[first].count / (spec.groups[first].count + spec.groups[second].count)
            line = np.clip(share + rng.uniform(-0.1, 0.1), 0.3, 0.7) * size   # room by head count
            regions[first][2 + axis] = line - gap / 2
            regions[second][axis] = line + gap / 2
        objects = sorted(((rng.uniform(lo, hi) * unit, gi) for gi, g in enumerate(spec.groups)
                          for _ in range(g.count)), reverse=True)
        placed: list[Placed] = []
        for side, gi in objects:
            x_min, y_min, x_max, y_max = regions[gi]
            xs = x_min + rng.uniform(0, step) + np.arange(0, max(0.0, x_max - x_min - side), step)
            ys = y_min + rng.uniform(0, step) + np.arange(0, max(0.0, y_max - y_min - side), step)
            xs, ys = xs[xs + side <= x_max], ys[ys + side <= y_max]
            free = np.ones((len(ys), len(xs)), dtype=bool)                   # (rows, cols) of x0, y0
            for p in placed:
                near_x = (xs < p.x0 + p.side + gap) & (xs + side + gap > p.x0)
                near_y = (ys < p.y0 + p.side + gap) & (ys + side + gap > p.y0)
                free &= ~(near_y[:, None] & near_x[None, :])
            options = np.flatnonzero(free)
            if len(options) == 0:
                break
            i = options[rng.integers(len(options))]
            g = spec.groups[gi]
            placed.append(Placed(g.colour, g.shape, float(xs[i % len(xs)]), float(ys[i // len(xs)]), side, gi))
        if len(placed) == spec.n_objects:
            return sorted(placed, key=lambda p: p.group)
        if attempt % 10 == 9:
            lo, hi = 0.98 * lo, 0.98 * hi
    raise AssertionError(f"no layout found for {spec_to_prompt(spec)!r}")


def draw(placed: list[Placed], size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """Rasterise placed shapes into a (3, size, size) float32 image in [0, 1], anti-aliased by
    supersampling (each pixel gets the covered fraction of its sub-pixel centres)."""
    bg = np.array(BACKGROUND, dtype=np.float32)
    image = np.broadcast_to(bg[:, None, None], (3, size, size)).copy()
    for p in placed:
        rows = range(int(np.floor(p.y0)), min(size, int(np.ceil(p.y0 + p.side))))
        cols = range(int(np.floor(p.x0)), min(size, int(np.ceil(p.x0 + p.side))))
        coverage = shape_coverage(p.shape, p.x0, p.y0, p.side, rows, cols, supersample)
        colour = np.array(COLOURS[p.colour], dtype=np.float32)
        # Objects never overlap, so each pixel mixes the background with at most one colour.
        image[:, rows.start:rows.stop, cols.start:cols.stop] += coverage[None] * (colour - bg)[:, None, None]
    return image


def render(spec: Spec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One random image of `spec`: (3, size, size) float32 numpy array in [0, 1]."""
    return draw(sample_layout(spec, rng, size), size)


def render_batch(specs: list[Spec], rng: np.random.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images of `specs`, (B, 3, size, size) float32 in [0, 1]."""
    return torch.from_numpy(np.stack([render(s, rng, size) for s in specs]))


def gaussian_kernels(sigmas: list[float]) -> torch.Tensor:
    """1-D Gaussian kernels of std `sigmas` (pixels; 0 = identity), padded to one length: (S, K)."""
    radius = max(1, int(np.ceil(3 * max(sigmas))))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.stack([torch.exp(-0.5 * (t / s) ** 2) if s > 0 else (t == 0).float() for s in sigmas])
    return k / k.sum(1, keepdim=True)                                             # (S, K)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) images (std `sigma` pixels, reflect padding);
    the degradation used to test the detector and to augment the learned counter."""
    if sigma <= 0:
        return images
    k = gaussian_kernels([sigma]).to(images.dtype)                               # (1, K)
    radius = k.shape[1] // 2
    B, C, H, W = images.shape
    x = images.reshape(B * C, 1, H, W)                                            # (B*C, 1, H, W)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return x.reshape(B, C, H, W)                                                  # (B, C, H, W)


# -----------------------------------------------------------------------------------------------
# Exact detector
#
# 1. Colour unmixing: every pixel is read as background + a * (colour - background).
# 2. Connected components of same-colour pixels with a >= 1/2.
# 3. Shape by analysis-by-synthesis: around each component, the soft map a is compared (least
#    squares) with each shape rendered at the component's centroid and area (both unchanged by
#    blur) and blurred by a few widths; the best fit names the shape. Fill-ratio rules were tried
#    first and fail under blur (a blurred triangle's fill ratio reaches a circle's).


@dataclass(frozen=True)
class Detection:
    colour: str                         # a key of COLOURS
    shape: str                          # one of SHAPES
    x: float                            # centroid, pixels from the left edge
    y: float                            # centroid, pixels from the top edge
    area: float                         # soft area (sum of a), pixels; blur does not change it
    bbox: tuple[int, int, int, int]     # (x0, y0, x1, y1) pixel bounds of the component, x1, y1 exclusive


MIN_COVERAGE = 0.5                 # a pixel belongs to an object when it is at least half the colour
MAX_RESIDUAL = 0.4                 # max RGB distance to the background-colour segment; rejects odd colours
MIN_AREA = 10.0                    # soft area (pixels at 48x48) below which a component is noise
FIT_BLURS = [0.0, 0.4, 0.8, 1.2, 1.6]   # blur widths (pixels at 48x48) tried when fitting a shape
FIT_DILATE = 2                     # the fit looks this many pixels beyond the component (blur tails)
SHAPE_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}   # area / side^2


def unmix(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Colour unmixing of (B, 3, H, W) images.

    For palette colour k with d_k = colour_k - background, a_k = <p - bg, d_k> / |d_k|^2 is the
    least-squares mixing weight of pixel p. The pixel takes the colour whose segment
    [background, colour_k] is nearest, and is foreground when its a >= MIN_COVERAGE and that
    distance is <= MAX_RESIDUAL, so anti-aliased or blurred edges are cut at half coverage.
    Returns a (B, K, H, W), colour index (B, H, W) and foreground mask (B, H, W).
    """
    bg = torch.tensor(BACKGROUND, dtype=images.dtype).view(1, 3, 1, 1)
    d = torch.tensor(list(COLOURS.values()), dtype=images.dtype) - bg.view(1, 3)   # (K, 3)
    d2 = (d * d).sum(1).view(1, -1, 1, 1)                                          # |d_k|^2, (1, K, 1, 1)
    v = images - bg                                                                # (B, 3, H, W)
    vd = torch.einsum("bchw,kc->bkhw", v, d)                                       # <v, d_k>, (B, K, H, W)
    a = vd / d2
    # |v - c d|^2 = |v|^2 - 2 c <v, d> + c^2 |d|^2 with c = a clamped to the segment [0, 1]
    c = a.clamp(0, 1)
    dist = ((v * v).sum(1, keepdim=True) - 2 * c * vd + c * c * d2).clamp_min(0).sqrt()  # (B, K, H, W)
    colour = dist.argmin(1)                                                        # (B, H, W)
    a_best = a.gather(1, colour[:, None])[:, 0]
    dist_best = dist.gather(1, colour[:, None])[:, 0]
    return a, colour, (a_best >= MIN_COVERAGE) & (dist_best <= MAX_RESIDUAL)


def label_components(colour: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """4-connected components of same-colour foreground pixels, (B, H, W) -> (B, H, W) labels
    (-1 = background). Each pixel starts with its own flat index and repeatedly takes the smallest
    label among its same-colour neighbours until nothing changes (about an object's diameter of
    iterations); a component is then labelled by the flat index of one of its pixels."""
    B, H, W = colour.shape
    big = H * W
    labels = torch.where(fg, torch.arange(big).view(1, H, W).expand(B, H, W), big)
    key = torch.where(fg, colour, -1)
    pad_l = F.pad(labels, (1, 1, 1, 1), value=big)                                # (B, H+2, W+2)
    pad_k = F.pad(key, (1, 1, 1, 1), value=-2)
    while True:
        pad_l[:, 1:-1, 1:-1] = labels
        new = labels
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):       # up, down, left, right neighbours
            same = (pad_k[:, dy:dy + H, dx:dx + W] == key) & fg
            new = torch.where(same, torch.minimum(new, pad_l[:, dy:dy + H, dx:dx + W]), new)
        if torch.equal(new, labels):
            return torch.where(fg, labels, -1)
        labels = new


@functools.lru_cache(maxsize=256)
def blur_matrices(n: int, sigmas: tuple[float, ...]) -> np.ndarray:
    """(S, n, n): row i of matrix s holds the Gaussian weights (std sigmas[s]) that blurring puts
    on pixel j of a length-n signal, zero outside it; sigma 0 gives the identity. Cached: the
    detector asks for the same few sizes over and over."""
    offset = np.arange(n)[:, None] - np.arange(n)[None, :]                      # (n, n)
    out = []
    for sigma in sigmas:
        if sigma <= 0:
            out.append(np.eye(n, dtype=np.float32))
            continue
        radius = int(np.ceil(3 * sigma))
        norm = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()
        out.append((np.exp(-0.5 * (offset / sigma) ** 2) * (np.abs(offset) <= radius) / norm).astype(np.float32))
    return np.stack(out)                                                         # (S, n, n)


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of an (h, w) mask by a (2r + 1) x (2r + 1) square, separably."""
    h, w = mask.shape
    padded = np.pad(mask, r)                                                      # (h + 2r, w + 2r)
    rows = np.logical_or.reduce([padded[i:i + h] for i in range(2 * r + 1)])     # (h, w + 2r)
    return np.logical_or.reduce([rows[:, j:j + w] for j in range(2 * r + 1)])    # (h, w)


def fit_shape(w: np.ndarray, region: np.ndarray, rows: range, cols: range, x: float, y: float,
              area: float, sigmas: tuple[float, ...]) -> str:
    """The shape whose render best explains the soft map `w` (h, w) on `region` (h, w) bool.

    Each hypothesis is rendered with the measured centroid (x, y) and area, then blurred by every
    width in `sigmas` (pixels); the smallest least-squares error over the region wins.
    """
    renders = []
    for shape in SHAPES:
        side = float(np.sqrt(area / SHAPE_AREA[shape]))
        y0 = y - side * (2 / 3 if shape == "triangle" else 1 / 2)
        renders.append(shape_coverage(shape, x - side / 2, y0, side, rows, cols))
    m = np.stack(renders)                                                         # (3, h, w)
    # Blur as matrix products with Toeplitz matrices (zero padding): blur_y @ m @ blur_x^T.
    blur_y, blur_x = blur_matrices(len(rows), sigmas), blur_matrices(len(cols), sigmas)  # (S, h, h), (S, w, w)
    m = np.matmul(np.matmul(blur_y[None], m[:, None]), blur_x.transpose(0, 2, 1)[None])  # (3, S, h, w)
    error = (((m - w) ** 2) * region).sum((2, 3))                                 # (3, S)
    return SHAPES[int(error.min(1).argmin())]


def detect(images: torch.Tensor) -> list[list[Detection]]:
    """All objects in a batch of shape-world images (B, 3, H, W) in [0, 1] (a single (3, H, W)
    image, or numpy arrays, are accepted too), as one list of Detections per image."""
    images = torch.as_tensor(images).detach().float().cpu()
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"detect expects RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
    B, _, H, W = images.shape
    a, colour, fg = unmix(images)
    labels = label_components(colour, fg).numpy()
    a, colour = a.numpy(), colour.numpy()
    sigmas = tuple(s * H / IMAGE_SIZE for s in FIT_BLURS)
    pad = FIT_DILATE + 2          # patch margin: the region, and the shape hypotheses beyond it
    names = list(COLOURS)
    out = []
    for b in range(B):
        found = []
        for label in np.unique(labels[b]):
            if label < 0:
                continue
            mask = labels[b] == label
            k = int(colour[b].reshape(-1)[label])
            r_any, c_any = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            bbox = (int(c_any[0]), int(r_any[0]), int(c_any[-1]) + 1, int(r_any[-1]) + 1)
            rows = range(max(0, bbox[1] - pad), min(H, bbox[3] + pad))
            cols = range(max(0, bbox[0] - pad), min(W, bbox[2] + pad))
            window = (slice(rows.start, rows.stop), slice(cols.start, cols.stop))
            patch = mask[window]
            # The component grown by FIT_DILATE pixels (blur tails), minus other objects' pixels.
            region = dilate(patch, FIT_DILATE) & ~((labels[b][window] >= 0) & ~patch)
            w = np.where(region, a[b, k][window], 0.0).astype(np.float32)       # (h, w)
            area = float(w.sum())
            if area < MIN_AREA * H * W / IMAGE_SIZE ** 2:
                continue
            y = float((w.sum(1) * (np.arange(rows.start, rows.stop) + 0.5)).sum()) / area
            x = float((w.sum(0) * (np.arange(cols.start, cols.stop) + 0.5)).sum()) / area
            shape = fit_shape(w, region, rows, cols, x, y, area, sigmas)
            found.append(Detection(names[k], shape, x, y, area, bbox))
        out.append(found)
    return out


def count(detections: list[Detection]) -> dict[tuple[str, str], int]:
    """{(colour, shape): number of detections} for one image."""
    out: dict[tuple[str, str], int] = {}
    for d in detections:
        out[(d.colour, d.shape)] = out.get((d.colour, d.shape), 0) + 1
    return out


def relation_holds(subject: list[Detection], relation: str, obj: list[Detection]) -> bool:
    """True when every subject centroid is strictly on the `relation` side of every object
    centroid ("left of": smaller x; "above": smaller y). False when either side is empty."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; known: {RELATIONS}")
    if not subject or not obj:
        return False
    if relation == "left of":
        return max(d.x for d in subject) < min(d.x for d in obj)
    if relation == "right of":
        return min(d.x for d in subject) > max(d.x for d in obj)
    if relation == "above":
        return max(d.y for d in subject) < min(d.y for d in obj)
    return min(d.y for d in subject) > max(d.y for d in obj)


# -----------------------------------------------------------------------------------------------
# Fidelity: how well an image matches a clean re-render of the scene the detector reads
#
# The counting and composition rewards only read what the detector finds, so a blurry image, or one
# with faint "ghost" objects below the detection threshold, scores as well as a clean one. The
# fidelity score plays the part of the paper's aesthetic score (Sec. 7, a held-out image-quality
# measure): it re-renders every detection as a sharp shape (its colour, shape, centroid and area)
# and measures how much of the image's contrast that clean scene explains.


def rerender(detections: list[Detection], size: int = IMAGE_SIZE) -> np.ndarray:
    """The clean (3, size, size) render of what the detector saw: each detection drawn with its
    colour and shape at its centroid, with the side that gives its measured area."""
    placed = []
    for d in detections:
        side = float(np.sqrt(d.area / SHAPE_AREA[d.shape]))
        x0 = float(np.clip(d.x - side / 2, 0, size - side))
        y0 = float(np.clip(d.y - side * (2 / 3 if d.shape == "triangle" else 1 / 2), 0, size - side))
        placed.append(Placed(d.colour, d.shape, x0, y0, side, 0))
    return np.clip(draw(placed, size), 0, 1)          # clip: two detections could overlap


def fidelity(images: torch.Tensor, found: list[list[Detection]] | None = None) -> torch.Tensor:
    """1 - |image - rerender|_1 / |rerender - background|_1 per image, clamped to [0, 1]: (B,).

    1 for an image that is exactly a clean scene; blur (contrast spread beyond the shapes' edges),
    ghosts (contrast no detection explains), noise and wrong shapes all lower it; 0 when nothing is
    detected. `found` (detect(images)) saves the detection when the caller has it already.
    Measured on 100 renders: 0.999 clean, 0.75 blurred by 1 px, 0.96 with one ghost
    object at 30% opacity, 0.13 with N(0, 0.1^2) noise (L1 counts every grain of noise).
    """
    images = torch.as_tensor(images).detach().float().cpu()
    if images.ndim == 3:
        images = images[None]
    found = detect(images) if found is None else found
    bg = torch.tensor(BACKGROUND).view(3, 1, 1)
    scores = []
    for image, detections in zip(images, found):
        clean = torch.from_numpy(rerender(detections, image.shape[-1]))      # (3, H, W)
        contrast = float((clean - bg).abs().sum())
        if not detections or image.shape[-1] != image.shape[-2] or contrast == 0:
            scores.append(0.0)
            continue
        scores.append(max(0.0, 1.0 - float((image - clean).abs().sum()) / contrast))
    return torch.tensor(scores, dtype=torch.float32)


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    for kind in ("counting", "composition"):
        spec = sample_spec(rng, kind)
        dets = detect(render_batch([spec], rng))[0]
        print(f"{spec_to_prompt(spec)!r} -> {count(dets)}")
