"""The real-image rewards of rewards.py (LAION aesthetic predictor, CLIPScore, WeightedReward) and
gradient guidance through them, on CPU with tiny random models.

  * parity: the rewards equal the same computation done with transformers' CLIPModel and with the
    public aesthetic predictor's own nn.Sequential (Linear, Dropout, ..., Linear, Linear);
  * files: the head loads a state dict with the public key names and shapes, strictly;
  * DPS: the gradient search.evaluate hands to the guided samplers, d r(decode(x0_hat(x_t))) / d x_t
    through a FLUX-format velocity network, the autoencoder and CLIP, matches finite differences
    (float64), and SVDD+DPS / RBF+DPS / DPS run end to end within their NFE budgets.

The tiny CLIP is a random transformers CLIPModel saved in the Hugging Face layout, with a BPE
tokenizer trained here in the same folder (as openai/clip-vit-large-patch14 ships both).
"""

import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import checkpoints

import model as M

import train
import rewards as R
import search
from tiny import randomise_vectors, max_diff

transformers = pytest.importorskip("transformers")

ATOL = 1e-5  # float32 parity, as in test_model_clip_vision.py
PROMPTS = ["a photo of a cat", "a dog playing in the snow", "an owl on a branch", "a small red fox"]
CORPUS = PROMPTS + ["a horse", "a rabbit in the grass", "a photo of a dolphin", "a lion and a tiger", "a bird"]
VISION_TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_channels=3, image_size=32, patch_size=8, layer_norm_eps=1e-5)
PROJECTION = 12
TEXT_POSITIONS = 16


def features(out) -> torch.Tensor:
    """get_image_features / get_text_features return a tensor in transformers 4, an output object in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class PublicAestheticMLP(nn.Module):
    """The public predictor's module as published (improved-aesthetic-predictor, simple_inference.py):
    the reference our AestheticMLP must read and reproduce. Dropout is active only in train mode."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def public_head(input_size: int, seed: int) -> PublicAestheticMLP:
    torch.manual_seed(seed)
    return PublicAestheticMLP(input_size).eval()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIPModel folder with its tokenizer; returns (transformers model, folder)."""
    folder = tmp_path_factory.mktemp("clip")
    train.train_clip_bpe(CORPUS, 600, folder)
    vocab = checkpoints.load_clip_tokenizer(folder).vocab_size
    torch.manual_seed(0)
    # eos_token_id=2: OpenAI's legacy value, transformers then pools at argmax(ids) as CLIPText does
    text = dict(vocab_size=vocab, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=TEXT_POSITIONS, layer_norm_eps=1e-5, eos_token_id=2, bos_token_id=0)
    ref = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=VISION_TINY,
                                                         projection_dim=PROJECTION)).eval()
    randomise_vectors(ref, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(folder)
    return ref, folder


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    """A random aesthetic head for the tiny CLIP (input PROJECTION), saved as the public .pth is."""
    path = tmp_path_factory.mktemp("aesthetic") / "tiny-linearMSE.pth"
    torch.save(public_head(PROJECTION, seed=1).state_dict(), path)
    return path


def images(B: int, seed: int, size: int = 16, dtype=torch.float32) -> torch.Tensor:
    """Smooth random images in [0, 1] (bilinear upsampling of a coarse grid), as decoded images are."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(B, 3, 4, 4, generator=g, dtype=dtype)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


# -----------------------------------------------------------------------------------------------
# The aesthetic head and its file


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_head_reads_the_public_layout(tmp_path, suffix):
    ref = public_head(768, seed=2)
    state = ref.state_dict()
    assert list(state) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    path = tmp_path / f"sac+logos+ava1-l14-linearMSE{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, path)
    head = R.load_aesthetic_head(path)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    x = torch.nn.functional.normalize(torch.randn(5, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        assert max_diff(head(x), ref(x)[:, 0]) <= ATOL
        # the public head has no nonlinearity ("linearMSE"): it is affine in the embedding
        assert max_diff(head(0.3 * x[:1] + 0.7 * x[1:2]), 0.3 * head(x[:1]) + 0.7 * head(x[1:2])) <= ATOL
    head.train()  # the dropout slots are identities: the reward stays deterministic
    assert torch.equal(head(x), head(x))


def test_aesthetic_head_loading_is_strict(tmp_path):
    state = public_head(768, seed=3).state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "layers.7.bias"}, "missing: layers.7.bias"),
        "extra": (state | {"layers.8.weight": torch.zeros(1, 1)}, "unexpected: layers.8.weight"),
        "wrong-shape": (state | {"layers.4.weight": torch.zeros(64, 100)}, "wrong shape: layers.4.weight"),
        "renamed": ({k.replace("layers", "mlp"): v for k, v in state.items()}, "layers.0.weight"),
    }
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(bad, path)
        with pytest.raises(checkpoints.CheckpointError, match=message):
            R.load_aesthetic_head(path)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoints.CheckpointError, match="not a readable"):
        R.load_aesthetic_head(tmp_path / "garbage.pth")
    with pytest.raises(checkpoints.CheckpointError, match="not found"):
        R.load_aesthetic_head(tmp_path / "nowhere.pth")


