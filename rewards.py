"""
Rewards: the protocol every reward follows, and the shape-world rewards.

Inference-time search (Kim et al. 2025, Sec. 3 and 7) ranks candidate images by a reward r(x0),
evaluated on the Tweedie estimate x0_hat of each particle. The paper's two main tasks use

    quantity-aware   r = -RSS, RSS = sum_i (C_i - C_hat_i)^2 over the object categories i of the
                     prompt, counts C_hat from GroundingDINO (+ SAM de-duplication); accuracy is
                     the share of images with RSS = 0 (paper Sec. 7.2)
    compositional    VQAScore in [0, 1], the probability a VQA model answers "yes" to "does this
                     image show <prompt>?" (paper Sec. 7.1)

and a differentiable aesthetic reward for gradient guidance (App. E.1). In the shape world
(toyworld.py) the first two are exact:

    CountingReward      -RSS from the exact detector, summed over the prompt's categories only,
                        as in the paper (objects of unmentioned categories are not penalised)
    CompositionReward   the fraction of the prompt's facts that hold (each group's category
                        with its exact count, each spatial relation): VQAScore's analogue
    LearnedCounter      a small CNN that predicts every category's count; -sum over the prompt's
                        categories of (pred - target)^2 is differentiable in the image, so it
                        plays the learned reward model of gradient guidance, with the exact
                        detector as the held-out metric (as the paper holds out InstructBLIP
                        and ImageReward)

For real images (the paper's aesthetic task, Table 2) there are

    CLIPScore           100 * cos(CLIP image embedding, CLIP text embedding), ViT-L/14
    AestheticReward     the LAION aesthetic predictor (MLP 768-1024-128-64-16-1) on the
                        normalised CLIP ViT-L/14 image embedding
    WeightedReward      a weighted sum of rewards, differentiable when every term is

A reward is any object with `name: str`, `differentiable: bool` and
`__call__(images (B, 3, H, W) in [0, 1], prompts: list[str]) -> (B,)`, higher is better.

References:
  [1] Kim, Yoon, Hwang, Sung 2025, arXiv 2503.19385 (the paper)
  [2] Lempitsky & Zisserman 2010, "Learning To Count Objects in Images" (density-map counting:
      predict a density per location, the count is its sum)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import toyworld
from model import (CLIP, CLIPTokenizer, CLIPVision, clip_preprocess)
from checkpoints import (CheckpointError, load_checkpoint_into, load_clip, load_clip_tokenizer, load_clip_vision, read_safetensors)

DEFAULT_COUNTER = Path(__file__).resolve().parent / "weights" / "counter"

# -----------------------------------------------------------------------------------------------
# The protocol


class Reward(Protocol):
    name: str               # used in logs, results and error messages
    differentiable: bool    # True when the score can be back-propagated to the images

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] and B prompts -> (B,) scores, higher is better."""
        ...


def check_finite(scores: torch.Tensor, name: str) -> torch.Tensor:
    """Return `scores`, or raise ValueError naming the reward if any is NaN or infinite (a NaN
    would silently win or lose every argmax of a search)."""
    bad = ~torch.isfinite(scores.detach())
    if bad.any():
        idx = torch.nonzero(bad.reshape(-1))[:, 0].tolist()
        raise ValueError(f"reward {name!r} returned non-finite scores at batch positions {idx[:10]}: "
                         f"{scores.detach().reshape(-1)[idx[:10]].tolist()}")
    return scores


def check_inputs(images: torch.Tensor, prompts: list[str], name: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"reward {name!r} expects images (B, 3, H, W), got shape {tuple(images.shape)}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        raise ValueError(f"reward {name!r} needs one prompt per image: {images.shape[0]} images, "
                         f"got {'a single string' if isinstance(prompts, str) else len(prompts)} prompts")
    # A NaN image (a diverged sampler) would otherwise get a finite score from the detector.
    if not torch.isfinite(images.detach()).all():
        raise ValueError(f"reward {name!r} got images with NaN or infinite values")


# -----------------------------------------------------------------------------------------------
# Exact shape-world rewards


def rss_of(prompt: str, found: list[toyworld.Detection]) -> int:
    """RSS = sum_i (C_i - C_hat_i)^2 over the prompt's categories i (paper Sec. 7.2), for one image's
    detections."""
    seen = toyworld.count(found)
    return sum((n - seen.get(cat, 0)) ** 2 for cat, n in toyworld.parse_prompt(prompt).counts().items())


