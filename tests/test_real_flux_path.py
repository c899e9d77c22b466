"""The real-FLUX.1 code path of flowscale.py, end to end, on tiny random FLUX.1 repositories.

No FLUX.1 weights can be downloaded here, so this module writes, once, tiny random repositories in
the release layout of black-forest-labs/FLUX.1-schnell and FLUX.1-dev:

    model_index.json, scheduler/scheduler_config.json
    transformer/      diffusers FluxTransformer2DModel: config.json + diffusion_pytorch_model.safetensors
                      (the "bfl" variant has flux1-schnell.safetensors at the root instead)
    text_encoder/     CLIP text tower, transformers CLIPTextModel layout
    text_encoder_2/   T5 v1.1 encoder, transformers T5EncoderModel layout
    tokenizer/        CLIP BPE: vocab.json + merges.txt
    tokenizer_2/      T5 SentencePiece: spiece.model
    vae/              diffusers AutoencoderKL: config.json + diffusion_pytorch_model.safetensors

with consistent widths (Flux in_channels = 4 z_channels, context_in_dim = T5 d_model, vec_in_dim =
CLIP hidden size). The Flux head dim is FLUX.1's 128, so that the RoPE axes (16, 56, 56) of the BFL
single file are inferred from its shapes exactly as for the release. The schnell-like repository has
an 8x autoencoder as FLUX.1's; the dev-like one the 2x "tiny" preset, so a latent size hard-wired to
H/8 would show. Next to them: the real-image reward files, a tiny CLIPModel folder (with its BPE
tokenizer, as openai/clip-vit-large-patch14 ships it) and a LAION aesthetic head with the public key
names. Then `flowscale.load_pipeline` and `flowscale.py generate` run on them as a user would run
them on the real weights, and the pipeline's velocity is compared with diffusers on the same folder.
"""

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import matplotlib.image
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import flowscale
import model as M
import rewards as R
from tiny import randomise_vectors

PROMPT = "a photo of a cat"
CORPUS = [PROMPT, "a dog playing in the snow", "an owl on a branch", "a small red fox", "a horse in a field",
          "a rabbit in the grass", "a photo of a dolphin", "a lion and a tiger", "a bird on a wire",
          "an oil painting of a lighthouse at dawn", "a bowl of fruit on a wooden table"]
T5_MAX = {"schnell": 256, "dev": 512}  # BFL's T5 sequence lengths, which load_pipeline must pick
# (height, width) of the generated images: not square, so a swapped axis shows. The schnell-like
# autoencoder has f = 8 (as FLUX.1's), the dev-like one f = 2 (AE_CONFIGS["tiny"]).
SIZE = {"schnell": (32, 48), "dev": (16, 32)}
AE_8X = dataclasses.replace(M.AE_CONFIGS["tiny"], ch_mult=(1, 2, 2, 2))  # 3 downsamplings: f = 8
CLIP_PROJECTION = 12  # the reward CLIP's embedding width = the aesthetic head's input size


@dataclasses.dataclass
class Repo:
    """One tiny FLUX.1 repository on disk and the modules it was written from."""

    folder: Path
    flux: M.Flux
    t5: M.T5Encoder
    clip: M.CLIPText
    ae: M.AutoEncoder


def write_repo(folder: Path, variant: str, seed: int) -> Repo:
    """A random FLUX.1-{schnell,dev}-like repository in the release layout (see the module docstring)."""
    dev = variant == "dev"
    M.train_clip_bpe(CORPUS, 400, folder / "tokenizer")
    M.train_t5_sentencepiece(CORPUS, 48, folder / "tokenizer_2")
    clip_vocab = M.load_clip_tokenizer(folder).vocab_size
    t5_vocab = M.load_t5_tokenizer(folder).vocab_size
    torch.manual_seed(seed)
    # T5's embedding has more rows than the tokenizer has pieces (the release: 32128 vs 32000)
    t5 = M.T5Encoder(dataclasses.replace(M.T5_CONFIGS["tiny"], vocab_size=t5_vocab + 28)).eval()
    # 77 positions: FLUX's CLIP tokenizer pads every prompt to 77 ids
    clip = M.CLIPText(dataclasses.replace(M.CLIP_CONFIGS["tiny"], vocab_size=clip_vocab)).eval()
    ae = M.AutoEncoder(M.AE_CONFIGS["tiny"] if dev else AE_8X).eval()
    flux = M.Flux(M.FluxParams(in_channels=4 * ae.params.z_channels, vec_in_dim=clip.cfg.hidden_size,
                               context_in_dim=t5.cfg.d_model, hidden_size=128, mlp_ratio=4.0, num_heads=1,
                               depth=2, depth_single_blocks=1, axes_dim=(16, 56, 56), theta=10_000,
                               qkv_bias=True, guidance_embed=dev)).eval()
    for i, module in enumerate((t5, clip, ae, flux)):
        randomise_vectors(module, seed + i)
    M.save_t5(t5, folder / "text_encoder_2")
    M.save_clip_text(clip, folder / "text_encoder")
    M.save_autoencoder(ae, folder / "vae")
    M.save_flux(flux, folder / "transformer")
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


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Repo]:
    """schnell-like and dev-like repositories, and "bfl": the schnell one with its transformer as BFL's
    single file flux1-schnell.safetensors at the root (BFL names, no config.json anywhere)."""
    root = tmp_path_factory.mktemp("flux-repos")
    out = {name: write_repo(root / f"FLUX.1-{name}", name, seed) for seed, name in ((0, "schnell"), (10, "dev"))}
    schnell = out["schnell"]
    bfl = root / "FLUX.1-schnell-bfl"
    shutil.copytree(schnell.folder, bfl, ignore=shutil.ignore_patterns("transformer"))
    save_file({k: v.contiguous() for k, v in schnell.flux.state_dict().items()}, bfl / "flux1-schnell.safetensors")
    out["bfl"] = dataclasses.replace(schnell, folder=bfl)
    return out


