"""The Flux MMDiT of model.py against diffusers' FluxTransformer2DModel, and its loaders.

Everything runs on CPU in float32 with tiny random models. Parity is checked through the files:
a random diffusers model is saved with `save_pretrained`, and our `load_flux` reads that folder
(and a BFL single file converted from it), so the BFL <-> diffusers table is tested too.
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints

import model
from model import (FLUX_CONFIGS, Flux, FluxParams, image_ids, pack, text_ids, timestep_embedding, unpack)
from checkpoints import (CheckpointError, flux_from_diffusers, load_flux, save_flux)

diffusers = pytest.importorskip("diffusers")

# A tiny diffusers config: 2 heads x 16 channels, 2 double + 2 single blocks.
TINY = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6))
SHAPES = [  # (latent height, latent width, text length, batch)
    (4, 6, 5, 1),
    (8, 4, 3, 3),
    (2, 2, 1, 3),
    (6, 8, 7, 1),
]


def random_diffusers(guidance: bool, seed: int = 0):
    """A diffusers Flux with every tensor random (norm gains and biases too, so a swapped name shows)."""
    torch.manual_seed(seed)
    ref = diffusers.FluxTransformer2DModel(**TINY, guidance_embeds=guidance).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn_like(p))
    return ref


def random_inputs(H, W, L_txt, B, in_channels=16, context=24, vec=20, guidance=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    C = in_channels // 4
    return dict(img=pack(torch.randn(B, C, H, W, generator=g)), img_ids=image_ids(B, H, W),
                txt=torch.randn(B, L_txt, context, generator=g), txt_ids=text_ids(B, L_txt),
                timesteps=torch.rand(B, generator=g), y=torch.randn(B, vec, generator=g),
                guidance=torch.full((B,), 3.5) if guidance else None)


def diffusers_forward(ref, x):
    """diffusers takes 2-D ids (L, 3) and the same t in [0, 1]."""
    return ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
               timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
               guidance=x["guidance"]).sample


@pytest.fixture(scope="module", params=[False, True], ids=["schnell-like", "dev-like"])
def saved_reference(request, tmp_path_factory):
    guidance = request.param
    ref = random_diffusers(guidance)
    folder = tmp_path_factory.mktemp("diffusers") / "transformer"
    ref.save_pretrained(folder)
    return ref, folder, guidance


def write_bfl_file(diffusers_folder: Path, path: Path, prefix: str = "") -> FluxParams:
    """Convert a diffusers folder to a BFL single file with our table (as BFL would ship it)."""
    params = checkpoints._flux_params_from_diffusers_config(json.loads((diffusers_folder / "config.json").read_text()),
                                                      diffusers_folder)
    state = flux_from_diffusers(load_file(diffusers_folder / "diffusion_pytorch_model.safetensors"), params)
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, path)
    return params


@pytest.mark.parametrize("layout", ["diffusers-folder", "repo-folder", "bfl-file", "comfy-prefixed-file"])
def test_parity_with_diffusers(saved_reference, layout, tmp_path):
    ref, folder, guidance = saved_reference
    if layout == "diffusers-folder":
        ours = load_flux(folder)
    elif layout == "repo-folder":
        ours = load_flux(folder.parent)  # the folder holding transformer/
    else:
        file = tmp_path / "flux1-tiny.safetensors"
        prefix = "model.diffusion_model." if layout == "comfy-prefixed-file" else ""
        params = write_bfl_file(folder, file, prefix)
        ours = load_flux(file, config=params)
        assert ours.params == params
    assert ours.params.guidance_embed == guidance
    for H, W, L_txt, B in SHAPES:
        x = random_inputs(H, W, L_txt, B, guidance=guidance)
        with torch.no_grad():
            expected = diffusers_forward(ref, x)
            got = ours(**x)
        assert got.shape == (B, H * W // 4, 16)
        assert (got - expected).abs().max().item() <= 1e-5, (H, W, L_txt, B)


def test_parity_with_sharded_diffusers_folder(tmp_path):
    ref = random_diffusers(guidance=False, seed=3)
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ours = load_flux(tmp_path)
    x = random_inputs(4, 4, 3, 2)
    with torch.no_grad():
        assert (ours(**x) - diffusers_forward(ref, x)).abs().max().item() <= 1e-5


def test_diffusers_named_single_file_needs_its_config(saved_reference, tmp_path):
    ref, folder, guidance = saved_reference
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    file.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="diffusers tensor names"):
        load_flux(file)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    x = random_inputs(4, 2, 3, 1, guidance=guidance)
    with torch.no_grad():
        assert (load_flux(file)(**x) - diffusers_forward(ref, x)).abs().max().item() <= 1e-5


def test_ids_may_have_batch_one():
    torch.manual_seed(0)
    net = Flux(FLUX_CONFIGS["tiny"]).eval()
    x = random_inputs(4, 6, 5, 3, in_channels=64, context=48, vec=32)
    with torch.no_grad():
        full = net(**x)
        shared = net(**{**x, "img_ids": x["img_ids"][:1], "txt_ids": x["txt_ids"][:1]})
    assert torch.equal(full, shared)


def test_save_flux_loads_in_diffusers_and_back(tmp_path):
    torch.manual_seed(0)
    params = replace(FLUX_CONFIGS["tiny"], guidance_embed=True, in_channels=12, out_channels=12)
    ours = Flux(params).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_flux(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]

    ref = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path).eval()
    x = random_inputs(4, 6, 5, 2, in_channels=12, context=48, vec=32, guidance=True)
    with torch.no_grad():
        assert (ours(**x) - diffusers_forward(ref, x)).abs().max().item() <= 1e-5

    back = load_flux(tmp_path)
    assert back.params == params
    theirs = back.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())


def test_save_flux_refuses_what_diffusers_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="mlp_ratio"):
        save_flux(Flux(replace(FLUX_CONFIGS["tiny"], mlp_ratio=2.0)), tmp_path)


def test_config_inferred_from_bfl_file_shapes(tmp_path):
    # Head dim 128 is FLUX.1's, so axes_dim (16, 56, 56) is implied and nothing else is needed.
    params = FluxParams(in_channels=8, out_channels=4, vec_in_dim=6, context_in_dim=10, hidden_size=128,
                        mlp_ratio=2.0, num_heads=1, depth=1, depth_single_blocks=2, axes_dim=(16, 56, 56),
                        theta=10_000, qkv_bias=False, guidance_embed=True)
    torch.manual_seed(0)
    save_file(Flux(params).state_dict(), tmp_path / "flux1-small.safetensors")
    assert load_flux(tmp_path / "flux1-small.safetensors").params == params
    assert load_flux(tmp_path).params == params  # a folder with one flux1-*.safetensors


def test_bfl_file_axes_dim_from_config_json_or_error(tmp_path):
    params = replace(FLUX_CONFIGS["tiny"], depth=1, depth_single_blocks=3)
    torch.manual_seed(0)
    file = tmp_path / "flux1-tiny.safetensors"
    save_file(Flux(params).state_dict(), file)
    with pytest.raises(CheckpointError, match="cannot infer the RoPE axes_dim for head dim 16"):
        load_flux(file)
    (tmp_path / "config.json").write_text(json.dumps({"axes_dim": [4, 6, 6]}))
    assert load_flux(file).params == params
    assert load_flux(file, config=params, dtype=torch.bfloat16).img_in.weight.dtype == torch.bfloat16


def test_bfloat16_forward_runs():
    net = Flux(FLUX_CONFIGS["tiny"]).to(torch.bfloat16).eval()
    x = random_inputs(4, 4, 3, 2, in_channels=64, context=48, vec=32)
    x = {k: v.bfloat16() if v is not None and k in ("img", "txt", "y") else v for k, v in x.items()}
    with torch.no_grad():
        out = net(**x)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()


# ---- helpers -------------------------------------------------------------------------------------

def test_pack_unpack_round_trip_and_layout():
    x = torch.randn(2, 3, 6, 8)
    tokens = pack(x)
    assert tokens.shape == (2, 3 * 4, 12)
    assert torch.equal(unpack(tokens, 6, 8), x)
    b, c, row, col, dy, dx = 1, 2, 1, 3, 1, 0
    assert tokens[b, row * 4 + col, c * 4 + dy * 2 + dx] == x[b, c, 2 * row + dy, 2 * col + dx]


def test_image_and_text_ids():
    ids = image_ids(2, 4, 6)
    assert ids.shape == (2, 6, 3)
    assert ids[0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    assert torch.equal(ids[0], ids[1])
    assert torch.equal(text_ids(3, 5), torch.zeros(3, 5, 3))


def test_timestep_embedding_values():
    t = torch.tensor([0.0, 0.5])
    emb = timestep_embedding(t, 4)  # frequencies exp(-ln(1e4) * k / 2) = 1, 0.01; angles 1000 t * freq
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0],
                             [math.cos(500), math.cos(5), math.sin(500), math.sin(5)]])
    assert torch.allclose(emb, expected, atol=1e-5)
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.rand(5)
    theirs = get_timestep_embedding(1000 * t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(timestep_embedding(t, 256), theirs, atol=1e-5)


def test_rope_angles_per_axis():
    ids = torch.tensor([[[0.0, 3.0, 5.0]]])
    angles = model.rope_angles(ids, (4, 6, 6), 10_000)  # (1, 1, 8): 2 + 3 + 3 columns
    expected = [0, 0] + [3 * 10_000 ** (-2 * j / 6) for j in range(3)] + [5 * 10_000 ** (-2 * j / 6) for j in range(3)]
    assert torch.allclose(angles[0, 0], torch.tensor(expected, dtype=torch.float64))


# ---- errors --------------------------------------------------------------------------------------

@pytest.fixture()
def tiny_file(tmp_path):
    torch.manual_seed(0)
    params = FLUX_CONFIGS["tiny"]
    return tmp_path / "flux1-tiny.safetensors", Flux(params).state_dict(), params


def test_diffusers_folder_with_wrong_config_is_named(saved_reference, tmp_path):
    _, folder, _ = saved_reference
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_head_dim": 8, "axes_dims_rope": [2, 2, 4]}))
    with pytest.raises(CheckpointError, match="does config.json match the weights"):
        load_flux(tmp_path)


def test_truncated_file(tiny_file):
    file, state, params = tiny_file
    save_file(state, file)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_flux(file, config=params)


def test_folder_without_weights(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError) as e:
        load_flux(tmp_path)
    for expected in ("config.json", "diffusion_pytorch_model.safetensors", "transformer/", "flux1-*.safetensors",
                     "notes.txt"):
        assert expected in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({"num_layers": 1}))
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors.index.json"):
        load_flux(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_flux(tmp_path / "nothing.safetensors")


def test_bad_params():
    with pytest.raises(ValueError, match="divisible"):
        replace(FLUX_CONFIGS["tiny"], num_heads=3)
    with pytest.raises(ValueError, match="axes_dim"):
        replace(FLUX_CONFIGS["tiny"], axes_dim=(4, 4, 4))
    with pytest.raises(ValueError, match="unknown Flux config"):
        load_flux("x", config="flux-pro")


@pytest.mark.parametrize("change, match", [
    (dict(img=torch.zeros(2, 6, 63)), "img must have shape"),
    (dict(img=torch.zeros(6, 64)), "img and txt must be"),
    (dict(txt=torch.zeros(2, 5, 47)), "txt must have shape"),
    (dict(img_ids=torch.zeros(2, 5, 3)), "img_ids must have shape"),
    (dict(txt_ids=torch.zeros(3, 5, 3)), "batch size 2 or 1"),
    (dict(timesteps=torch.zeros(())), "timesteps must have shape"),
    (dict(y=torch.zeros(2, 31)), "y must have shape"),
    (dict(guidance=torch.ones(2)), "no guidance embedder"),
])
def test_bad_forward_input(change, match):
    net = Flux(FLUX_CONFIGS["tiny"])
    x = {**random_inputs(4, 6, 5, 2, in_channels=64, context=48, vec=32), **change}
    with pytest.raises(ValueError, match=match):
        net(**x)


def test_guidance_required_for_guidance_model():
    net = Flux(replace(FLUX_CONFIGS["tiny"], guidance_embed=True))
    with pytest.raises(ValueError, match="pass guidance"):
        net(**random_inputs(4, 6, 5, 2, in_channels=64, context=48, vec=32))


def test_pack_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        pack(torch.zeros(1, 4, 5, 6))
    with pytest.raises(ValueError, match="unpack expects"):
        unpack(torch.zeros(1, 6, 16), 4, 4)
