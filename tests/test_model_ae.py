"""The FLUX autoencoder of model.py against diffusers' AutoencoderKL, and its loaders.

Everything runs on CPU in float32 with tiny random models. Parity is checked through the files:
a random diffusers model is saved with `save_pretrained`, and our `load_autoencoder` reads that
folder (and a BFL `ae.safetensors` converted from it with our table), so the BFL <-> diffusers
table is tested too. The FLUX.1 preset itself is only built on the meta device (no weights here).
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import (AE_CONFIGS, AutoEncoder, AutoEncoderParams)
from checkpoints import (CheckpointError, ae_diffusers_table, ae_from_diffusers, load_autoencoder, save_autoencoder)

diffusers = pytest.importorskip("diffusers")

# Tiny diffusers configs. "two-level" has norm_num_groups 16 and 2 ResnetBlocks per level;
# "three-level" has 8 groups, FLUX's 16 latent channels and other scale/shift values, and three
# levels: its two 32-channel decoder levels have identical shapes, so only the values show whether
# the decoder's level index is reversed correctly.
CONFIGS = {
    "two-level": dict(block_out_channels=[32, 64], norm_num_groups=16, latent_channels=4, layers_per_block=2,
                      scaling_factor=0.3611, shift_factor=0.1159),
    "three-level": dict(block_out_channels=[16, 32, 32], norm_num_groups=8, latent_channels=16, layers_per_block=1,
                        scaling_factor=0.7, shift_factor=-0.25),
    # 32 groups = what a BFL file implies when no config says otherwise.
    "flux-groups": dict(block_out_channels=[32, 64], norm_num_groups=32, latent_channels=4, layers_per_block=1,
                        scaling_factor=0.3611, shift_factor=0.1159),
}
IMAGE_SIZES = [(1, 16, 24), (2, 8, 16)]  # (B, H, W): non-square so a swapped H and W shows


def random_diffusers(name: str, seed: int = 0):
    """A diffusers AutoencoderKL with every tensor random (norm gains and biases too, so a swapped name shows)."""
    config = CONFIGS[name]
    n = len(config["block_out_channels"])
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                                  up_block_types=["UpDecoderBlock2D"] * n, act_fn="silu", sample_size=32,
                                  use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
                                  **config).eval()
    with torch.no_grad():
        for param_name, p in ref.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in param_name else 0.0) + 0.3 * torch.randn_like(p))
    return ref


def assert_parity(ours: AutoEncoder, ref, seed: int = 1) -> None:
    """encode vs scale * (latent_dist.mean - shift), decode vs ref.decode(z / scale + shift): <= 1e-5."""
    scale, shift = ref.config.scaling_factor, ref.config.shift_factor
    assert (ours.params.scale_factor, ours.params.shift_factor) == (scale, shift)
    f = 2 ** (len(ref.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(seed)
    for B, H, W in IMAGE_SIZES:
        x = 2 * torch.rand(B, 3, H, W, generator=g) - 1
        z = torch.randn(B, ref.config.latent_channels, H // f, W // f, generator=g)
        with torch.no_grad():
            expected_z = scale * (ref.encode(x).latent_dist.mean - shift)
            expected_x = ref.decode(z / scale + shift).sample
            got_z, got_x = ours.encode(x), ours.decode(z)
        assert got_z.shape == expected_z.shape == (B, ref.config.latent_channels, H // f, W // f)
        assert got_x.shape == expected_x.shape == (B, 3, H, W)
        assert (got_z - expected_z).abs().max().item() <= 1e-5, (B, H, W)
        assert (got_x - expected_x).abs().max().item() <= 1e-5, (B, H, W)


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved_reference(request, tmp_path_factory):
    ref = random_diffusers(request.param)
    folder = tmp_path_factory.mktemp("repo") / "vae"
    ref.save_pretrained(folder)
    return ref, folder, request.param


def write_bfl_file(diffusers_folder: Path, path: Path) -> AutoEncoderParams:
    """Convert a diffusers vae folder to a BFL ae.safetensors with our table (as BFL would ship it)."""
    params = load_autoencoder(diffusers_folder).params
    state = ae_from_diffusers(load_file(diffusers_folder / "diffusion_pytorch_model.safetensors"), params)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return params


@pytest.mark.parametrize("layout", ["diffusers-folder", "repo-folder", "bfl-file+config", "bfl-file+config.json"])
def test_parity_with_diffusers(saved_reference, layout, tmp_path):
    ref, folder, _ = saved_reference
    if layout == "diffusers-folder":
        ours = load_autoencoder(folder)
    elif layout == "repo-folder":
        ours = load_autoencoder(folder.parent)  # the folder holding vae/
    else:
        file = tmp_path / "ae.safetensors"
        params = write_bfl_file(folder, file)
        assert not any(k.startswith(("encoder.down_blocks", "decoder.up_blocks")) for k in load_file(file))
        if layout == "bfl-file+config":
            ours = load_autoencoder(file, config=params)
        else:  # a diffusers config.json beside the BFL file
            (tmp_path / "config.json").write_text((folder / "config.json").read_text())
            ours = load_autoencoder(file)
        assert ours.params == params
    assert_parity(ours, ref)


def test_parity_with_config_inferred_from_bfl_file(tmp_path):
    """Nothing but ae.safetensors in a repository folder: widths and depths come from the shapes,
    groups, scale and shift are FLUX.1's (the "flux-groups" reference has those)."""
    ref = random_diffusers("flux-groups", seed=2)
    ref.save_pretrained(tmp_path / "diffusers")
    params = write_bfl_file(tmp_path / "diffusers", tmp_path / "repo" / "ae.safetensors")
    ours = load_autoencoder(tmp_path / "repo")
    assert ours.params == replace(params, resolution=AE_CONFIGS["flux"].resolution)
    assert_parity(ours, ref)

    # With a group count FLUX does not have, the inferred 32 groups cannot be built: a loud error.
    ref = random_diffusers("three-level")
    ref.save_pretrained(tmp_path / "diffusers-8-groups")
    write_bfl_file(tmp_path / "diffusers-8-groups", tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="divisible by num_groups 32"):
        load_autoencoder(tmp_path / "ae.safetensors")


