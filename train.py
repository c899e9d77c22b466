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
import collections
import copy
import io
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import sentencepiece
import tokenizers
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

import checkpoints
import model as M
import rewards as R
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
    pairs: int = 6144                   # (noise, teacher sample) pairs for reflow
    pair_steps: int = 20                # Euler steps of the teacher ODE that makes a pair
    student_steps: int = 1200           # optimizer steps of stage 2 (reflow)
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

# The text encoders' sizes: M.T5Config / M.CLIPTextConfig without vocab_size, which the tokenizers
# trained on the corpus fix (train(): the number of pieces / tokens they learnt).
MINI_T5 = dict(
    d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
)

MINI_CLIP = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5,
)

# For tests of the training loop (`tiny=True`): same code path, a few seconds per stage.
TINY_FLUX = replace(MINI_FLUX, hidden_size=32, num_heads=2, depth=1, depth_single_blocks=1,
                    axes_dim=[4, 6, 6], vec_in_dim=16, context_in_dim=16)
TINY_T5 = MINI_T5 | dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
TINY_CLIP = MINI_CLIP | dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


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


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine decay to floor * peak at `steps` (every stage here:
    the two flow stages with floor 0.1, the learned counter with 0.05)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


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
# Tokenizers: small vocabularies in the release file formats (FLUX.1's tokenizer/ and tokenizer_2/)


def train_clip_bpe(corpus: list[str], vocab_size: int, folder: str | Path) -> Path:
    """Learn a CLIP-format BPE vocabulary of at most vocab_size tokens on `corpus`; write it to `folder`.

    Files: vocab.json, merges.txt ("#version: 0.2" + one merge per line), tokenizer_config.json and
    special_tokens_map.json, as in FLUX.1's tokenizer/, so `checkpoints.load_clip_tokenizer` and transformers'
    CLIPTokenizer read it. Vocabulary order as CLIP's: the 256 byte characters, their `</w>`
    forms, one token per merge in merge order, <|startoftext|>, <|endoftext|> (the largest id, which
    the argmax pooling of `CLIPText` relies on). To leave room for merges in a small vocabulary,
    only characters occurring in the corpus get a `</w>` form (CLIP has all 256); a word ending in
    another character encodes that piece as the unknown token <|endoftext|>. The merges are
    learned by the `tokenizers` BPE trainer on the corpus, cleaned and split exactly as at
    tokenization. The vocabulary is smaller than vocab_size when the corpus runs out of pairs.
    """
    byte_chars = list(M.clip_byte_alphabet().values())
    backend = M.clip_pipeline(tokenizers.Tokenizer(tokenizers.models.BPE(end_of_word_suffix="</w>")))
    seen = {c for text in corpus for word, _ in backend.pre_tokenizer.pre_tokenize_str(
        backend.normalizer.normalize_str(text)) for c in word}
    vocab = {token: i for i, token in enumerate(byte_chars + [c + "</w>" for c in byte_chars if c in seen])}
    if vocab_size < len(vocab) + 2:
        raise ValueError(f"vocab_size {vocab_size} is too small: this corpus needs {len(vocab)} byte tokens + 2 "
                         f"specials before any merge (256 bytes + {len(vocab) - 256} word-end forms)")
    # The trainer's size counts its own alphabet (at most 256 bytes + 256 word-end forms) too, so
    # 512 + vocab_size lets it learn at least as many merges as can be kept; BPE is greedy, so the
    # first k merges of a longer run are the merges of a run stopped at k.
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=512 + vocab_size, show_progress=False,
                                             initial_alphabet=byte_chars, end_of_word_suffix="</w>")
    backend.train_from_iterator(corpus, trainer)
    learned = json.loads(backend.to_str())["model"]["merges"]  # in learning order = application rank
    merges = []
    for pair in learned:
        if len(vocab) == vocab_size - 2:
            break
        left, right = pair.split(" ") if isinstance(pair, str) else pair
        assert left in vocab and right in vocab, f"merge {pair} uses a token outside the vocabulary"
        merges.append(f"{left} {right}")
        vocab.setdefault(left + right, len(vocab))
    vocab[M.CLIP_BOS], vocab[M.CLIP_EOS] = len(vocab), len(vocab) + 1

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": M.CLIP_BOS, "eos_token": M.CLIP_EOS, "pad_token": M.CLIP_EOS, "unk_token": M.CLIP_EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "add_prefix_space": False, "errors": "replace", **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return folder