# -----------------------------------------------------------------------------------------------
# The rewards against transformers


def test_aesthetic_reward_matches_the_public_pipeline(clip_folder, head_file):
    ref, folder = clip_folder
    reward = R.get_reward("aesthetic", weights=head_file, clip=folder)
    assert reward.name == "aesthetic" and reward.differentiable
    x = images(3, seed=0)
    with torch.no_grad():
        got = reward(x, PROMPTS[:3])
        # public pipeline: CLIP image features, L2-normalised, through the published nn.Sequential
        embeds = features(ref.get_image_features(pixel_values=M.clip_preprocess(x, 32)))
        expected = public_head(PROJECTION, seed=1)(torch.nn.functional.normalize(embeds, dim=-1))[:, 0]
    assert got.shape == (3,) and max_diff(got, expected) <= ATOL
    with torch.no_grad():
        assert torch.equal(reward(x, PROMPTS[1:4]), got)  # the prompts do not matter
        assert max_diff(reward(x[1:2], PROMPTS[:1]), got[1:2]) <= ATOL  # rows are independent
    with pytest.raises(ValueError, match="768-d embeddings"):
        R.AestheticReward(reward.vision, R.AestheticMLP(768))


def test_clip_score_matches_transformers(clip_folder):
    ref, folder = clip_folder
    reward = R.get_reward("clip-score", clip=folder)
    assert reward.name == "clip-score" and reward.differentiable and reward.scale == 100.0
    x = images(4, seed=1)
    ids = reward.tokenizer(PROMPTS)  # (4, 16); the tokenizer itself is tested in test_model_text.py
    assert ids.shape == (4, TEXT_POSITIONS)
    with torch.no_grad():
        got = reward(x, PROMPTS)
        image = features(ref.get_image_features(pixel_values=M.clip_preprocess(x, 32)))
        text = features(ref.get_text_features(input_ids=ids))
        cos = torch.nn.functional.cosine_similarity(image, text, dim=-1)
        # the scores are 100 x the cosines, so compare the cosines at float32 parity tolerance
        assert max_diff(got / 100, cos) <= ATOL
        # HF's logits_per_image are exp(logit_scale) x the same cosines, for every image-text pair
        logits = ref(input_ids=ids, pixel_values=M.clip_preprocess(x, 32)).logits_per_image
        assert max_diff(got / 100, logits.diagonal() / ref.logit_scale.exp()) <= ATOL
        # the text embeddings are cached per prompt: a different order gives the permuted scores
        assert max_diff(reward(x.flip(0), PROMPTS[::-1]), got.flip(0)) <= ATOL
    assert set(reward._text) == set(PROMPTS)


def test_weighted_reward(clip_folder, head_file):
    _, folder = clip_folder
    aesthetic = R.get_reward("aesthetic", weights=head_file, clip=folder)
    score = R.get_reward("clip-score", clip=folder)
    both = R.WeightedReward([aesthetic, score], [1.0, 0.05])
    assert both.name == "1*aesthetic+0.05*clip-score" and both.differentiable
    x = images(2, seed=2).requires_grad_(True)
    total = both(x, PROMPTS[:2])
    with torch.no_grad():
        expected = aesthetic(x, PROMPTS[:2]) + 0.05 * score(x, PROMPTS[:2])
    assert max_diff(total.detach(), expected) <= ATOL
    total.sum().backward()
    assert x.grad.abs().sum() > 0  # the gradient reaches the pixels through both terms
    assert not R.WeightedReward([aesthetic, R.CountingReward()], [1.0, 1.0]).differentiable
    with pytest.raises(ValueError, match="one weight per reward"):
        R.WeightedReward([aesthetic], [1.0, 2.0])