def counting_rss(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """RSS of each image, counts C_hat from the exact detector: (B,) float."""
    check_inputs(images, prompts, "counting")
    return torch.tensor([rss_of(p, found) for p, found in zip(prompts, toyworld.detect(images))],
                        dtype=torch.float32)


def counting_accuracy(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """1.0 where every count of the prompt is exactly right (RSS = 0), else 0.0: (B,)."""
    return (counting_rss(images, prompts) == 0).float()


@dataclass
class CountingReward:
    """-RSS from the exact detector (the paper's quantity-aware reward, GroundingDINO -> detect)."""
    name: str = "counting"
    differentiable: bool = False

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return check_finite(-counting_rss(images, prompts), self.name)


def composition_facts(spec: toyworld.Spec, found: list[toyworld.Detection]) -> list[bool]:
    """Truth of each fact of a prompt in one image: per group, its category is present with
    exactly the asked count ("a" means one); per relation, relation_holds on the two groups'
    detections (every subject centroid on the right side of every object centroid)."""
    seen = toyworld.count(found)
    facts = [seen.get((g.colour, g.shape), 0) == g.count for g in spec.groups]
    for r in spec.relations:
        subject, obj = spec.groups[r.subject], spec.groups[r.object]
        facts.append(toyworld.relation_holds(
            [d for d in found if (d.colour, d.shape) == (subject.colour, subject.shape)], r.relation,
            [d for d in found if (d.colour, d.shape) == (obj.colour, obj.shape)]))
    return facts


@dataclass
class CompositionReward:
    """The fraction of the prompt's facts that hold, in [0, 1]: an exact analogue of VQAScore."""
    name: str = "composition"
    differentiable: bool = False

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts, self.name)
        scores = [float(np.mean(composition_facts(toyworld.parse_prompt(p), found)))
                  for p, found in zip(prompts, toyworld.detect(images))]
        return check_finite(torch.tensor(scores, dtype=torch.float32), self.name)


# -----------------------------------------------------------------------------------------------
# The learned, differentiable counter


@dataclass
class CounterConfig:
    widths: tuple[int, ...] = (32, 48, 64, 64, 96, 96)  # channels of the 3x3 convolutions
    # Full resolution for the first layer (a circle and a square differ only in their corners;
    # striding at once cut held-out accuracy from 59% to 11% in a 1.5-minute trial), then 48 -> 12.
    strides: tuple[int, ...] = (1, 2, 1, 2, 1, 1)       # 48x48 -> 12x12 density map, receptive field 29 px
    categories: tuple[str, ...] = tuple(f"{c} {s}" for c, s in toyworld.CATEGORIES)  # output order


class LearnedCounter(nn.Module):
    """Density-map counter [2]: convolutions predict a non-negative density per category and
    location; a category's count is the sum of its density over the image. As a reward
    (`forward`), -sum over the prompt's categories of (count - target)^2, differentiable in the
    images."""

    name = "learned-counter"
    differentiable = True

    def __init__(self, config: CounterConfig):
        super().__init__()
        if len(config.widths) != len(config.strides):
            raise ValueError(f"widths {config.widths} and strides {config.strides} differ in length")
        self.config = config
        layers, c_in = [], 3
        for width, stride in zip(config.widths, config.strides):
            layers += [nn.Conv2d(c_in, width, 3, stride, 1), nn.GroupNorm(8, width), nn.GELU()]
            c_in = width
        self.features = nn.Sequential(*layers)
        self.density = nn.Conv2d(c_in, len(config.categories), 1)
        # softplus(-4) = 0.018 per location: an untrained counter predicts ~2.6 objects per category
        # at 48x48 instead of ~100, so training does not start by unlearning a huge offset.
        nn.init.constant_(self.density.bias, -4.0)
        self.index = {tuple(c.split()): i for i, c in enumerate(config.categories)}

    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the convolutional features (B, C, H/4, W/4)."""
        p = next(self.parameters())
        return self.features(images.to(p.dtype) - 0.5)

    def counts(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> predicted count of every category, (B, K)."""
        return F.softplus(self.density(self.feature_maps(images))).sum((2, 3))  # (B, K)

    def unit_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the feature maps with unit-length channel vectors (B, C, H/4, W/4): a
        perceptual-style representation, normalised per location as LPIPS normalises each layer."""
        h = self.feature_maps(images)                                      # (B, C, H/4, W/4)
        return h / h.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def targets(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target counts (B, K) and the mask (B, K) of each prompt's categories."""
        target = torch.zeros(len(prompts), len(self.index))
        mask = torch.zeros(len(prompts), len(self.index))
        for b, prompt in enumerate(prompts):
            for cat, n in toyworld.parse_prompt(prompt).counts().items():
                target[b, self.index[cat]], mask[b, self.index[cat]] = n, 1.0
        return target, mask

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts, self.name)
        target, mask = self.targets(prompts)
        pred = self.counts(images)
        score = -(((pred - target.to(pred)) ** 2) * mask.to(pred)).sum(1)   # (B,)
        return check_finite(score, self.name)


