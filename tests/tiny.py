"""Helpers shared by the tests on tiny random models."""

import dataclasses
import json
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


def clip_ids(B: int, L: int, vocab: int, seed: int) -> torch.Tensor:
    """As the tokenizer makes them: BOS, content, EOS, EOS padding; BOS = vocab-2, EOS = vocab-1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((B, L), vocab - 1)
    for b in range(B):
        n = int(torch.randint(0, max(L - 1, 1), (), generator=g))  # content tokens; EOS at n + 1 (or cut)
        ids[b, 0] = vocab - 2
        ids[b, 1:1 + n] = torch.randint(0, vocab - 2, (n,), generator=g)
    return ids


def write_tiny_shape_model(folder: Path) -> Path:
    """A random mini-FLUX folder with the files and flowscale.json that train.py writes (tiny sizes).

    Its final layer's bias is 4, so every decoded image is almost black: the exact detector then
    costs ~0.2 ms per image instead of ~60 ms on a random model's noise images."""
    import checkpoints
    import model as M
    import toyworld
    import train

    corpus = toyworld.train_prompts()
    train.train_clip_bpe(corpus, 400, folder / "tokenizer")
    train.train_t5_sentencepiece(corpus, 64, folder / "tokenizer_2")
    clip_vocab = checkpoints.load_clip_tokenizer(folder).vocab_size
    t5_vocab = checkpoints.load_t5_tokenizer(folder, max_length=24).vocab_size
    torch.manual_seed(0)
    flux = M.Flux(train.TINY_FLUX)  # in_channels 108: 48x48 RGB, PixelLatent(3), as the embedded models
    torch.nn.init.constant_(flux.final_layer.linear.bias, 4.0)  # near-black images (see above)
    checkpoints.save_flux(flux, folder / "transformer")
    checkpoints.save_t5(M.T5Encoder(M.T5Config(vocab_size=t5_vocab, **train.TINY_T5)), folder / "text_encoder_2")
    checkpoints.save_clip_text(M.CLIPText(M.CLIPTextConfig(vocab_size=clip_vocab, **train.TINY_CLIP)),
                               folder / "text_encoder")
    meta = {"pixel_space": True, "latent_factor": 3, "height": 48, "width": 48, "channels": 3, "t5_max_length": 24,
            "world": "shapes"}
    (folder / "flowscale.json").write_text(json.dumps(meta))
    return folder


# -----------------------------------------------------------------------------------------------
# Tiny random FLUX.1 repositories in the release layout (tests/test_real_flux_path.py, benchmarks/gpu_check.py)

CORPUS = ["a photo of a cat", "a dog playing in the snow", "an owl on a branch", "a small red fox", "a horse in a field",
          "a rabbit in the grass", "a photo of a dolphin", "a lion and a tiger", "a bird on a wire",
          "an oil painting of a lighthouse at dawn", "a bowl of fruit on a wooden table"]


def ae_8x():
    """The tiny autoencoder preset with 3 downsamplings: f = 8, as FLUX.1's."""
    import model as M

    return dataclasses.replace(M.AE_CONFIGS["tiny"], ch_mult=(1, 2, 2, 2))


@dataclasses.dataclass
class Repo:
    """One tiny FLUX.1 repository on disk and the modules it was written from."""

    folder: Path
    flux: torch.nn.Module  # model.Flux
    t5: torch.nn.Module  # model.T5Encoder
    clip: torch.nn.Module  # model.CLIPText
    ae: torch.nn.Module  # model.AutoEncoder


def write_repo(folder: Path, variant: str, seed: int, f8: bool | None = None) -> Repo:
    """A random FLUX.1-{schnell,dev}-like repository in the release layout (tests/test_real_flux_path.py).
    The autoencoder is 8x (as FLUX.1's) for schnell and 2x for dev, unless f8 says otherwise."""
    import checkpoints
    import model as M
    import train

    dev = variant == "dev"
    train.train_clip_bpe(CORPUS, 400, folder / "tokenizer")
    train.train_t5_sentencepiece(CORPUS, 48, folder / "tokenizer_2")
    clip_vocab = checkpoints.load_clip_tokenizer(folder).vocab_size
    t5_vocab = checkpoints.load_t5_tokenizer(folder).vocab_size
    torch.manual_seed(seed)
    # T5's embedding has more rows than the tokenizer has pieces (the release: 32128 vs 32000)
    t5 = M.T5Encoder(dataclasses.replace(M.T5_CONFIGS["tiny"], vocab_size=t5_vocab + 28)).eval()
    # 77 positions: FLUX's CLIP tokenizer pads every prompt to 77 ids
    clip = M.CLIPText(dataclasses.replace(M.CLIP_CONFIGS["tiny"], vocab_size=clip_vocab)).eval()
    ae = M.AutoEncoder(ae_8x() if (not dev if f8 is None else f8) else M.AE_CONFIGS["tiny"]).eval()
    flux = M.Flux(M.FluxParams(in_channels=4 * ae.params.z_channels, vec_in_dim=clip.cfg.hidden_size,
                               context_in_dim=t5.cfg.d_model, hidden_size=128, mlp_ratio=4.0, num_heads=1,
                               depth=2, depth_single_blocks=1, axes_dim=(16, 56, 56), theta=10_000,
                               qkv_bias=True, guidance_embed=dev)).eval()
    for i, module in enumerate((t5, clip, ae, flux)):
        randomise_vectors(module, seed + i)
    checkpoints.save_t5(t5, folder / "text_encoder_2")
    checkpoints.save_clip_text(clip, folder / "text_encoder")
    checkpoints.save_autoencoder(ae, folder / "vae")
    checkpoints.save_flux(flux, folder / "transformer")
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0 if not dev else 3.0,
         "use_dynamic_shifting": dev, "num_train_timesteps": 1000}, indent=2))
    return Repo(folder, flux, t5, clip, ae)
