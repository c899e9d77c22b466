"""
Train the two embedded models: mini-FLUX.1-dev (a rectified flow) and mini-FLUX.1-schnell
(distilled from it for few steps), on the shape world.

No real FLUX weights can be downloaded where this project is built and tested, so it trains and
ships its own text-to-image flow models with the exact FLUX.1 architecture (the same `Flux`,
`T5Encoder` and `CLIPText` classes, tiny configs), on procedurally rendered images of coloured
shapes ("three red circles and one blue square", see toyworld.py). Like FLUX on hard prompts, the
models are imperfect at counting and composition, which is what gives inference-time search
(search.py) room to help, and the shape world has an exact detector to measure it.

Why two models. The paper runs FLUX.1-schnell, which is distilled for few steps: its Tweedie
estimate x0_hat = x_t - t u_t (Eq. 19) is a sharp image even at high noise, so scoring x0_hat (as
every search here does) scores a plausible image, and a method that returns x0_hat at the last grid
time (the VP path ends at linear t ~ 0.71 after 10 steps) returns a sharp one. An ordinary
rectified-flow model's x0_hat at high noise is the blurry average E[x0 | x_t]. So `python train.py`
runs two stages, like the FLUX.1 release has two models:

  1. dev (the teacher): rectified flow, x_t = (1 - t) x0 + t eps, target u = eps - x0 (FLUX's
     convention, t = 1 is noise), t drawn logit-normal (SD3, Esser et al. 2024, Sec. 3.1).
  2. schnell (the student) by reflow (Liu, Gong, Liu 2022, "Flow straight and fast", Sec. 2.2):
     the teacher's ODE (20 Euler steps) maps noise eps to a sample z0 = ODE(eps); the student,
     initialised from the teacher, learns the straight lines between these coupled pairs,
     x_t = (1 - t) z0 + t eps with target eps - z0, t uniform. On a straight flow x0_hat(x_t) = z0
     at every t, which is what makes its x0_hat sharp. A quarter of each batch sits at t = 1, the
     one-step distillation loss of the same paper (Sec. 2.3): x0_hat(eps, 1) = z0. Reflow is chosen
     over adversarial distillation (schnell's own LADD, Sauer et al. 2024) because it needs no
     discriminator and keeps the model a flow whose velocity the SDE of sde.py can use.

Choices, and why:
  * Pixel space (48x48 RGB in [-1, 1]) instead of a learned latent space: there is no pretrained
    autoencoder to borrow, and the detector-based rewards read pixels directly. The "latent" is
    the image rearranged by `model.PixelLatent` (3x3 pixel blocks into channels: (27, 16, 16)),
    which FLUX's own 2x2 packing turns into 8x8 = 64 tokens of 108 channels, so the `Flux` class
    is used unchanged (in_channels = 108) at the cost per NFE of the first, 32x32 world.
  * The text encoders are trained jointly from scratch (FLUX's are frozen pretrained models; we
    have none). They are still a T5 encoder producing `txt` and a CLIP text tower producing the
    pooled `y`, so the conditioning path is FLUX's.
  * bf16 autocast on CPU (this machine's bf16 matmuls are ~2x fp32 at these shapes). Weights and
    the optimizer stay in fp32; an EMA of the weights is what gets saved, in bf16 as the release.
  * Checkpointed: every stage writes its state (weights, EMA, optimizer, random generators) to
    `--work` every `--checkpoint-every` steps, atomically; `python train.py` run again after a kill
    continues where it stopped and ends with the same weights as an uninterrupted run would.
    Finished models go to a staging folder and replace `--out-dev` / `--out-schnell` only when
    complete, so a killed run never leaves a half-written model folder.
  * Everything is seeded; `python train.py` reproduces the shipped weights up to CPU
    floating-point nondeterminism.

Output: two folders in the FLUX.1 Hugging Face layout (transformer/, text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/, no vae/ because the models work in pixels), read by the
same loaders as the real release, plus flowscale.json with what the pipeline needs to know.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
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
    out_dev: str = "weights/mini-flux-dev"          # the teacher's folder (FLUX.1 layout)
    out_schnell: str = "weights/mini-flux-schnell"  # the distilled student's folder
    work: str = "out/train"             # checkpoints, tokenizers and teacher pairs (resumable state)
    image_size: int = toyworld.IMAGE_SIZE   # pixels per side; PixelLatent(3) + 2x2 packing -> (size/6)^2 tokens
    latent_factor: int = 3              # PixelLatent block size
    teacher_steps: int = 2800           # optimizer steps of stage 1 (rectified flow)
    pairs: int = 12288                  # (noise, teacher sample) pairs for reflow (more prompts -> the student keeps counting)
    pair_steps: int = 10                # Euler steps of the teacher ODE that makes a pair (= the plain sampler's 10)
    student_steps: int = 1500           # optimizer steps of stage 2 (reflow)
    batch_size: int = 64                # images per step
    lr: float = 1e-3                    # AdamW peak learning rate, teacher
    student_lr: float = 2e-4            # AdamW peak learning rate, student (fine-tuning the teacher)
    student_t1: float = 0.25            # share of a student batch at t = 1 (one-step distillation)
    warmup: int = 200                   # linear warm-up steps, then cosine decay to lr/10
    weight_decay: float = 0.01          # AdamW weight decay on matrices
    ema_decay: float = 0.999            # EMA of the weights; the EMA is what gets saved
    t5_max_length: int = 32             # T5 sequence length (FLUX: 256 schnell / 512 dev)
    t5_vocab: int = 72                  # SentencePiece unigram vocabulary size
    clip_vocab: int = 400               # CLIP BPE vocabulary size (bytes + merges + 2 specials)
    checkpoint_every: int = 100         # steps between checkpoints (and pair batches between saves)
    tiny: bool = False                  # a ~0.1 M-parameter network, to test the training loop quickly
    seed: int = 0                       # seeds prompts, renders, noise, init
    threads: int = 2                    # torch intra-op threads


# The mini-FLUX: the FLUX.1 architecture at ~1/1000 of the width and depth.
MINI_FLUX = M.FluxParams(
    in_channels=108,                    # 3 RGB channels x 3x3 PixelLatent blocks x 2x2 FLUX packing
    out_channels=108,
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
    guidance_embed=False,               # schnell-style: no guidance embedding (neither model uses CFG)
)

MINI_T5 = M.T5Config(
    vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
)

MINI_CLIP = M.CLIPTextConfig(
    vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5,
)

# For tests of the training loop (`tiny=True`): same code path, a few seconds per stage.
TINY_FLUX = replace(MINI_FLUX, hidden_size=32, num_heads=2, depth=1, depth_single_blocks=1,
                    axes_dim=[4, 6, 6], vec_in_dim=16, context_in_dim=16)
TINY_T5 = replace(MINI_T5, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
TINY_CLIP = replace(MINI_CLIP, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


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
        """Velocity u_t of latents x_t (B, 27, 16, 16) at times t (B,), for the tokenized prompts."""
        B, C, H, W = x_t.shape
        txt = self.t5(t5_ids)                                  # (B, L_txt, 64)
        _, y = self.clip(clip_ids)                             # (B, 64) pooled at EOS
        img = M.pack(x_t)                                      # (B, H/2 * W/2, 4C)
        out = self.flux(img=img, img_ids=M.image_ids(B, H, W), txt=txt,
                        txt_ids=M.text_ids(B, txt.shape[1]), timesteps=t, y=y)
        return M.unpack(out, H, W)                             # (B, C, H, W)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to peak / 10 at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------------------------
# Checkpoints and atomic folder writes


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def replace_folder(staged: Path, final: Path) -> None:
    """Move a complete `staged` folder to `final`, replacing what was there (never a half-written one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    if old.exists():
        shutil.rmtree(old)


class Stage:
    """One optimisation stage (network, EMA, AdamW, generators), saved and resumed as a whole."""

    def __init__(self, name: str, net: MiniFluxModel, cfg: TrainConfig, peak_lr: float, steps: int, work: Path):
        self.name, self.net, self.steps, self.peak_lr, self.cfg = name, net, steps, peak_lr, cfg
        self.ema = copy.deepcopy(net).requires_grad_(False)
        decay = [p for p in net.parameters() if p.ndim >= 2]
        no_decay = [p for p in net.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=peak_lr, betas=(0.9, 0.99))
        offset = {"teacher": 0, "student": 1}[name]        # different streams per stage, both seeded
        self.rng = np.random.default_rng([cfg.seed, offset])
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + offset)
        self.step, self.losses, self.seconds = 0, [], 0.0
        self.path = work / f"{name}.pt"
        if self.path.is_file():
            state = torch.load(self.path, weights_only=True)
            self.net.load_state_dict(state["net"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["opt"])
            self.rng.bit_generator.state = state["rng"]
            self.gen.set_state(state["gen"])
            self.step, self.losses, self.seconds = state["step"], state["losses"], state["seconds"]
            print(f"{name}: resumed from {self.path} at step {self.step}/{steps}")

    def save(self) -> None:
        atomic_save({"net": self.net.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                     "rng": self.rng.bit_generator.state, "gen": self.gen.get_state(), "step": self.step,
                     "losses": self.losses, "seconds": self.seconds}, self.path)

    def run(self, loss_fn) -> None:
        """Optimise `loss_fn(net, rng, gen) -> scalar loss` from the current step to `steps`."""
        bar = tqdm(range(self.step, self.steps), desc=f"train {self.name}", dynamic_ncols=True,
                   initial=self.step, total=self.steps)
        t_last = time.time()
        for step in bar:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(self.net, self.rng, self.gen)
            for group in self.opt.param_groups:
                group["lr"] = lr_at(step, self.steps, self.peak_lr, self.cfg.warmup)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            self.opt.step()
            with torch.no_grad():
                d = min(self.cfg.ema_decay, (1 + step) / (10 + step))   # EMA warm-up
                for p_ema, p in zip(self.ema.parameters(), self.net.parameters()):
                    p_ema.lerp_(p, 1 - d)
            self.losses.append(loss.item())
            self.step = step + 1
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(self.losses[-100:]):.4f}")
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.steps:
                now = time.time()
                self.seconds += now - t_last
                t_last = now
                self.save()