def learned_counter_accuracy(counter: LearnedCounter, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """1.0 where the learned counter's rounded count of every category the prompt names equals the
    asked count, else 0.0: (B,). The exact detector's accuracy, read by a different machine."""
    target, mask = counter.targets(prompts)
    pred = counter.counts(images).round()
    return ((pred == target) | (mask == 0)).all(1).float()


def degrade(images: torch.Tensor, blur: float, noise: float | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur by `blur` px, add N(0, noise^2) noise, clip to [0, 1]: what a blurry, noisy generated
    image looks like to the detector (and the counter's training augmentation, where `noise` is a
    level per image, (B, 1, 1, 1))."""
    noisy = toyworld.gaussian_blur(images, blur) + noise * torch.randn(images.shape, generator=generator)
    return noisy.clamp(0, 1)


def load_counter(folder: str | Path = DEFAULT_COUNTER) -> LearnedCounter:
    """Load a LearnedCounter saved by train.train_counter; strict: the config keys, the category list
    and every tensor name and shape must match."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no counter config at {path}; train one with `python train.py --counter`")
    saved = json.loads(path.read_text())["model"]
    known = {f.name for f in fields(CounterConfig)}
    if set(saved) != known:
        raise CheckpointError(f"{path}: counter config keys {sorted(saved)} differ from {sorted(known)}")
    config = CounterConfig(**{k: tuple(v) for k, v in saved.items()})
    if config.categories != CounterConfig().categories:
        raise CheckpointError(f"{path}: the counter's categories {config.categories} are not the "
                              f"shape world's {CounterConfig().categories}")
    with torch.device("meta"):
        counter = LearnedCounter(config)
    return load_checkpoint_into(counter, read_safetensors(folder / "model.safetensors"), folder)


# -----------------------------------------------------------------------------------------------
# By name


REWARD_NAMES = ("counting", "composition", "learned-counter", "aesthetic", "clip-score")


def get_reward(name: str, counter_folder: str | Path = DEFAULT_COUNTER, *, weights: str | Path | None = None,
               clip: str | Path | None = None, device: str = "cpu", dtype: torch.dtype | None = None) -> Reward:
    """The reward called `name` (one of REWARD_NAMES). The real-image rewards need files that are not in
    this repository: "aesthetic" the predictor's `weights` and a CLIP ViT-L/14 folder `clip`, "clip-score"
    a full CLIPModel folder `clip` (see load_aesthetic_reward / load_clip_score); `device` and `dtype`
    apply to those."""
    if name == "counting":
        return CountingReward()
    elif name == "composition":
        return CompositionReward()
    elif name == "learned-counter":
        return load_counter(counter_folder)
    elif name == "aesthetic":
        return load_aesthetic_reward(weights, clip, device=device, dtype=dtype)
    elif name == "clip-score":
        return load_clip_score(clip, device=device, dtype=dtype)
    raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(REWARD_NAMES)}")


# -----------------------------------------------------------------------------------------------
# Real-image rewards: CLIPScore and the LAION aesthetic predictor
#
# The paper's aesthetic task (App. E.1, Table 2) guides FLUX with the gradient of the LAION
# "improved aesthetic predictor" (sac+logos+ava1-l14-linearMSE.pth), an MLP on the L2-normalised
# CLIP ViT-L/14 image embedding of the decoded x0_hat. CLIPScore (Hessel et
# al. 2021) is the cosine between CLIP's image and text embeddings (paper Table 3). Both run the
# image through `model.clip_preprocess` (resize to 224, centre crop, CLIP normalisation) in torch,
# so they are differentiable in the pixels, hence in the latent (DPS, Eq. 30), and follow the reward
# protocol above. The weights are not in this repository: get_reward takes their paths.

AESTHETIC_WIDTHS = (1024, 128, 64, 16, 1)  # the public predictor's Linear output sizes, after the E-d input