def train_t5_sentencepiece(corpus: list[str], vocab_size: int, folder: str | Path) -> Path:
    """Learn a T5-layout SentencePiece unigram model of about vocab_size pieces; write folder/spiece.model.

    Ids as T5's: <pad> 0, </s> 1, <unk> 2, no <s>. Same normaliser as T5 (nmt_nfkc) and every
    corpus character kept (character_coverage=1.0), so every corpus word encodes without <unk>.
    vocab_size is a soft limit (hard_vocab_limit=False): a small corpus may support fewer pieces,
    and the model then has fewer (`checkpoints.load_t5_tokenizer(...).vocab_size` tells). Also writes
    tokenizer_config.json / special_tokens_map.json (with no sentinel <extra_id_*> tokens), so
    transformers' T5Tokenizer reads the folder. Meant for small corpora (it seeds, see below).
    """
    if vocab_size < 4:
        raise ValueError(f"vocab_size must exceed the 3 special pieces, got {vocab_size}")
    # The unigram trainer starts from a large seed vocabulary and prunes it by EM (Kudo 2018,
    # Sec. 3.2). SentencePiece's own seeds are the repeats found by a suffix array that can be
    # extended in more than one way; in a small synthetic corpus every word is always followed by a
    # space, so whole words are never proposed and the model falls back to letters (measured on
    # the shape-world prompts: up to 50 pieces per prompt of at most 17 words). So we seed with every
    # substring of "▁word" up to 16 characters (SentencePiece's longest piece), weighted by frequency.
    word_counts = collections.Counter(w for text in corpus for w in text.split())
    seeds = collections.Counter()
    for word, n in word_counts.items():
        word = "\u2581" + word
        for i in range(len(word)):
            for j in range(i + 2, min(len(word), i + 16) + 1):
                seeds[word[i:j]] += n
    model = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        seed_file = Path(tmp) / "seeds.tsv"
        seed_file.write_text("".join(f"{piece}\t{n}\n" for piece, n in seeds.most_common()), encoding="utf-8")
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0,
            seed_sentencepieces_file=str(seed_file), num_threads=1, minloglevel=2)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0,
              "additional_special_tokens": [], **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return folder


# -----------------------------------------------------------------------------------------------
# Training


def train_tokenizers(cfg: TrainConfig, work: Path):
    """CLIP BPE and T5 SentencePiece tokenizers trained on the training prompts (the real FLUX
    ships CLIP's and T5's), written once into `work` and read back from there."""
    if not (work / "tokenizer_2" / "spiece.model").is_file():
        corpus = toyworld.train_prompts()
        train_clip_bpe(corpus, cfg.clip_vocab, work / "tokenizer.tmp")
        train_t5_sentencepiece(corpus, cfg.t5_vocab, work / "tokenizer_2.tmp")
        for name in ("tokenizer", "tokenizer_2"):
            replace_folder(work / f"{name}.tmp", work / name)
    return checkpoints.load_clip_tokenizer(work), checkpoints.load_t5_tokenizer(work, max_length=cfg.t5_max_length)


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
    checkpoints.save_flux(copy.deepcopy(stage.ema.flux).to(torch.bfloat16), staged / "transformer")
    checkpoints.save_t5(stage.ema.t5, staged / "text_encoder_2")
    checkpoints.save_clip_text(stage.ema.clip, staged / "text_encoder")
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

    clip_tok, t5_tok = train_tokenizers(cfg, work)
    flux_p, t5_p, clip_p = (TINY_FLUX, TINY_T5, TINY_CLIP) if cfg.tiny else (MINI_FLUX, MINI_T5, MINI_CLIP)
    channels = 3 * cfg.latent_factor ** 2
    flux_p = replace(flux_p, in_channels=4 * channels, out_channels=4 * channels)
    # The vocabularies the trainers produced fix the embedding sizes.
    t5_p = M.T5Config(vocab_size=t5_tok.vocab_size, **t5_p)
    clip_p = M.CLIPTextConfig(vocab_size=clip_tok.vocab_size, **clip_p)
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