# -----------------------------------------------------------------------------------------------
# Training


def tokenizers(cfg: TrainConfig, work: Path):
    """CLIP BPE and T5 SentencePiece tokenizers trained on the training prompts (the real FLUX
    ships CLIP's and T5's), written once into `work` and read back from there."""
    if not (work / "tokenizer_2" / "spiece.model").is_file():
        corpus = toyworld.train_prompts()
        M.train_clip_bpe(corpus, cfg.clip_vocab, work / "tokenizer.tmp")
        M.train_t5_sentencepiece(corpus, cfg.t5_vocab, work / "tokenizer_2.tmp")
        for name in ("tokenizer", "tokenizer_2"):
            replace_folder(work / f"{name}.tmp", work / name)
    return M.load_clip_tokenizer(work), M.load_t5_tokenizer(work, max_length=cfg.t5_max_length)


@torch.no_grad()
def teacher_pairs(teacher: MiniFluxModel, cfg: TrainConfig, t5_tok, clip_tok, shape, work: Path) -> dict:
    """`cfg.pairs` reflow pairs (eps, z0 = teacher ODE(eps)) for training-split prompts, made in
    batches and saved every `checkpoint_every` batches so that a killed run resumes here too."""
    path = work / "pairs.pt"
    state = torch.load(path, weights_only=True) if path.is_file() else {"eps": [], "z0": [], "prompts": []}
    rng = np.random.default_rng([cfg.seed, 2])
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 2)
    n_batches = math.ceil(cfg.pairs / cfg.batch_size)
    for _ in range(len(state["eps"])):                     # replay the generators of the batches done
        [toyworld.sample_spec(rng, "any", "train") for _ in range(cfg.batch_size)]
        torch.randn((cfg.batch_size, *shape), generator=gen)
    ts = torch.linspace(1, 0, cfg.pair_steps + 1)
    for b in tqdm(range(len(state["eps"]), n_batches), desc="teacher pairs", dynamic_ncols=True,
                  initial=len(state["eps"]), total=n_batches):
        prompts = [toyworld.spec_to_prompt(toyworld.sample_spec(rng, "any", "train")) for _ in range(cfg.batch_size)]
        eps = torch.randn((cfg.batch_size, *shape), generator=gen)
        t5_ids, clip_ids = t5_tok(prompts), clip_tok(prompts)
        x = eps
        for t, t_next in zip(ts[:-1], ts[1:]):              # Euler on dx/dt = u_t, from t = 1 to 0
            with torch.autocast("cpu", dtype=torch.bfloat16):
                u = teacher(x, t.expand(len(x)), t5_ids, clip_ids).float()
            x = x + (t_next - t) * u
        state["eps"].append(eps.to(torch.bfloat16))
        state["z0"].append(x.to(torch.bfloat16))
        state["prompts"].append(prompts)
        if (b + 1) % cfg.checkpoint_every == 0 or b + 1 == n_batches:
            atomic_save(state, path)
    return {"eps": torch.cat(state["eps"]).float()[:cfg.pairs], "z0": torch.cat(state["z0"]).float()[:cfg.pairs],
            "prompts": [p for batch in state["prompts"] for p in batch][:cfg.pairs]}