class AestheticMLP(nn.Module):
    """The LAION aesthetic head: (B, E) L2-normalised CLIP image embeddings -> (B,) scores (~1-10 on AVA's scale).

    The public model (christophschuhmann/improved-aesthetic-predictor) is nn.Sequential(Linear(E, 1024),
    Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16),
    Linear(16, 1)), E = 768 for ViT-L/14, so its file holds layers.{0,2,4,6,7}.{weight,bias}. The ReLUs
    are commented out in that code ("linearMSE"): the head is one affine map of the embedding, written
    as five layers. The dropout slots are nn.Identity here (dropout is the identity at inference), kept
    so that the indices are the file's keys, and so the reward stays deterministic even in train mode.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        w = (input_size,) + AESTHETIC_WIDTHS
        self.layers = nn.Sequential(nn.Linear(w[0], w[1]), nn.Identity(), nn.Linear(w[1], w[2]), nn.Identity(),
                                    nn.Linear(w[2], w[3]), nn.Identity(), nn.Linear(w[3], w[4]), nn.Linear(w[4], w[5]))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)[:, 0]  # (B,)


def load_aesthetic_head(path: str | Path) -> AestheticMLP:
    """Read the aesthetic head from the public `.pth` (a plain state dict, read with weights_only=True so
    no code in the file runs) or a `.safetensors` file with the same keys. Strict: the input size comes
    from layers.0.weight, every other name and shape must be the public model's (CheckpointError)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"aesthetic predictor weights not found: {path}")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and weights_only errors have no common base class
            # torch's message advises retrying with weights_only=False, i.e. running the file's code:
            # never repeated here. Only the offending global, when torch names one, is kept.
            found = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) (\S+)", str(e))
            if found:
                raise CheckpointError(f"{path} is not a plain torch state dict: it asks to run {found.group(1)} on "
                                      f"loading, which is refused; use the public predictor file, or a .safetensors "
                                      f"copy") from None
            if "weights_only" in str(e):  # torch's advice to retry unsafely is never repeated
                why = "corrupt, or it holds objects other than tensors, which are refused"
            else:
                why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{path} is not a readable torch state dict: {why}") from None
    if not isinstance(state, dict) or "layers.0.weight" not in state or state["layers.0.weight"].ndim != 2:
        keys = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: expected the LAION aesthetic predictor's state dict (layers.0.weight "
                              f"(1024, 768), ..., layers.7.bias), got {keys}")
    with torch.device("meta"):
        head = AestheticMLP(state["layers.0.weight"].shape[1])
    return load_checkpoint_into(head, state, path)