def run_metrics(pipe, kind: str, prompts: list[str], settings: dict | None, seed: int, batch: int = 50,
                desc: str = "eval") -> list[dict]:
    """Held-out metrics (flowscale.heldout_metrics) of one run of EVAL_RUNS, one dict per prompt; the
    chunk starting at prompt i uses seed + i, so a prompt gets the same noise under every model."""
    import flowscale

    metrics = []
    for i in tqdm(range(0, len(prompts), batch), desc=desc, dynamic_ncols=True):
        chunk = prompts[i:i + batch]
        if settings is None:
            metrics += flowscale.heldout_metrics(one_step_images(pipe, chunk, seed + i), chunk, pipe.counter)
        else:
            metrics += flowscale.generate(pipe, chunk, reward=kind, seed=seed + i, **settings).metrics
    return metrics


EVAL_METRICS = {"counting": ("accuracy", "rss", "fidelity", "counter_accuracy"),   # per task, held out
                "composition": ("composition", "fidelity", "counter_accuracy")}


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
            start = time.perf_counter()
            metrics = run_metrics(pipe, kind, prompts, settings, seed, batch,
                                  desc=f"eval {Path(folder).name} {kind}: {label}")
            scores[kind][label] = {**{k: mean_se([m[k] for m in metrics]) for k in EVAL_METRICS[kind]},
                                   "seconds": round(time.perf_counter() - start, 1)}
    meta_file = Path(folder) / "flowscale.json"
    meta = json.loads(meta_file.read_text())
    meta["eval"] = {"prompts": f"first {n_prompts} hard held-out prompts per task (>= 3 groups or >= 7 objects), "
                               f"seed {seed}, one sample each", **scores}
    flowscale.write_atomic(meta_file, json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta["eval"], indent=2))
    return meta["eval"]


def compare(old: str | Path, new: str | Path, n_prompts: int = 200, seed: int = 0, batch: int = 50) -> dict:
    """Did a retraining help? The runs of EVAL_RUNS under both models on the same prompts and noise
    (those of `evaluate`), as paired differences new - old per prompt: {kind: {label: {metric:
    experiments.Stat}}}, and a table with the bench's 2-SE verdict (experiments.verdict) printed."""
    import experiments
    import flowscale

    pipes = {"old": flowscale.load_pipeline(old), "new": flowscale.load_pipeline(new)}
    diffs = {}
    for kind in ("counting", "composition"):
        prompts = toyworld.heldout_prompts(kind, n_prompts, seed=seed, split="hard")
        diffs[kind] = {}
        for label, settings in EVAL_RUNS.items():
            m = {name: run_metrics(pipe, kind, prompts, settings, seed, batch, desc=f"{name} {kind}: {label}")
                 for name, pipe in pipes.items()}
            diffs[kind][label] = {k: experiments.mean_se([b[k] - a[k] for a, b in zip(m["old"], m["new"])])
                                  for k in EVAL_METRICS[kind]}
    print(f"new ({new}) - old ({old}), paired over the first {n_prompts} hard held-out prompts, seed {seed}:")
    for kind, rows in diffs.items():
        for label, stats in rows.items():
            for metric, d in stats.items():
                print(f"  {kind:11s} {label:32s} {metric:16s} {experiments.verdict(d)}")
    return diffs


# -----------------------------------------------------------------------------------------------
# The learned counter (weights/counter): the differentiable reward of the DPS methods and a second,
# held-out counter beside the exact detector (rewards.LearnedCounter)


@dataclass
class CounterTrainConfig:
    steps: int = 4000          # optimizer steps (~0.2 s each at 48x48 on a busy 2-core machine)
    minutes: float = 20.0      # wall-clock safety limit (stopping early skips the end of the schedule)
    batch_size: int = 32       # rendered images per step
    lr: float = 2e-3           # AdamW peak learning rate, cosine decay to lr/20 (lr_at, floor 0.05)
    warmup: int = 100          # linear warm-up steps
    # Beyond ~1.2 px of blur a 7.5 px circle and square look alike, and their labels become noise.
    max_blur: float = 1.2      # augmentation: Gaussian blur std ~ U(0, max_blur) px, per quarter batch
    max_noise: float = 0.15    # augmentation: additive N(0, s^2) noise, s ~ U(0, max_noise) per image
    seed: int = 0              # seeds specs, renders, augmentation and the initialisation
    threads: int = 1           # torch intra-op threads (small convolutions gain little from more)