def save_model(stage: Stage, cfg: TrainConfig, work: Path, final: Path, variant: str, extra: dict) -> None:
    """Write the stage's EMA in the FLUX.1 folder layout (bf16 transformer, as the release ships
    it) into a staging folder, then move it over `final`."""
    staged = final.with_name(final.name + ".partial")
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    M.save_flux(copy.deepcopy(stage.ema.flux).to(torch.bfloat16), staged / "transformer")
    M.save_t5(stage.ema.t5, staged / "text_encoder_2")
    M.save_clip_text(stage.ema.clip, staged / "text_encoder")
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(work / name, staged / name)
    meta = {
        "variant": variant,                  # "dev" (rectified flow) or "schnell" (reflow-distilled)
        "pixel_space": True,                 # no vae/: the latent is model.PixelLatent(latent_factor)
        "latent_factor": cfg.latent_factor,
        "height": cfg.image_size, "width": cfg.image_size, "channels": 3,
        "t5_max_length": cfg.t5_max_length,
        "world": "shapes",                   # prompts are checked against toyworld's vocabulary
        "train": {**asdict(cfg), **extra, "steps_done": stage.step, "wall_minutes": round(stage.seconds / 60, 1),
                  "final_loss": float(np.mean(stage.losses[-200:]))},
    }
    (staged / "flowscale.json").write_text(json.dumps(meta, indent=2) + "\n")
    replace_folder(staged, final)
    print(f"saved {final}: {stage.step} steps, {stage.seconds / 60:.1f} min, loss {meta['train']['final_loss']:.4f}")


