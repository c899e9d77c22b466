"""Helpers shared by the tests on tiny random models."""

import json
from dataclasses import replace
from pathlib import Path

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


def write_tiny_shape_model(folder: Path) -> Path:
    """A random mini-FLUX folder with the files and flowscale.json that train.py writes (tiny sizes).

    Its final layer's bias is 4, so every decoded image is almost black: the exact detector then
    costs ~0.2 ms per image instead of ~60 ms on a random model's noise images."""
    import model as M
    import toyworld
    import train

    corpus = toyworld.train_prompts()
    M.train_clip_bpe(corpus, 400, folder / "tokenizer")
    M.train_t5_sentencepiece(corpus, 64, folder / "tokenizer_2")
    clip_vocab = M.load_clip_tokenizer(folder).vocab_size
    t5_vocab = M.load_t5_tokenizer(folder, max_length=24).vocab_size
    torch.manual_seed(0)
    flux = M.Flux(train.TINY_FLUX)  # in_channels 108: 48x48 RGB, PixelLatent(3), as the embedded models
    torch.nn.init.constant_(flux.final_layer.linear.bias, 4.0)  # near-black images (see above)
    M.save_flux(flux, folder / "transformer")
    M.save_t5(M.T5Encoder(replace(train.MINI_T5, vocab_size=t5_vocab, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                  num_heads=2)), folder / "text_encoder_2")
    M.save_clip_text(M.CLIPText(replace(train.MINI_CLIP, vocab_size=clip_vocab, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2)), folder / "text_encoder")
    meta = {"pixel_space": True, "latent_factor": 3, "height": 48, "width": 48, "channels": 3, "t5_max_length": 24,
            "world": "shapes"}
    (folder / "flowscale.json").write_text(json.dumps(meta))
    return folder