@pytest.fixture(scope="module")
def reward_files(tmp_path_factory) -> tuple[Path, Path]:
    """(aesthetic head file, CLIPModel folder): a random transformers CLIPModel saved by save_pretrained with a
    BPE tokenizer beside it, and a random head of the public shape (input = its projection width)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("clip-vit")
    M.train_clip_bpe(CORPUS, 400, folder)
    torch.manual_seed(0)
    # eos_token_id=2: OpenAI's legacy value, with which transformers pools at argmax(ids) as CLIPText does
    text = dict(vocab_size=M.load_clip_tokenizer(folder).vocab_size, hidden_size=24, intermediate_size=40,
                num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16, eos_token_id=2, bos_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                          projection_dim=CLIP_PROJECTION)).eval()
    randomise_vectors(clip, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip.save_pretrained(folder)
    torch.manual_seed(1)
    head = tmp_path_factory.mktemp("aesthetic") / "tiny-linearMSE.pth"
    torch.save(R.AestheticMLP(CLIP_PROJECTION).state_dict(), head)  # keys layers.{0,2,4,6,7}.{weight,bias}
    return head, folder


# -----------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("variant", ["schnell", "dev", "bfl"])
def test_load_pipeline_reads_every_component(repos, variant):
    repo = repos[variant]
    base = "dev" if variant == "dev" else "schnell"
    H, W = SIZE[base]
    f = repo.ae.params.downsample
    pipe = flowscale.load_pipeline(repo.folder, height=H, width=W)
    assert not pipe.shape_world and pipe.name == str(repo.folder)
    assert pipe.latent_shape == (repo.ae.params.z_channels, H // f, W // f)
    assert pipe.guidance == (3.5 if base == "dev" else None)
    assert pipe.t5_tokenizer.max_length == T5_MAX[base] and pipe.clip_tokenizer.max_length == 77
    # bf16 by default, and every tensor is the one written (strict loads: nothing missing, renamed or extra)
    for ours, written in ((pipe.flux, repo.flux), (pipe.t5, repo.t5), (pipe.clip, repo.clip),
                          (pipe.latent, repo.ae)):
        state, expected = ours.state_dict(), written.state_dict()
        assert state.keys() == expected.keys()
        for k, v in state.items():
            assert v.dtype == torch.bfloat16 and torch.equal(v, expected[k].to(torch.bfloat16)), k
    assert pipe.flux.params == repo.flux.params  # the BFL file's config is inferred from its shapes

    # float32 on request: the weights exactly as written; a decoded latent is the H x W image
    pipe32 = flowscale.load_pipeline(repo.folder, height=H, width=W, dtype=torch.float32)
    for ours, written in ((pipe32.flux, repo.flux), (pipe32.latent, repo.ae)):
        assert all(torch.equal(v, written.state_dict()[k]) for k, v in ours.state_dict().items())
    with torch.no_grad():
        image = flowscale.decode(pipe32, torch.randn(1, *pipe32.latent_shape, generator=torch.Generator().manual_seed(0)))
    assert image.shape == (1, 3, H, W) and 0 <= image.min() and image.max() <= 1


def test_bfl_single_file_gives_the_same_velocity(repos):
    """The BFL file (BFL names) and the diffusers folder (diffusers names, fused q|k|v split, final
    modulation halves swapped) hold the same network: the pipelines' velocities are identical."""
    H, W = SIZE["schnell"]
    pipes = [flowscale.load_pipeline(repos[v].folder, height=H, width=W, dtype=torch.float32) for v in ("schnell", "bfl")]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, *pipes[0].latent_shape, generator=g), torch.tensor([0.8, 0.25])
    with torch.no_grad():
        u = [flowscale.make_velocity(p, flowscale.encode_prompts(p, [PROMPT]))(x, t, torch.tensor([0, 0]))
             for p in pipes]
    assert torch.equal(u[0], u[1]) and u[0].abs().max() > 0


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_velocity_equals_diffusers(repos, variant):
    """The pipeline's velocity (prompt encoding, packing, ids, guidance, unpacking) is diffusers'
    FluxTransformer2DModel on the same transformer/ folder, fed the same text states, in float32."""
    diffusers = pytest.importorskip("diffusers")
    repo = repos[variant]
    H, W = SIZE[variant]
    pipe = flowscale.load_pipeline(repo.folder, height=H, width=W, dtype=torch.float32)
    ref = diffusers.FluxTransformer2DModel.from_pretrained(repo.folder / "transformer", torch_dtype=torch.float32).eval()
    cond = flowscale.encode_prompts(pipe, [PROMPT, "a small red fox"])
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, *pipe.latent_shape, generator=g), torch.tensor([0.9, 0.3])
    C, h, w = pipe.latent_shape
    with torch.no_grad():
        ours = flowscale.make_velocity(pipe, cond)(x, t, torch.tensor([1, 0]))
        theirs = ref(hidden_states=M.pack(x), encoder_hidden_states=cond.txt[[1, 0]], pooled_projections=cond.y[[1, 0]],
                     timestep=t, img_ids=M.image_ids(1, h, w)[0], txt_ids=M.text_ids(1, cond.txt.shape[1])[0],
                     guidance=torch.full((2,), 3.5) if variant == "dev" else None).sample
    theirs = M.unpack(theirs, h, w)
    # Measured: bit-identical here (5 seeds per variant, CPU float32). The tolerance leaves room for
    # other kernels summing in another order (float32 rounding, ~1e-6 relative); mistakes are far
    # larger: the two prompts swapped change the output by 7% of its scale, guidance 3.0 for 3.5 by 8%.
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max(), (ours - theirs).abs().max()
    assert theirs.abs().max() > 0.1