def _image_embeds(vision: CLIPVision, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> projected CLIP image embeddings (B, E), differentiable."""
    p = vision.visual_projection.weight
    pixel_values = clip_preprocess(images.to(p.dtype), vision.cfg.image_size)  # (B, 3, S, S)
    return vision(pixel_values).image_embeds                                 # (B, E)


class AestheticReward(nn.Module):
    """LAION aesthetic score of each image (the given reward of the paper's Table 2; prompts are not used):
    head(e / |e|), e = CLIP image embedding of clip_preprocess(image). Differentiable."""

    name = "aesthetic"
    differentiable = True

    def __init__(self, vision: CLIPVision, head: AestheticMLP):
        super().__init__()
        width = head.layers[0].in_features
        if width != vision.cfg.projection_dim:
            raise ValueError(f"the aesthetic head takes {width}-d embeddings but this CLIP embeds in "
                             f"{vision.cfg.projection_dim} dimensions (the public head needs CLIP ViT-L/14)")
        self.vision = vision
        self.head = head

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts, self.name)
        embeds = F.normalize(_image_embeds(self.vision, images), dim=-1)  # (B, E), as the public code's L2 norm
        return check_finite(self.head(embeds), self.name)


class CLIPScore(nn.Module):
    """CLIPScore = scale * cos(CLIP image embedding, CLIP text embedding of the prompt), (B,). Differentiable.

    scale = 100 gives torchmetrics' units (real image-prompt pairs score ~20-35 with ViT-L/14); the
    paper's Table 3 reports the plain cosine (scale = 1, ~0.27); Hessel et al.'s CLIP-S is
    2.5 max(cos, 0). Unlike both, negative cosines are not clipped to 0, so the gradient never
    vanishes (for real pairs the cosine is positive anyway). Text embeddings are computed once per
    prompt and kept (a search scores the same prompts thousands of times); they do not depend on
    the image, so no gradient is lost. Changing the CLIP weights afterwards needs a new CLIPScore.
    """

    name = "clip-score"
    differentiable = True

    def __init__(self, clip: CLIP, tokenizer: CLIPTokenizer, scale: float = 100.0):
        super().__init__()
        if tokenizer.max_length > clip.text.cfg.max_position_embeddings:
            raise ValueError(f"the tokenizer makes {tokenizer.max_length} ids per prompt but the CLIP text tower "
                             f"has {clip.text.cfg.max_position_embeddings} positions")
        self.clip = clip
        self.tokenizer = tokenizer
        self.scale = scale
        self._text: dict[str, torch.Tensor] = {}  # prompt -> its normalised text embedding (E,)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings of the prompts, (B, E), cached per prompt."""
        new = sorted(set(prompts) - self._text.keys())
        if new:
            device = self.clip.text_projection.weight.device
            embeds = F.normalize(self.clip.text_embeds(self.tokenizer(new).to(device)), dim=-1)  # (len(new), E)
            self._text.update(zip(new, embeds))
        return torch.stack([self._text[p] for p in prompts])  # (B, E)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts, self.name)
        image = F.normalize(_image_embeds(self.clip.vision, images), dim=-1)  # (B, E)
        text = self.text_embeds(prompts).to(image)                             # (B, E)
        return check_finite(self.scale * (image * text).sum(-1), self.name)


@dataclass
class WeightedReward:
    """sum_i weights[i] * rewards[i](images, prompts): several rewards as one, each scaled so that their
    ranges are comparable (e.g. aesthetic ~5 against CLIPScore ~30). Differentiable iff every term is."""

    rewards: list[Reward]   # the terms, each following the reward protocol
    weights: list[float]    # one multiplier per term
    name: str = ""          # default: "w1*name1+w2*name2"
    differentiable: bool = field(init=False)  # derived from the terms

    def __post_init__(self):
        if not self.rewards or len(self.rewards) != len(self.weights):
            raise ValueError(f"WeightedReward needs one weight per reward, got {len(self.rewards)} rewards and "
                             f"{len(self.weights)} weights")
        self.weights = [float(w) for w in self.weights]
        self.name = self.name or "+".join(f"{w:g}*{r.name}" for r, w in zip(self.rewards, self.weights))
        self.differentiable = all(r.differentiable for r in self.rewards)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = sum(w * r(images, prompts) for r, w in zip(self.rewards, self.weights))
        return check_finite(total, self.name)


def load_aesthetic_reward(weights: str | Path | None, clip: str | Path | None, *, device: str = "cpu",
                          dtype: torch.dtype | None = None) -> AestheticReward:
    """The paper's aesthetic reward from its two files: the head (`weights`, the public
    sac+logos+ava1-l14-linearMSE.pth) and CLIP ViT-L/14 (`clip`, a transformers folder of
    openai/clip-vit-large-patch14 or of its CLIPVisionModelWithProjection). Frozen: DPS differentiates
    with respect to the pixels only."""
    if weights is None or clip is None:
        raise ValueError("reward 'aesthetic' needs two files: weights=PATH of the LAION aesthetic predictor "
                         "(sac+logos+ava1-l14-linearMSE.pth, github.com/christophschuhmann/improved-aesthetic-"
                         "predictor) and clip=PATH of a CLIP ViT-L/14 folder (openai/clip-vit-large-patch14: "
                         f"config.json + model.safetensors); got weights={weights}, clip={clip}")
    head = load_aesthetic_head(weights).to(device)
    vision = load_clip_vision(clip, device=device, dtype=dtype)
    reward = AestheticReward(vision, head if dtype is None else head.to(dtype))
    return reward.requires_grad_(False).eval()


def load_clip_score(clip: str | Path | None, *, device: str = "cpu", dtype: torch.dtype | None = None,
                    scale: float = 100.0) -> CLIPScore:
    """CLIPScore from one full CLIPModel folder holding both towers and the tokenizer (e.g.
    openai/clip-vit-large-patch14: config.json, model.safetensors, vocab.json, merges.txt). Frozen."""
    if clip is None:
        raise ValueError("reward 'clip-score' needs clip=PATH of a full CLIPModel folder with its tokenizer, e.g. "
                         "openai/clip-vit-large-patch14 (config.json, model.safetensors, vocab.json, merges.txt)")
    model = load_clip(clip, device=device, dtype=dtype)
    tokenizer = load_clip_tokenizer(clip, max_length=model.text.cfg.max_position_embeddings)
    return CLIPScore(model, tokenizer, scale).requires_grad_(False).eval()