def test_sharded_diffusers_folder(tmp_path):
    ref = random_diffusers("two-level", seed=3)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert_parity(load_autoencoder(tmp_path), ref)


def test_diffusers_named_single_file_needs_its_config(saved_reference, tmp_path):
    ref, folder, _ = saved_reference
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    file.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="diffusers tensor names"):
        load_autoencoder(file)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    assert_parity(load_autoencoder(file), ref)


def test_save_autoencoder_loads_in_diffusers_and_back(tmp_path):
    torch.manual_seed(0)
    params = replace(AE_CONFIGS["tiny"], ch_mult=(1, 2, 2), z_channels=6, scale_factor=0.5, shift_factor=0.3)
    ours = AutoEncoder(params).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_autoencoder(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]

    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    assert_parity(ours, ref)

    back = load_autoencoder(tmp_path)
    assert back.params == params
    theirs = back.state_dict()
    assert theirs.keys() == ours.state_dict().keys()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())


def test_save_autoencoder_refuses_what_diffusers_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="ch_mult must start with 1"):
        save_autoencoder(AutoEncoder(replace(AE_CONFIGS["tiny"], ch_mult=(2, 2))), tmp_path)


def test_dtype_and_device_arguments(saved_reference):
    _, folder, _ = saved_reference
    ours = load_autoencoder(folder, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        x = ours.decode(torch.randn(1, ours.params.z_channels, 4, 4, dtype=torch.bfloat16))
    assert x.dtype == torch.bfloat16 and x.isfinite().all()


# ---- the real FLUX.1 preset (meta device) --------------------------------------------------------

def flux_diffusers_on_meta():
    c = AE_CONFIGS["flux"]
    with torch.device("meta"):
        return diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
            latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=c.scale_factor,
            shift_factor=c.shift_factor, use_quant_conv=False, use_post_quant_conv=False,
            mid_block_add_attention=True)


def test_flux_preset_parameter_counts():
    with torch.device("meta"):
        ours = AutoEncoder(AE_CONFIGS["flux"])
    ref = flux_diffusers_on_meta()

    def count(module):
        return sum(p.numel() for p in module.parameters())

    # Exact counts measured from diffusers' AutoencoderKL in the FLUX.1 config (the same model on meta).
    assert (count(ours), count(ours.encoder), count(ours.decoder)) == (83_819_683, 34_274_208, 49_545_475)
    assert (count(ours), count(ours.encoder), count(ours.decoder)) == (count(ref), count(ref.encoder),
                                                                       count(ref.decoder))
    # flux.md gives them to 0.1 M: 83.8 M total, encoder 34.3 M, decoder 49.5 M; 244 tensors.
    assert [round(n / 1e6, 1) for n in (count(ours), count(ours.encoder), count(ours.decoder))] == [83.8, 34.3, 49.5]
    assert len(ours.state_dict()) == len(ref.state_dict()) == 244


def test_flux_preset_table_covers_every_diffusers_tensor():
    """The table maps the FLUX.1 preset's 244 BFL tensors one-to-one onto diffusers' 244, shapes included."""
    params = AE_CONFIGS["flux"]
    with torch.device("meta"):
        ours = AutoEncoder(params).state_dict()
    theirs = flux_diffusers_on_meta().state_dict()
    table = ae_diffusers_table(params)
    mapped = {}
    for key, t in ours.items():
        module, leaf = key.rsplit(".", 1)
        mapped[f"{table[module]}.{leaf}"] = t.shape
    assert mapped.keys() == theirs.keys()
    for name, shape in mapped.items():
        their_shape = theirs[name].shape
        assert shape == their_shape or (len(shape) == 4 and shape[2:] == (1, 1) and shape[:2] == their_shape), name
    assert table["decoder.up.3.block.0.norm1"] == "decoder.up_blocks.0.resnets.0.norm1"  # flux.md sec. 2
    assert table["decoder.up.1.upsample.conv"] == "decoder.up_blocks.2.upsamplers.0.conv"


# ---- encode / decode -----------------------------------------------------------------------------