def test_get_reward_says_which_files_are_missing(clip_folder, head_file, tmp_path):
    _, folder = clip_folder
    with pytest.raises(ValueError, match=r"weights=PATH .*sac\+logos\+ava1-l14-linearMSE\.pth.*clip=PATH"):
        R.get_reward("aesthetic", clip=folder)
    with pytest.raises(ValueError, match="clip=PATH"):
        R.get_reward("aesthetic", weights=head_file)
    with pytest.raises(ValueError, match=r"clip=PATH .*vocab\.json, merges\.txt"):
        R.get_reward("clip-score")
    with pytest.raises(ValueError, match="not found"):
        R.get_reward("aesthetic", weights=tmp_path / "missing.pth", clip=folder)
    with pytest.raises(ValueError, match="config.json"):
        R.get_reward("clip-score", clip=tmp_path)
    # a CLIPModel folder without its tokenizer files
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ValueError, match="vocab.json"):
        R.get_reward("clip-score", clip=bare)
    with pytest.raises(ValueError, match="unknown reward"):
        R.get_reward("imagereward")
    assert {"aesthetic", "clip-score"} <= set(R.REWARD_NAMES)


# -----------------------------------------------------------------------------------------------
# DPS through the whole pipeline: FLUX-format velocity -> x0_hat -> autoencoder -> CLIP -> reward

# The tiny autoencoder has 4 latent channels and f = 2, so a FLUX token packs 4 x 2 x 2 = 16 channels;
# (4, 8, 8) latents decode to 16 x 16 images, which CLIP's preprocessing resizes to 32 x 32.
LATENT = (4, 8, 8)
FLUX_TINY = dataclasses.replace(M.FLUX_CONFIGS["tiny"], in_channels=16, out_channels=16)
TXT_LEN = 5


@dataclasses.dataclass
class Pipe:
    """The pieces flowscale.make_problem wires together, built from tiny random models."""

    flux: M.Flux
    ae: M.AutoEncoder
    txt: torch.Tensor  # (P, TXT_LEN, context_in_dim), stands in for the T5 states
    y: torch.Tensor    # (P, vec_in_dim), stands in for CLIP's pooled vector


def tiny_pipe(num_prompts: int, dtype: torch.dtype) -> Pipe:
    torch.manual_seed(0)
    flux = M.Flux(FLUX_TINY).to(dtype).eval().requires_grad_(False)
    ae = M.AutoEncoder(M.AE_CONFIGS["tiny"]).to(dtype).eval().requires_grad_(False)
    with torch.no_grad():  # decoded pixels well inside (0, 1): no clipping (see test_dps_gradient_...)
        ae.decoder.conv_out.weight.mul_(0.25)
        ae.decoder.conv_out.bias.mul_(0.25)
    g = torch.Generator().manual_seed(1)
    txt = torch.randn(num_prompts, TXT_LEN, FLUX_TINY.context_in_dim, generator=g, dtype=dtype)
    y = torch.randn(num_prompts, FLUX_TINY.vec_in_dim, generator=g, dtype=dtype)
    return Pipe(flux, ae, txt, y)


def make_problem(pipe: Pipe, reward, prompts: list[str], **kw) -> search.Problem:
    """As flowscale.make_problem / make_velocity / decode, without the text encoders."""
    C, H, W = LATENT
    img_ids, txt_ids = M.image_ids(1, H, W), M.text_ids(1, TXT_LEN)

    def velocity(x, t, prompt):
        u = pipe.flux(img=M.pack(x), img_ids=img_ids, txt=pipe.txt[prompt], txt_ids=txt_ids, timesteps=t,
                      y=pipe.y[prompt], guidance=None)  # (B, H/2 * W/2, 4C)
        return M.unpack(u, H, W)  # (B, C, H, W)

    def reward_fn(x0, prompt):
        decoded = ((pipe.ae.decode(x0) + 1) / 2).clamp(0, 1)  # flowscale.decode
        return reward(decoded, [prompts[i] for i in prompt.tolist()])

    return search.Problem(velocity=velocity, reward=reward_fn, shape=LATENT, num_prompts=len(prompts),
                          reward_name=reward.name, differentiable=reward.differentiable, **kw)


