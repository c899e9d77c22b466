"""
Train the embedded default model: mini-FLUX on the shape world.

No real FLUX weights can be downloaded where this project is built and tested, so it trains and
ships its own text-to-image flow model with the exact FLUX.1 architecture (the same `Flux`,
`T5Encoder` and `CLIPText` classes, tiny configs), on procedurally rendered images of coloured
shapes ("three red circles and one blue square", see toyworld.py). Like FLUX on hard prompts, the
model is imperfect at counting and composition, which is what gives inference-time search
(search.py) room to help, and the shape world has an exact detector to measure it.

Choices, and why:
  * Pixel space (32x32 RGB in [-1, 1]) instead of a learned latent space: there is no pretrained
    autoencoder to borrow, and the detector-based rewards read pixels directly. The "latent" is
    the image rearranged by `model.PixelLatent` (2x2 pixel blocks into channels: (12, 16, 16)),
    which FLUX's own 2x2 packing turns into 8x8 = 64 tokens of 48 channels, so the `Flux` class is
    used unchanged (in_channels = 48). 64 image tokens instead of 256 make a training step ~3.6x
    cheaper on this CPU (measured: 0.65 s vs 2.34 s per batch of 64, bf16 autocast).
  * Rectified flow with the linear interpolant x_t = (1 - t) x0 + t eps and target
    u = eps - x0 (FLUX's convention, t = 1 is noise), t drawn logit-normal (SD3, Esser et al.
    2024, Sec. 3.1) so training concentrates on the middle of the path.
  * The text encoders are trained jointly from scratch (FLUX's are frozen pretrained models; we
    have none). They are still a T5 encoder producing `txt` and a CLIP text tower producing the
    pooled `y`, so the conditioning path is FLUX's.
  * bf16 autocast on CPU: this machine's bf16 matmuls are ~5x faster than fp32 (measured,
    README). Weights and the optimizer stay in fp32; an EMA of the weights is what gets saved.
  * Everything is seeded; `python train.py` reproduces the shipped weights up to CPU
    floating-point nondeterminism.

Output: a folder in the FLUX.1 Hugging Face layout (transformer/, text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/, no vae/ because the model works in pixels), read by the
same loaders as the real release, plus flowscale.json with what the pipeline needs to know.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import model as M
import toyworld

# -----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    out: str = "weights/mini-flux"      # output folder (FLUX.1 layout)
    image_size: int = 32                # pixels per side; 2x2 packing -> (image_size/2)^2 tokens
    steps: int = 3000                   # optimizer steps (the time limit below may stop earlier)
    minutes: float = 60.0               # wall-clock limit for the training loop (a safety stop)
    batch_size: int = 64                # images per step
    lr: float = 1e-3                    # AdamW peak learning rate
    warmup: int = 200                   # linear warm-up steps, then cosine decay to lr/10
    weight_decay: float = 0.01          # AdamW weight decay on matrices
    ema_decay: float = 0.999            # EMA of the weights; the EMA is what gets saved
    t5_max_length: int = 24             # T5 sequence length (FLUX: 256 schnell / 512 dev)
    t5_vocab: int = 64                  # SentencePiece unigram vocabulary size
    clip_vocab: int = 400               # CLIP BPE vocabulary size (bytes + merges + 2 specials)
    seed: int = 0                       # seeds prompts, renders, noise, init
    threads: int = 2                    # torch intra-op threads


# The mini-FLUX: the FLUX.1 architecture at ~1/1000 of the width and depth.
MINI_FLUX = M.FluxParams(
    in_channels=48,                     # 3 RGB channels x 2x2 PixelLatent blocks x 2x2 FLUX packing
    out_channels=48,
    vec_in_dim=64,                      # = CLIP hidden size (pooled y)
    context_in_dim=64,                  # = T5 d_model (txt)
    hidden_size=192,
    mlp_ratio=4.0,
    num_heads=4,                        # head dim 48
    depth=3,                            # double-stream blocks (FLUX: 19)
    depth_single_blocks=6,              # single-stream blocks (FLUX: 38)
    axes_dim=[8, 20, 20],               # RoPE dims per id axis, sum = head dim
    theta=10_000,
    qkv_bias=True,
    guidance_embed=False,               # schnell-style: no guidance embedding
)

MINI_T5 = M.T5Config(
    vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
)

MINI_CLIP = M.CLIPTextConfig(
    vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5,
)


# -----------------------------------------------------------------------------------------------
# The model being trained: FLUX plus its two text encoders


class MiniFluxModel(torch.nn.Module):
    """The three networks trained jointly; at inference they are loaded separately."""

    def __init__(self, flux: M.FluxParams, t5: M.T5Config, clip: M.CLIPTextConfig):
        super().__init__()
        self.flux = M.Flux(flux)
        self.t5 = M.T5Encoder(t5)
        self.clip = M.CLIPText(clip)

    def forward(self, x_t, t, t5_ids, clip_ids):
        """Velocity of latents x_t (B, 12, 16, 16) at times t (B,), for the tokenized prompts."""
        B, C, H, W = x_t.shape
        txt = self.t5(t5_ids)                                  # (B, L_txt, 64)
        _, y = self.clip(clip_ids)                             # (B, 64) pooled at EOS
        img = M.pack(x_t)                                      # (B, H/2 * W/2, 4C)
        out = self.flux(img=img, img_ids=M.image_ids(B, H, W), txt=txt,
                        txt_ids=M.text_ids(B, txt.shape[1]), timesteps=t, y=y)
        return M.unpack(out, H, W)                             # (B, C, H, W)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------------------------
# Training


def train(cfg: TrainConfig) -> Path:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Tokenizers, trained on the training prompts (the real FLUX ships CLIP's and T5's).
    corpus = toyworld.train_prompts()
    M.train_clip_bpe(corpus, cfg.clip_vocab, out / "tokenizer")
    M.train_t5_sentencepiece(corpus, cfg.t5_vocab, out / "tokenizer_2")
    clip_tok = M.load_clip_tokenizer(out)
    t5_tok = M.load_t5_tokenizer(out, max_length=cfg.t5_max_length)

    # The vocabularies the trainers produced fix the embedding sizes.
    t5_cfg = replace(MINI_T5, vocab_size=t5_tok.vocab_size)
    clip_cfg = replace(MINI_CLIP, vocab_size=clip_tok.vocab_size)
    net = MiniFluxModel(MINI_FLUX, t5_cfg, clip_cfg)
    latent = M.PixelLatent(2)
    ema = copy.deepcopy(net).requires_grad_(False)
    n_params = sum(p.numel() for p in net.flux.parameters())
    print(f"mini-FLUX: {n_params / 1e6:.2f} M parameters "
          f"(+ T5 {sum(p.numel() for p in net.t5.parameters()) / 1e3:.0f} k, "
          f"CLIP {sum(p.numel() for p in net.clip.parameters()) / 1e3:.0f} k)")

    decay = [p for n, p in net.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in net.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))

    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    losses = []
    bar = tqdm(range(cfg.steps), desc="train mini-FLUX", dynamic_ncols=True)
    for step in bar:
        # 2. A batch of fresh shape-world images with their prompts.
        specs = [toyworld.sample_spec(rng, kind="any", split="train") for _ in range(cfg.batch_size)]
        prompts = [toyworld.spec_to_prompt(s) for s in specs]
        x0 = latent.encode(toyworld.render_batch(specs, rng, cfg.image_size) * 2 - 1)  # (B, 12, H/2, W/2)
        t5_ids, clip_ids = t5_tok(prompts), clip_tok(prompts)

        # 3. Rectified flow: x_t = (1 - t) x0 + t eps, regress u = eps - x0 (t = 1 is noise).
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(cfg.batch_size, generator=gen))       # logit-normal(0, 1)
        t_ = t.view(-1, 1, 1, 1)
        x_t = (1 - t_) * x0 + t_ * eps
        with torch.autocast("cpu", dtype=torch.bfloat16):
            u_pred = net(x_t, t, t5_ids, clip_ids)
        loss = F.mse_loss(u_pred.float(), eps - x0)

        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))           # EMA warm-up
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - d)

        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if (time.time() - start) / 60 > cfg.minutes:
            print(f"time limit of {cfg.minutes} min reached at step {step + 1}")
            break
    minutes = (time.time() - start) / 60

    # 4. Save in the FLUX.1 folder layout, readable by the same loaders as the real model.
    # bf16 on disk, as the FLUX.1 release ships it: half the size (the repo keeps the weights < 30 MB).
    M.save_flux(copy.deepcopy(ema.flux).to(torch.bfloat16), out / "transformer")
    M.save_t5(ema.t5, out / "text_encoder_2")
    M.save_clip_text(ema.clip, out / "text_encoder")
    meta = {
        "pixel_space": True,                 # no vae/: the latent is model.PixelLatent(latent_factor)
        "latent_factor": 2,
        "height": cfg.image_size, "width": cfg.image_size, "channels": 3,
        "t5_max_length": cfg.t5_max_length,
        "world": "shapes",                   # prompts are checked against toyworld's vocabulary
        "train": {**asdict(cfg), "steps_done": len(losses), "wall_minutes": round(minutes, 1),
                  "final_loss": float(np.mean(losses[-200:]))},
    }
    (out / "flowscale.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"saved {out} after {len(losses)} steps, {minutes:.1f} min, loss {meta['train']['final_loss']:.4f}")
    return out


# -----------------------------------------------------------------------------------------------
# Evaluation: how good is the base model? (the room search has to help)


def evaluate(folder: str | Path, n_prompts: int = 200, seed: int = 0, batch: int = 50) -> dict:
    """The plain sampler (Linear-ODE, 10 Euler steps, one sample per prompt) on held-out prompts,
    scored by the exact detector: counting accuracy (RSS = 0) and mean RSS on counting prompts, mean
    composition score (fraction of facts that hold) on composition prompts. Written into
    flowscale.json under "eval" and returned."""
    import flowscale  # the pipeline imports this module's neighbours, not this module

    pipe = flowscale.load_pipeline(folder)
    scores = {}
    for kind in ("counting", "composition"):
        prompts = toyworld.heldout_prompts(kind, n_prompts, seed=seed)
        metrics = []
        for i in tqdm(range(0, n_prompts, batch), desc=f"eval {kind}", dynamic_ncols=True):
            gen = flowscale.generate(pipe, prompts[i:i + batch], method="none", dynamics="linear-ode",
                                     nfe=10, seed=seed + i)
            metrics += gen.metrics
        acc = np.array([m["accuracy"] for m in metrics])
        scores[kind] = {"prompts": n_prompts, "seed": seed,
                        "accuracy": float(acc.mean()), "accuracy_se": float(acc.std(ddof=1) / np.sqrt(len(acc))),
                        "mean_rss": float(np.mean([m["rss"] for m in metrics])),
                        "composition": float(np.mean([m["composition"] for m in metrics]))}
    meta_file = Path(folder) / "flowscale.json"
    meta = json.loads(meta_file.read_text())
    meta["eval"] = {"sampler": "plain Linear-ODE, 10 Euler steps, held-out prompts", **scores}
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta["eval"], indent=2))
    return meta["eval"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field, value in asdict(TrainConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--eval-only", action="store_true", help="only evaluate the model in --out")
    parser.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts per task in the evaluation")
    args = vars(parser.parse_args())
    eval_only, eval_prompts = args.pop("eval_only"), args.pop("eval_prompts")
    out = args["out"] if eval_only else train(TrainConfig(**args))
    evaluate(out, eval_prompts, seed=args["seed"])


if __name__ == "__main__":
    main()