def train(cfg: TrainConfig) -> tuple[Path, Path]:
    """Stage 1 (teacher, rectified flow) -> pairs -> stage 2 (student, reflow); returns both folders."""
    torch.set_num_threads(cfg.threads)
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    config_file = work / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()) != asdict(cfg):
        raise ValueError(f"{work} holds a run with another configuration ({config_file}); "
                         f"remove it or pass --work <new folder>")
    config_file.write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    clip_tok, t5_tok = tokenizers(cfg, work)
    flux_p, t5_p, clip_p = (TINY_FLUX, TINY_T5, TINY_CLIP) if cfg.tiny else (MINI_FLUX, MINI_T5, MINI_CLIP)
    channels = 3 * cfg.latent_factor ** 2
    flux_p = replace(flux_p, in_channels=4 * channels, out_channels=4 * channels)
    # The vocabularies the trainers produced fix the embedding sizes.
    t5_p, clip_p = replace(t5_p, vocab_size=t5_tok.vocab_size), replace(clip_p, vocab_size=clip_tok.vocab_size)
    latent = M.PixelLatent(cfg.latent_factor)
    shape = (channels, cfg.image_size // cfg.latent_factor, cfg.image_size // cfg.latent_factor)

    # Stage 1: the teacher (dev), rectified flow on fresh renders.
    torch.manual_seed(cfg.seed)
    teacher = Stage("teacher", MiniFluxModel(flux_p, t5_p, clip_p), cfg, cfg.lr, cfg.teacher_steps, work)
    n_params = sum(p.numel() for p in teacher.net.flux.parameters())
    print(f"mini-FLUX: {n_params / 1e6:.2f} M parameters "
          f"(+ T5 {sum(p.numel() for p in teacher.net.t5.parameters()) / 1e3:.0f} k, "
          f"CLIP {sum(p.numel() for p in teacher.net.clip.parameters()) / 1e3:.0f} k)")

    def teacher_loss(net, rng, gen):
        specs = [toyworld.sample_spec(rng, kind="any", split="train") for _ in range(cfg.batch_size)]
        prompts = [toyworld.spec_to_prompt(s) for s in specs]
        x0 = latent.encode(toyworld.render_batch(specs, rng, cfg.image_size) * 2 - 1)   # (B, 27, 16, 16)
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(cfg.batch_size, generator=gen))                   # logit-normal(0, 1)
        t_ = t.view(-1, 1, 1, 1)
        x_t = (1 - t_) * x0 + t_ * eps                      # the linear interpolant, t = 1 is noise
        return F.mse_loss(net(x_t, t, t5_tok(prompts), clip_tok(prompts)).float(), eps - x0)

    teacher.run(teacher_loss)
    dev = Path(cfg.out_dev)
    save_model(teacher, cfg, work, dev, "dev", {"stage": "rectified flow (teacher)"})

    # Stage 2: the student (schnell), reflow on the teacher's ODE pairs, initialised from its EMA.
    pairs = teacher_pairs(teacher.ema, cfg, t5_tok, clip_tok, shape, work)
    student = Stage("student", copy.deepcopy(teacher.ema).requires_grad_(True), cfg, cfg.student_lr,
                    cfg.student_steps, work)

    def student_loss(net, rng, gen):
        idx = torch.from_numpy(rng.integers(0, len(pairs["eps"]), cfg.batch_size))
        z0, eps = pairs["z0"][idx], pairs["eps"][idx]
        prompts = [pairs["prompts"][i] for i in idx.tolist()]
        t = torch.rand(cfg.batch_size, generator=gen)
        t[: round(cfg.student_t1 * cfg.batch_size)] = 1.0   # one-step distillation share
        t_ = t.view(-1, 1, 1, 1)
        x_t = (1 - t_) * z0 + t_ * eps                      # the straight line between the coupled pair
        return F.mse_loss(net(x_t, t, t5_tok(prompts), clip_tok(prompts)).float(), eps - z0)

    student.run(student_loss)
    schnell = Path(cfg.out_schnell)
    save_model(student, cfg, work, schnell, "schnell",
               {"stage": "reflow of mini-flux-dev (Liu et al. 2022) with one-step distillation share",
                "teacher_minutes": round(teacher.seconds / 60, 1)})
    return dev, schnell