def test_float64_pipeline_has_no_float32_rounding(repos):
    """With dtype=float64 the velocity is computed in float64 throughout (RoPE and QK-norm included).
    For r(x) = <w, u(x)>, the central difference (r(x + h v) - r(x - h v)) / 2h with h = 1e-5 is
    compared with autograd's <grad r, v>, relative to |grad r| |v|. Measured on 3 seeds: <= 2.1e-12
    when all is float64 (truncation ~h^2, rounding ~1e-16 / h); 1.1e-6 to 2.3e-5 with model.py's
    former float32 RoPE and QK-norm, whose rounding (~6e-8) divided by h dominates. 1e-9 splits them."""
    H, W = SIZE["dev"]
    pipe = flowscale.load_pipeline(repos["dev"].folder, height=H, width=W, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in pipe.flux.parameters())
    velocity = flowscale.make_velocity(pipe, flowscale.encode_prompts(pipe, [PROMPT]))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, *pipe.latent_shape, generator=g, dtype=torch.float64).requires_grad_(True)
    v, w = (torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2))
    t, prompt = torch.tensor([0.5], dtype=torch.float64), torch.tensor([0])

    def r(z):
        return (w * velocity(z, t, prompt)).sum()

    (grad,) = torch.autograd.grad(r(x), x)
    analytic = (grad * v).sum()
    h = 1e-5
    with torch.no_grad():
        numeric = (r(x + h * v) - r(x - h * v)) / (2 * h)
    assert abs(numeric - analytic) <= 1e-9 * grad.norm() * v.norm(), (numeric, analytic)


# -----------------------------------------------------------------------------------------------
# `flowscale.py generate` on the real path


def run_generate(folder: Path, variant: str, out: Path, *extra: str) -> int:
    H, W = SIZE[variant]
    return flowscale.main(["generate", "--model", str(folder), "--height", str(H), "--width", str(W),
                           "--out", str(out), *extra])


