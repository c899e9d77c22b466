"""
Bring your own reward: a plugin file for `flowscale.py generate` and `flowscale.py bench`.

    python flowscale.py generate --model FLUX.1-schnell --device cuda --prompt "three apples on a table" \
        --reward examples/reward_plugin.py:vqascore --method rbf --nfe 500 --out out/apples
    python flowscale.py generate --prompt "three red circles" --reward examples/reward_plugin.py:brightness

`--reward path/to/file.py:NAME` (or `--reward some.module:NAME` for an importable module) loads NAME from
the file. NAME is a reward object, or a function (or class) of no arguments that returns one. A reward
follows the protocol of rewards.Reward:

    name: str               used in result.json, results.csv and error messages
    differentiable: bool    True if its score can be back-propagated to the images (needed by dps,
                            svdd+dps and rbf+dps, which follow its gradient, Eq. 30 of the paper)
    reward(images, prompts) images (B, 3, H, W) float in [0, 1], on the device of the model (--device),
                            and B prompt strings -> a (B,) float tensor, higher is better, finite, on
                            any device

The search calls it once per batch of candidates (up to --max-batch of them), on decoded Tweedie
estimates x0_hat. A reward that raises, returns another shape or NaN / inf stops the command with one
line and exit code 2. Non-differentiable rewards are called under torch.no_grad.

The paper's rewards (Kim et al. 2025, Sec. 7) are models that this repository does not ship:
VQAScore (CLIP-FlanT5-XXL) for compositional prompts, -RSS of GroundingDINO counts for quantity-aware
prompts, and ImageReward / the LAION aesthetic score as held-out metrics. `vqascore` and `image_reward`
below are skeletons of wrappers around their public packages; nothing is downloaded until you call them
(then the packages fetch their weights). `brightness` is a toy that runs anywhere, for trying the plugin
path itself.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


class Brightness:
    """The mean luminance of the image (a toy, differentiable): shows the protocol, needs nothing."""

    name = "brightness"
    differentiable = True

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
        return (images * weights.view(1, 3, 1, 1)).sum(1).mean((1, 2))  # (B,)


brightness = Brightness()


def _save_pngs(images: torch.Tensor, folder: Path) -> list[str]:
    """Images (B, 3, H, W) in [0, 1] as PNG files (the packages below read image files or PIL images)."""
    from PIL import Image

    paths = []
    for i, image in enumerate(images.detach().float().clamp(0, 1).cpu()):
        path = folder / f"{i}.png"
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
        paths.append(str(path))
    return paths


class VQAScore:
    """VQAScore (Lin et al. 2024): P("Yes" | image, "Does this figure show '{prompt}'?") from CLIP-FlanT5,
    the paper's compositional reward. Skeleton around the t2v_metrics package (pip install t2v-metrics),
    whose VQAScore(model=...) scores lists of image files against texts; check its README for the
    current interface. Not differentiable through the files; about 11 B parameters for clip-flant5-xxl,
    so give it its own GPU or use --offload for FLUX.1 (see the README's memory table)."""

    name = "vqascore"
    differentiable = False

    def __init__(self, model: str = "clip-flant5-xxl", device: str = "cuda"):
        try:
            import t2v_metrics
        except ImportError:
            raise ValueError("vqascore needs the t2v_metrics package: pip install t2v-metrics") from None
        self.scorer = t2v_metrics.VQAScore(model=model, device=device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with tempfile.TemporaryDirectory() as folder:
            paths = _save_pngs(images, Path(folder))
            scores = [self.scorer(images=[path], texts=[prompt]).reshape(()) for path, prompt in zip(paths, prompts)]
        return torch.stack([torch.as_tensor(s, dtype=torch.float32) for s in scores])  # (B,)


def vqascore() -> VQAScore:
    """The factory --reward examples/reward_plugin.py:vqascore calls (no arguments)."""
    return VQAScore()


class ImageRewardScore:
    """ImageReward (Xu et al. 2023), a human-preference reward. Skeleton around the image-reward package
    (pip install image-reward), whose load("ImageReward-v1.0") model scores (prompt, PIL images)."""

    name = "image-reward"
    differentiable = False

    def __init__(self, device: str = "cuda"):
        try:
            import ImageReward
        except ImportError:
            raise ValueError("image_reward needs the image-reward package: pip install image-reward") from None
        self.model = ImageReward.load("ImageReward-v1.0", device=device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from PIL import Image

        scores = []
        for image, prompt in zip(images.detach().float().clamp(0, 1).cpu(), prompts):
            pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
            scores.append(float(self.model.score(prompt, [pil])))
        return torch.tensor(scores, dtype=torch.float32)


def image_reward() -> ImageRewardScore:
    return ImageRewardScore()