# -----------------------------------------------------------------------------------------------
# Evaluation: how good is the base model? (the room search has to help)


EVAL_RUNS = {   # label -> generate() settings; every method returns x0_hat at its last grid time
    "plain Linear-ODE, 10 steps": dict(method="none", dynamics="linear-ode", nfe=10, num_steps=10),
    "1-step image (x0_hat at t = 1)": None,   # one_step_images: no search has a single step
    "plain Linear-SDE, 10 steps": dict(method="none", dynamics="linear-sde", nfe=10, num_steps=10),
    "plain VP-SDE, 10 steps": dict(method="none", dynamics="vp-sde", nfe=10, num_steps=10),
}


def one_step_images(pipe, prompts: list[str], seed: int):
    """x0_hat at t = 1 (Eq. 19 with x_1 = eps): the model's image after a single NFE, (P, 3, H, W).
    The noise is the one generate() draws for a plain sampler's first particle with this seed."""
    import flowscale

    cond = flowscale.encode_prompts(pipe, prompts)
    velocity = flowscale.make_velocity(pipe, cond)
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn((len(prompts), *pipe.latent_shape), generator=g)           # (P, C, H, W)
    with torch.no_grad():
        u = velocity(eps, torch.ones(len(prompts)), torch.arange(len(prompts)))
        return flowscale.decode(pipe, eps - u)                                    # x0_hat = x_1 - 1 * u_1