@pytest.mark.parametrize("variant, reward, method, nfe", [
    ("schnell", "aesthetic", "rbf+dps", 12),
    ("dev", "clip-score", "svdd+dps", 14),
])
def test_cli_generate_with_real_image_rewards(repos, reward_files, tmp_path, capsys, variant, reward, method, nfe):
    # 4 steps: rbf+dps needs 2 (1 + 3) = 8 NFE, svdd+dps 2 (1 + 3 k) = 14 with k = 2 children
    head, clip = reward_files
    files = ["--reward-weights", str(head), "--clip", str(clip)] if reward == "aesthetic" else ["--clip", str(clip)]
    out = tmp_path / "out"
    code = run_generate(repos[variant].folder, variant, out, "--prompt", PROMPT, "--reward", reward, *files,
                        "--method", method, "--nfe", str(nfe), "--steps", "4", "--seed", "3")
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "result.json").read_text())
    assert record["prompt"] == PROMPT and record["method"] == method and record["reward_name"] == reward
    assert record["model"] == str(repos[variant].folder) and "heldout" not in record  # no shape-world metrics
    assert nfe - 4 < record["nfe_used"] <= nfe  # spent (up to a rounding remainder) and never exceeded
    assert torch.isfinite(torch.tensor(record["reward"]))
    image = matplotlib.image.imread(out / "image.png")  # (H, W, 3 or 4), written at scale 1 for real models
    assert image.shape[:2] == SIZE[variant] and image[..., :3].std() > 0


def test_long_prompt_warns_about_truncation_and_runs(repos, reward_files, tmp_path):
    _, clip = reward_files
    prompt = " ".join(CORPUS * 5)  # 300 words: > 255 T5 pieces (and > 75 CLIP tokens)
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as caught:
        code = run_generate(repos["schnell"].folder, "schnell", out, "--prompt", prompt, "--reward", "clip-score",
                            "--clip", str(clip), "--method", "none", "--steps", "2", "--nfe", "2")
    assert code == 0
    messages = [str(w.message) for w in caught]
    # the FLUX T5 (256 ids for schnell, </s> included), the FLUX CLIP (77) and CLIPScore's CLIP (16 positions)
    for prefix, room in (("T5", 255), ("CLIP", 75), ("CLIP", 14)):
        assert any(m.startswith(f"{prefix} tokenizer: the prompt") and f"only {room} fit" in m for m in messages), room
    assert json.loads((out / "result.json").read_text())["prompt"] == prompt


# -----------------------------------------------------------------------------------------------
# Errors: exit code 2 and a message that says what to do


def cli_error(capsys, folder: Path, *extra: str) -> str:
    assert run_generate(folder, "schnell", folder.parent / "unused-out", "--prompt", PROMPT, *extra) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return err


def test_aesthetic_without_its_files_fails_before_loading_the_model(repos, reward_files, capsys, monkeypatch):
    """The missing files are named, and reported before FLUX is loaded (minutes and ~34 GB for the real one)."""
    head, clip = reward_files

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the reward's files were checked")

    monkeypatch.setattr(flowscale, "load_pipeline", no_loading)
    folder = repos["schnell"].folder
    err = cli_error(capsys, folder, "--reward", "aesthetic")
    assert "sac+logos+ava1-l14-linearMSE.pth" in err and "clip-vit-large-patch14" in err
    assert "weights=None" in err and "clip=None" in err
    err = cli_error(capsys, folder, "--reward", "aesthetic", "--clip", str(clip))
    assert "weights=None" in err and "clip=None" not in err
    err = cli_error(capsys, folder, "--reward", "aesthetic", "--reward-weights", str(head))
    assert "clip=None" in err
    assert "not found" in cli_error(capsys, folder, "--reward", "aesthetic", "--reward-weights",
                                    str(head.parent / "missing.pth"), "--clip", str(clip))


def test_repository_without_vae(repos, reward_files, tmp_path, capsys):
    _, clip = reward_files
    folder = tmp_path / "FLUX.1-schnell-no-vae"
    shutil.copytree(repos["schnell"].folder, folder, ignore=shutil.ignore_patterns("vae"))
    err = cli_error(capsys, folder, "--reward", "clip-score", "--clip", str(clip))
    assert str(folder) in err and "vae/" in err and "ae.safetensors" in err


def test_height_not_divisible_by_16_fails_before_loading(repos, reward_files, capsys, monkeypatch):
    _, clip = reward_files

    def no_loading(*args, **kwargs):
        raise AssertionError("the transformer was loaded before the image size was checked")

    monkeypatch.setattr(M, "load_flux", no_loading)
    folder = repos["schnell"].folder
    H, W = SIZE["schnell"]
    err = cli_error(capsys, folder, "--reward", "clip-score", "--clip", str(clip), "--height", str(H + 8))
    assert "divisible by 16" in err and f"{H + 8}x{W}" in err
