"""Helpers shared by the parity tests on tiny random models."""

import torch


def randomise_vectors(module: torch.nn.Module, seed: int) -> None:
    """Norm gains ~ 1 + 0.3 N(0, 1), every other vector (biases, class embeddings) ~ 0.3 N(0, 1).

    At their default values (1 and 0) many mistakes cancel; randomised, a swapped, dropped or
    misnamed tensor changes the output, so parity checks can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith(("weight", "scale")) else 0.0)
                        + 0.3 * torch.randn(p.shape, generator=g))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()