def test_decode_is_differentiable():
    """DPS backpropagates a pixel reward through decode: check its Jacobian by finite differences (float64)."""
    torch.manual_seed(0)
    net = AutoEncoder(AE_CONFIGS["tiny"]).double().eval()
    z = torch.randn(1, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(net.decode, (z,), eps=1e-6, atol=1e-6, rtol=1e-4)
    net.decode(z).square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_encode_with_generator_samples_the_posterior():
    torch.manual_seed(0)
    net = AutoEncoder(AE_CONFIGS["tiny"]).eval()
    p = net.params
    x = 2 * torch.rand(2, 3, 8, 8) - 1
    with torch.no_grad():
        mean, logvar = net.encoder(x).chunk(2, dim=1)
        z_mean = net.encode(x)
        z_a = net.encode(x, generator=torch.Generator().manual_seed(7))
        z_b = net.encode(x, generator=torch.Generator().manual_seed(7))
        z_c = net.encode(x, generator=torch.Generator().manual_seed(8))
    assert torch.allclose(z_mean, p.scale_factor * (mean - p.shift_factor))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(z_a, p.scale_factor * (mean + torch.exp(0.5 * logvar) * eps - p.shift_factor), atol=1e-6)
    assert torch.equal(z_a, z_b) and not torch.equal(z_a, z_c)


@pytest.mark.parametrize("method, shape, match", [
    ("encode", (1, 3, 9, 8), "multiples of 2"),
    ("encode", (1, 4, 8, 8), r"images \(B, 3, H, W\)"),
    ("encode", (3, 8, 8), "encode expects"),
    ("decode", (1, 3, 4, 4), r"latents \(B, 4, h, w\)"),
    ("decode", (4, 4, 4), "decode expects"),
])
def test_bad_encode_decode_input(method, shape, match):
    net = AutoEncoder(AE_CONFIGS["tiny"])
    with pytest.raises(ValueError, match=match):
        getattr(net, method)(torch.zeros(shape))


def test_bad_params():
    with pytest.raises(ValueError, match="divisible by num_groups 32"):
        replace(AE_CONFIGS["tiny"], num_groups=32)
    with pytest.raises(ValueError, match="must be positive"):
        replace(AE_CONFIGS["tiny"], ch_mult=(1, 0))
    with pytest.raises(ValueError, match="scale_factor"):
        replace(AE_CONFIGS["tiny"], scale_factor=0.0)
    with pytest.raises(ValueError, match="unknown autoencoder config"):
        load_autoencoder("x", config="sdxl")
    assert AE_CONFIGS["flux"].downsample == 8 and AE_CONFIGS["tiny"].downsample == 2


# ---- errors --------------------------------------------------------------------------------------

def test_diffusers_folder_with_wrong_config_is_named(saved_reference, tmp_path):
    _, folder, _ = saved_reference
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "latent_channels": 2}))
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(tmp_path)
    assert str(tmp_path) in str(e.value)
    assert "decoder.conv_in.weight: file" in str(e.value)


def test_diffusers_tensors_the_table_does_not_know_are_unexpected(saved_reference, tmp_path):
    _, folder, _ = saved_reference
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    state["decoder.mid_block.attentions.0.query.weight"] = state.pop("decoder.mid_block.attentions.0.to_q.weight")
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(tmp_path)
    assert "missing: decoder.mid.attn_1.q.weight" in str(e.value)
    assert "unexpected: decoder.mid_block.attentions.0.query.weight" in str(e.value)


@pytest.mark.parametrize("change, match", [
    (dict(use_quant_conv=True), "use_quant_conv = True"),
    (dict(mid_block_add_attention=False), "mid_block_add_attention = False"),
    (dict(act_fn="relu"), "act_fn = 'relu'"),
    (dict(block_out_channels=[32, 48]), "not multiples of the first"),
    (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]), "down_block_types"),
    (dict(some_new_field=1), r"unknown fields \['some_new_field'\]"),
])
def test_unsupported_diffusers_config(saved_reference, tmp_path, change, match):
    _, folder, _ = saved_reference
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=match) as e:
        load_autoencoder(tmp_path)
    assert "not a FLUX-style AutoencoderKL config" in str(e.value)


def test_stable_diffusion_style_vae_is_refused(tmp_path):
    """diffusers' defaults (quant convs, SD scaling) are not FLUX's autoencoder."""
    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=[32], norm_num_groups=8, latent_channels=4).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="use_quant_conv = True"):
        load_autoencoder(tmp_path)


def test_folder_without_weights(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(tmp_path)
    for expected in ("config.json", "diffusion_pytorch_model.safetensors", "vae/", "ae.safetensors", "notes.txt"):
        assert expected in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors.index.json"):
        load_autoencoder(tmp_path, config="tiny")
    with pytest.raises(CheckpointError, match="not found"):
        load_autoencoder(tmp_path / "nothing.safetensors")


def test_bfl_file_that_is_not_an_autoencoder(tmp_path):
    save_file({"img_in.weight": torch.zeros(4, 4)}, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="no tensor encoder.conv_in.weight"):
        load_autoencoder(tmp_path / "ae.safetensors")
