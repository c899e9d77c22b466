"""The real-FLUX.1 code path of flowscale.py, end to end, on tiny random FLUX.1 repositories.

No FLUX.1 weights can be downloaded here, so this module writes, once, tiny random repositories in
the release layout of black-forest-labs/FLUX.1-schnell and FLUX.1-dev (tiny.write_repo):

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
import hashlib
import json
import math
import shutil
import warnings
from pathlib import Path

import matplotlib.image
import pytest
import torch
from safetensors.torch import save_file

import flowscale
import checkpoints
import model as M
import train
import rewards as R
import search
from tiny import CORPUS, Repo, randomise_vectors, write_repo

PROMPT = "a photo of a cat"
T5_MAX = {"schnell": 256, "dev": 512}  # BFL's T5 sequence lengths, which load_pipeline must pick
# (height, width) of the generated images: not square, so a swapped axis shows. The schnell-like
# autoencoder has f = 8 (as FLUX.1's), the dev-like one f = 2 (AE_CONFIGS["tiny"]).
SIZE = {"schnell": (32, 48), "dev": (16, 32)}
CLIP_PROJECTION = 12  # the reward CLIP's embedding width = the aesthetic head's input size


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
    train.train_clip_bpe(CORPUS, 400, folder)
    torch.manual_seed(0)
    # eos_token_id=2: OpenAI's legacy value, with which transformers pools at argmax(ids) as CLIPText does
    text = dict(vocab_size=checkpoints.load_clip_tokenizer(folder).vocab_size, hidden_size=24, intermediate_size=40,
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

    monkeypatch.setattr(checkpoints, "load_flux", no_loading)
    folder = repos["schnell"].folder
    H, W = SIZE["schnell"]
    err = cli_error(capsys, folder, "--reward", "clip-score", "--clip", str(clip), "--height", str(H + 8))
    assert "divisible by 16" in err and f"{H + 8}x{W}" in err


# -----------------------------------------------------------------------------------------------
# Real work (GitHub issue 13): --device, --dtype, --offload, --compile, --prompts FILE, the dev shift


class MeanBrightness:
    """A tiny reward of the plugin protocol (no files): the mean of the image."""

    name = "mean"
    differentiable = True

    def __call__(self, images, prompts):
        return images.mean((1, 2, 3))


def test_seeded_real_path_output_is_pinned(repos):
    """Recorded before the device-generic search: the same seed gives the same result as before it.

    Within one process the same seed gives the same bits. Across processes only to float tolerance:
    one full-suite run on a fresh checkout gave other bits than the digest recorded then
    (fb2fa8413819c189), which a rerun did not reproduce, so the pin is on the reward, at 1e-4."""
    H, W = SIZE["schnell"]
    pipe = flowscale.load_pipeline(repos["schnell"].folder, height=H, width=W, dtype=torch.float32)
    digests = []
    for _ in range(2):
        generation = flowscale.generate(pipe, [PROMPT], method="rbf", dynamics="vp-sde", nfe=12, num_steps=3, seed=1,
                                        reward=MeanBrightness())
        digests.append(hashlib.sha256(generation.result.x0.float().contiguous().numpy().tobytes()).hexdigest())
    assert digests[0] == digests[1]
    assert generation.reward == [pytest.approx(0.5608893632888794, rel=1e-4)], digests[0][:16]
    assert generation.images.device.type == "cpu" and pipe.device == torch.device("cpu")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_generate_through_the_device_flags(repos, tmp_path, capsys, monkeypatch, dtype):
    compiled = []

    def fake_compile(module, **kwargs):  # a real first compile costs 20-30 s here
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    plugin = tmp_path / "mean_reward.py"
    plugin.write_text("import torch\n\nclass Mean:\n    name = 'mean'\n    differentiable = False\n\n"
                      "    def __call__(self, images, prompts):\n        return images.mean((1, 2, 3))\n")
    out = tmp_path / "out"
    code = run_generate(repos["schnell"].folder, "schnell", out, "--prompt", PROMPT, "--reward", f"{plugin}:Mean",
                        "--method", "rbf", "--nfe", "12", "--steps", "3", "--seed", "1", "--device", "cpu",
                        "--dtype", dtype, "--offload", "--compile", "--max-batch", "1")
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "result.json").read_text())
    assert record["reward_name"] == f"{plugin}:Mean" and 9 <= record["nfe_used"] <= 12
    assert len(compiled) == 1 and isinstance(compiled[0], M.Flux)
    assert "time_shift" not in record  # schnell is sampled unshifted


def test_offload_keeps_the_encoders_on_the_cpu_and_changes_nothing(repos):
    H, W = SIZE["schnell"]
    folder = repos["schnell"].folder
    plain, parked = (flowscale.load_pipeline(folder, height=H, width=W, dtype=torch.float32, offload=o)
                     for o in (False, True))
    assert parked.offload and not plain.offload
    runs = [flowscale.generate(p, [PROMPT], method="bon", dynamics="linear-ode", nfe=6, num_steps=3, seed=2,
                               reward=MeanBrightness()) for p in (plain, parked)]
    assert torch.equal(runs[0].images, runs[1].images)
    for module in (parked.t5, parked.clip, parked.latent):  # back on the CPU after every use
        assert all(p.device.type == "cpu" for p in module.parameters())


def bfl_get_schedule(num_steps: int, image_seq_len: int, shift: bool = True) -> list[float]:
    """BFL's flux/sampling.py get_schedule, written out: mu linear in the image tokens from base_shift 0.5 at
    256 to max_shift 1.15 at 4096, t -> exp(mu) / (exp(mu) + (1 / t - 1) ** 1)."""
    timesteps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        m = (1.15 - 0.5) / (4096 - 256)
        mu = m * image_seq_len + (0.5 - m * 256)
        timesteps = math.exp(mu) / (math.exp(mu) + (1 / timesteps - 1) ** 1.0)
    return timesteps.tolist()


def test_dev_is_shifted_as_bfl_and_schnell_is_not(repos, tmp_path, capsys):
    (Hd, Wd), (Hs, Ws) = SIZE["dev"], SIZE["schnell"]
    dev = flowscale.load_pipeline(repos["dev"].folder, height=Hd, width=Wd, dtype=torch.float32)
    schnell = flowscale.load_pipeline(repos["schnell"].folder, height=Hs, width=Ws, dtype=torch.float32)
    C, h, w = dev.latent_shape
    tokens = (h // 2) * (w // 2)  # the 2x2-packed latent pixels
    assert dev.time_shift == pytest.approx(math.exp(0.5 + (tokens - 256) * 0.65 / 3840), rel=1e-12)
    assert schnell.time_shift is None
    # BFL's own schedule (uniform grid, linear ODE) is the search's grid for dev, and the plain grid for schnell
    for pipe, shifted in ((dev, True), (schnell, False)):
        problem = flowscale.make_problem(pipe, flowscale.encode_prompts(pipe, [PROMPT]), MeanBrightness(),
                                         dynamics="linear-ode", num_steps=8)
        problem.time_grid = "uniform"
        seq = (pipe.latent_shape[1] // 2) * (pipe.latent_shape[2] // 2)
        expect = torch.tensor(bfl_get_schedule(8, seq, shift=shifted), dtype=torch.float64)
        assert torch.allclose(search.grid_times(problem), expect, rtol=0, atol=1e-12)
    # at the real sizes: 1024^2 is 4096 tokens (mu = 1.15), 512^2 is 1024
    assert flowscale.sde.flux_shift(4096) == pytest.approx(math.exp(1.15))
    assert flowscale.sde.flux_shift(1024) == pytest.approx(math.exp(0.5 + 768 * 0.65 / 3840))
    # the velocity of a dev search is called at the shifted times (the paper's exp grid, then BFL's shift)
    seen = []
    gen = flowscale.generate(dev, [PROMPT], method="none", dynamics="linear-ode", nfe=4, num_steps=4,
                             reward=MeanBrightness(), callback=lambda info: seen.append(info.t))
    exp_grid = flowscale.sde.time_grid(4, "exp")
    shifted = dev.time_shift * exp_grid / (1 + (dev.time_shift - 1) * exp_grid)
    assert seen == pytest.approx(shifted[:4].float().tolist(), abs=1e-7) and gen.nfe_used == [4]
    # and result.json says so
    out = tmp_path / "dev"
    assert run_generate(repos["dev"].folder, "dev", out, "--prompt", PROMPT, "--reward",
                        "tests.test_real_flux_path:MeanBrightness", "--method", "none", "--steps", "2",
                        "--nfe", "2", "--dtype", "float32") == 0, capsys.readouterr().err
    assert json.loads((out / "result.json").read_text())["time_shift"] == pytest.approx(dev.time_shift)


def test_prompts_file_one_folder_each_resumable(repos, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\n# a comment\na small red fox\na horse in a field\n")
    out = tmp_path / "out"
    argv = ["--prompts", str(prompts), "--batch", "2", "--reward", "tests.test_real_flux_path:MeanBrightness",
            "--method", "bon", "--dynamics", "linear-ode", "--nfe", "6", "--steps", "3", "--dtype", "float32"]
    assert run_generate(repos["schnell"].folder, "schnell", out, *argv) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 3 and summary["skipped"] == 0
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert [f.name[:5] for f in folders] == ["0000-", "0001-", "0002-"]
    records = [json.loads((f / "result.json").read_text()) for f in folders]
    assert [r["prompt"] for r in records] == [PROMPT, "a small red fox", "a horse in a field"]
    assert [r["line"] for r in records] == [1, 2, 3]
    image_2 = (folders[2] / "image.png").read_bytes()

    # a rerun skips every finished prompt: no search at all
    real_generate = flowscale.generate
    monkeypatch.setattr(flowscale, "generate", lambda *a, **k: pytest.fail("a finished prompt was searched again"))
    assert run_generate(repos["schnell"].folder, "schnell", out, *argv) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 3
    # an unfinished prompt (its result.json lost) is searched again, with its chunk: the same image
    calls = []
    monkeypatch.setattr(flowscale, "generate", lambda pipe, batch, **k: calls.append(batch) or real_generate(pipe, batch, **k))
    (folders[2] / "result.json").unlink()
    assert run_generate(repos["schnell"].folder, "schnell", out, *argv) == 0
    assert calls == [["a horse in a field"]] and (folders[2] / "image.png").read_bytes() == image_2
    assert json.loads(capsys.readouterr().out)["written"] == 1
    # other settings in the same --out are refused, not mixed
    code = run_generate(repos["schnell"].folder, "schnell", out, *argv, "--seed", "9")
    assert code == 2 and "other settings (seed)" in capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("extra, message", [
    (("--device", "cuda"), "CUDA is not available"),
    (("--device", "cuda:1"), "CUDA is not available"),
    (("--device", "tpu"), "unknown device 'tpu'"),
    (("--dtype", "float64"), "unknown dtype 'float64'"),
    (("--prompts", "/nonexistent/prompts.txt"), "cannot read it"),
    (("--prompts", "."), "cannot read it"),
    (("--reward", "no_such_module_xyz:reward"), "No module named 'no_such_module_xyz'"),
])
def test_bad_device_dtype_or_prompts_file_is_one_line(repos, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also where a GPU exists

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(flowscale, "load_pipeline", no_loading)
    prompt = [] if "--prompts" in extra else ["--prompt", PROMPT]
    code = run_generate(repos["schnell"].folder, "schnell", tmp_path / "out", *prompt, "--reward",
                        "tests.test_real_flux_path:MeanBrightness", *extra)
    assert code == 2 and message in one_line(capsys.readouterr().err)


def test_a_dtype_the_device_cannot_run_is_refused(monkeypatch):
    # a GPU without native bfloat16 (a V100, a T4), simulated: the check names the dtype to use instead
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert flowscale.resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="Tesla T4 has no native bfloat16; use --dtype float16 or float32"):
        flowscale.resolve_dtype("bfloat16", flowscale.resolve_device("cuda:1"))
    with pytest.raises(ValueError, match="2 CUDA device"):
        flowscale.resolve_device("cuda:2")
    assert flowscale.resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert flowscale.resolve_dtype(torch.float64, torch.device("cpu")) == torch.float64  # the API takes any float


def test_both_or_neither_prompt_flags_are_refused(repos, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    for extra in ((), ("--prompt", PROMPT, "--prompts", str(prompts))):
        assert run_generate(repos["schnell"].folder, "schnell", tmp_path / "out", *extra) == 2
        assert "--prompt P or --prompts FILE" in one_line(capsys.readouterr().err)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    assert run_generate(repos["schnell"].folder, "schnell", tmp_path / "out", "--prompts", str(empty)) == 2
    assert "no prompts in it" in one_line(capsys.readouterr().err)