def evaluate(folder: str | Path, n_prompts: int = 200, seed: int = 0, batch: int = 50, bon_nfe: int = 500) -> dict:
    """The samplers of EVAL_RUNS on the first `n_prompts` hard held-out prompts of each task
    (toyworld.heldout_prompts(kind, n, seed, split="hard")), one sample per prompt, scored by the
    held-out metrics of flowscale.heldout_metrics: exact-count accuracy and mean RSS (counting),
    fraction of facts (composition), fidelity and the learned counter's accuracy, each as mean and
    standard error over prompts. BoN at `bon_nfe` (0: skipped; given reward: the exact counting
    reward) runs on counting only, where it shows how much room the task leaves above best-of-N.
    Written into flowscale.json under "eval" and returned."""
    import experiments  # the harness built on flowscale; imported here, for this function only
    import flowscale

    def mean_se(values: list[float]) -> dict:
        stat = experiments.mean_se(values)
        return {"mean": round(stat.mean, 4), "se": round(stat.se, 4)}

    pipe = flowscale.load_pipeline(folder)
    runs = dict(EVAL_RUNS)
    if bon_nfe:
        runs[f"BoN (Linear-ODE), {bon_nfe} NFE"] = dict(method="bon", dynamics="linear-ode", nfe=bon_nfe, num_steps=10)
    scores = {}
    for kind in ("counting", "composition"):
        prompts = toyworld.heldout_prompts(kind, n_prompts, seed=seed, split="hard")
        scores[kind] = {}
        for label, settings in runs.items():
            if settings is not None and settings["method"] == "bon" and kind != "counting":
                continue
            start, metrics = time.perf_counter(), []
            for i in tqdm(range(0, n_prompts, batch), desc=f"eval {Path(folder).name} {kind}: {label}",
                          dynamic_ncols=True):
                chunk = prompts[i:i + batch]
                if settings is None:
                    metrics += flowscale.heldout_metrics(one_step_images(pipe, chunk, seed + i), chunk, pipe.counter)
                else:
                    metrics += flowscale.generate(pipe, chunk, reward=kind, seed=seed + i, **settings).metrics
            keys = ("accuracy", "rss") if kind == "counting" else ("composition",)
            scores[kind][label] = {**{k: mean_se([m[k] for m in metrics])
                                      for k in (*keys, "fidelity", "counter_accuracy")},
                                   "seconds": round(time.perf_counter() - start, 1)}
    meta_file = Path(folder) / "flowscale.json"
    meta = json.loads(meta_file.read_text())
    meta["eval"] = {"prompts": f"first {n_prompts} hard held-out prompts per task (>= 3 groups or >= 7 objects), "
                               f"seed {seed}, one sample each", **scores}
    flowscale.write_atomic(meta_file, json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta["eval"], indent=2))
    return meta["eval"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in fields(TrainConfig):
        flag = f"--{field.name.replace('_', '-')}"
        if field.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)
    parser.add_argument("--eval-only", action="store_true", help="only evaluate the models in --out-dev and --out-schnell")
    parser.add_argument("--no-eval", action="store_true", help="train without the evaluation at the end")
    parser.add_argument("--eval-prompts", type=int, default=200, help="hard held-out prompts per task in the evaluation")
    parser.add_argument("--eval-bon-nfe", type=int, default=500,
                        help="budget of the best-of-N row of the evaluation (0: skip it; it costs most of the time)")
    args = vars(parser.parse_args())
    eval_only, no_eval, eval_prompts = args.pop("eval_only"), args.pop("no_eval"), args.pop("eval_prompts")
    bon_nfe = args.pop("eval_bon_nfe")
    cfg = TrainConfig(**args)
    folders = (Path(cfg.out_dev), Path(cfg.out_schnell)) if eval_only else train(cfg)
    if not no_eval:
        for folder in folders:
            evaluate(folder, eval_prompts, seed=cfg.seed, bon_nfe=bon_nfe)


if __name__ == "__main__":
    main()