def counter_batch(rng: np.random.Generator, n: int, size: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """n fresh renders of random specs of `split` and their count vectors (n, K) in CATEGORIES order."""
    specs = [toyworld.sample_spec(rng, "any", split) for _ in range(n)]
    counts = torch.tensor([[s.counts().get(cat, 0) for cat in toyworld.CATEGORIES] for s in specs],
                          dtype=torch.float32)
    return toyworld.render_batch(specs, rng, size), counts


@torch.no_grad()
def counter_accuracy(counter: R.LearnedCounter, n: int = 512, seed: int = 1, blur: float = 0.0,
                     noise: float = 0.0, split: str = "heldout") -> float:
    """Share of n fresh renders (specs of `split`) on which the rounded predicted counts of all
    12 categories equal the true counts."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    images, counts = counter_batch(rng, n, toyworld.IMAGE_SIZE, split)
    pred = counter.counts(R.degrade(images, blur, noise, gen))
    return float((pred.round() == counts).all(1).float().mean())


def train_counter(cfg: CounterTrainConfig, out_folder: str | Path = R.DEFAULT_COUNTER) -> R.LearnedCounter:
    """Train the LearnedCounter on fresh training-split renders with blur/noise augmentation, and
    save model.safetensors + config.json (with its measured accuracy) in `out_folder`
    (`python train.py --counter`)."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    counter = R.LearnedCounter(R.CounterConfig())
    opt = torch.optim.AdamW(counter.parameters(), lr=cfg.lr, weight_decay=1e-4)
    start, losses = time.time(), []
    for step in range(cfg.steps):
        images, counts = counter_batch(rng, cfg.batch_size, toyworld.IMAGE_SIZE, "train")
        # Four blur levels per batch (one conv each), then a noise level per image.
        quarters = images.chunk(4)
        images = torch.cat([toyworld.gaussian_blur(q, float(rng.uniform(0, cfg.max_blur))) for q in quarters])
        noise = torch.rand(len(images), 1, 1, 1, generator=gen) * cfg.max_noise  # (B, 1, 1, 1)
        images = R.degrade(images, 0.0, noise, gen)
        loss = F.mse_loss(counter.counts(images), counts)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, floor=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"step {step:5d}  loss {np.mean(losses[-100:]):.4f}  {time.time() - start:6.1f} s")
        if (time.time() - start) / 60 > cfg.minutes:
            print(f"time limit of {cfg.minutes} min reached at step {step + 1}")
            break
    counter.eval()
    metrics = {"steps_done": len(losses), "minutes": round((time.time() - start) / 60, 2),
               "final_loss": float(np.mean(losses[-100:])),
               "accuracy_heldout_clean": counter_accuracy(counter),
               "accuracy_heldout_blur1_noise0.1": counter_accuracy(counter, blur=1.0, noise=0.1)}
    print(metrics)
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in counter.state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(
        {"model": asdict(counter.config), "train": asdict(cfg), "metrics": metrics}, indent=2) + "\n")
    return counter


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
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"),
                        help="only compare two model folders: paired differences NEW - OLD on the evaluation's prompts")
    parser.add_argument("--eval-prompts", type=int, default=200, help="hard held-out prompts per task in the evaluation")
    parser.add_argument("--eval-bon-nfe", type=int, default=500,
                        help="budget of the best-of-N row of the evaluation (0: skip it; it costs most of the time)")
    parser.add_argument("--counter", action="store_true",
                        help="train the learned counter instead (into --counter-out, seeded by --seed), nothing else")
    parser.add_argument("--counter-out", default=str(R.DEFAULT_COUNTER), help="the learned counter's folder")
    parser.add_argument("--counter-steps", type=int, default=CounterTrainConfig.steps,
                        help="optimizer steps of the learned counter")
    args = vars(parser.parse_args())
    eval_only, no_eval, eval_prompts = args.pop("eval_only"), args.pop("no_eval"), args.pop("eval_prompts")
    compare_folders = args.pop("compare")
    bon_nfe = args.pop("eval_bon_nfe")
    counter, counter_out, counter_steps = args.pop("counter"), args.pop("counter_out"), args.pop("counter_steps")
    cfg = TrainConfig(**args)
    if counter:
        train_counter(CounterTrainConfig(steps=counter_steps, seed=cfg.seed), counter_out)
        return
    if compare_folders:
        try:
            compare(*compare_folders, n_prompts=eval_prompts, seed=cfg.seed)
        except ValueError as e:   # a folder that holds no model, too many prompts: one line, exit code 2
            parser.error(str(e))
        return
    folders = (Path(cfg.out_dev), Path(cfg.out_schnell)) if eval_only else train(cfg)
    if not no_eval:
        for folder in folders:
            evaluate(folder, eval_prompts, seed=cfg.seed, bon_nfe=bon_nfe)


if __name__ == "__main__":
    main()