@pytest.mark.parametrize("dynamics", ["linear-sde", "vp-sde"])
def test_dps_gradient_matches_finite_differences(clip_folder, head_file, dynamics):
    # The gradient DPS adds to every guided step (search.evaluate(grad=True)): d r(decode(x0_hat(x_t))) / d x_t,
    # through the velocity network (for vp-sde also the interpolant conversion, Eq. 11), Tweedie, the
    # autoencoder, CLIP's preprocessing and both rewards. Checked along 3 random unit directions v
    # (a random v sees any error vector e with |e.v| ~ |e| / 16 at 256 dimensions per row).
    # Everything is float64, but Flux computes its RoPE and RMSNorm in float32 (model.py), which leaves
    # rounding noise of ~1e-12 in r (measured with steps of 1e-12..1e-9), so plain central differences
    # D(h) stall at ~1e-5 |grad| for h = 1e-4. Hence a large step with Richardson extrapolation,
    # (4 D(h/2) - D(h)) / 3: truncation O(h^4), measured <= 2.2e-7 |grad| at h = 0.02 (both dynamics,
    # 3 directions each); rtol 2e-6 leaves a margin and is far below a real mistake (a wrong chain-rule
    # factor is O(1)). A large step must not cross a kink, the clipping to [0, 1] in flowscale.decode and
    # clip_preprocess: tiny_pipe's decoder keeps every decoded pixel in [0.1, 0.9] (asserted at every
    # point evaluated), where a bicubic pass (overshoot <= 1/8 of the range) cannot reach 0 or 1 either.
    _, folder = clip_folder
    pipe = tiny_pipe(2, torch.float64)
    reward = R.WeightedReward([R.get_reward("aesthetic", weights=head_file, clip=folder, dtype=torch.float64),
                               R.get_reward("clip-score", clip=folder, dtype=torch.float64)], [1.0, 0.05])
    problem = make_problem(pipe, reward, PROMPTS[:2], dynamics=dynamics, dtype=torch.float64)
    counts = search.new_counts(2, 10**6)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, *LATENT, generator=g, dtype=torch.float64)
    t, prompt = torch.full((2,), 0.6, dtype=torch.float64), torch.tensor([0, 1])
    ev = search.evaluate(problem, counts, x, t, prompt, grad=True)
    assert ev.grad.shape == x.shape
    scale = ev.grad.flatten(1).norm(dim=1)  # |grad| per row: the largest directional derivative
    assert torch.all(scale > 0)

    def central(v, h):  # (r(x + h v) - r(x - h v)) / 2h per row, (2,)
        plus, minus = (search.evaluate(problem, counts, x + s * h * v, t, prompt) for s in (1, -1))
        for ev_s in (plus, minus):  # no pixel near a clipping threshold
            decoded = (pipe.ae.decode(ev_s.x0_hat) + 1) / 2
            assert 0.1 <= decoded.min() and decoded.max() <= 0.9, (decoded.min(), decoded.max())
        return (plus.reward - minus.reward) / (2 * h)

    h = 0.02
    for _ in range(3):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        numeric = (4 * central(v, h / 2) - central(v, h)) / 3
        analytic = (ev.grad * v).flatten(1).sum(1)  # (2,)
        assert torch.all((numeric - analytic).abs() <= 2e-6 * scale), (numeric, analytic, scale)
    assert counts.backward_calls.tolist() == [1, 1] and counts.nfe.tolist() == [13, 13]


@pytest.mark.parametrize("method, nfe", [("dps", 4), ("svdd+dps", 20), ("rbf+dps", 24)])
def test_guided_search_end_to_end(clip_folder, head_file, method, nfe):
    # P = 2 prompts, 4 steps on VP-SDE, the aesthetic + CLIPScore reward through the autoencoder.
    _, folder = clip_folder
    pipe = tiny_pipe(2, torch.float32)
    reward = R.WeightedReward([R.get_reward("aesthetic", weights=head_file, clip=folder),
                               R.get_reward("clip-score", clip=folder)], [1.0, 0.05])
    problem = make_problem(pipe, reward, PROMPTS[:2], dynamics="vp-sde", num_steps=4)
    res = search.run(method, problem, nfe, generator=torch.Generator().manual_seed(0))
    assert res.nfe_used.max() <= nfe and res.nfe_used.min() >= nfe - 4, res.nfe_used  # spent, never exceeded
    # guided: every NFE is also a reward row and a backward pass
    assert torch.equal(res.backward_calls, res.nfe_used) and torch.equal(res.reward_calls, res.nfe_used)
    assert res.x0.shape == (2, *LATENT) and torch.isfinite(res.x0).all()
    with torch.no_grad():  # the reported reward is the reward of the returned sample
        again = problem.reward(res.x0, torch.tensor([0, 1]))
    assert max_diff(again, res.reward) <= 1e-4 * (1 + res.reward.abs().max().item())
    assert torch.all(res.reward >= res.particle_rewards.max(1).values - 1e-6)
    # the guidance moved the samples: the same search without gradients ends elsewhere
    unguided = search.run(method.replace("+dps", "") if method != "dps" else "none", problem, nfe,
                          generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(unguided.x0, res.x0)
    if method == "rbf+dps":  # and a search replays exactly from its seed
        replay = search.run(method, problem, nfe, generator=torch.Generator().manual_seed(0))
        assert torch.equal(replay.x0, res.x0)
