"""The CLIP vision tower, the full CLIP model and CLIP's image preprocessing (model.py) against
transformers, on CPU in float32 with tiny random models.

Parity goes through the files, as in test_model_text.py: a random transformers model is saved with
`save_pretrained` and our loader reads that folder. Norm gains, biases and the class embedding are
randomised so that a wrongly named, transposed or skipped tensor changes the output. The real
ViT-L/14 layout is checked on the meta device (names and shapes only, no weights exist offline).
"""

import dataclasses
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import (CLIP, CLIP_IMAGE_STD, CLIP_VISION_CONFIGS, CLIPVision, CLIPVisionConfig, clip_preprocess)
from checkpoints import (CheckpointError, clip_from_transformers, load_clip, load_clip_vision)
from tiny import clip_ids, max_diff, randomise_vectors

transformers = pytest.importorskip("transformers")

# Parity tolerance: float32, the same math in possibly different kernels (SDPA vs eager softmax).
# Observed differences are 0 to ~1e-6 for outputs of size ~1-5.
ATOL = 1e-5

# 32 x 32 images in 8 px patches: 16 patches + the class token. projection_dim 12 != hidden sizes,
# so a transposed projection cannot go unnoticed.
VISION_TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_channels=3, image_size=32, patch_size=8, layer_norm_eps=1e-5)
TEXT_TINY = dict(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=20, layer_norm_eps=1e-5)
PROJECTION = 12


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def hf_vision(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(**VISION_TINY, projection_dim=PROJECTION, hidden_act="quick_gelu")
    ref = transformers.CLIPVisionModelWithProjection(cfg).eval()
    randomise_vectors(ref, seed)
    return ref


def hf_clip_model(seed: int = 0, eos_token_id: int = 2):
    """eos_token_id=2 is OpenAI's legacy value (transformers pools at argmax(ids)); vocab - 1 selects
    transformers' "first eos" pooling, the same vector since <|endoftext|> is the largest id."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(text_config=TEXT_TINY | {"eos_token_id": eos_token_id, "bos_token_id": 0},
                                  vision_config=VISION_TINY, projection_dim=PROJECTION)
    ref = transformers.CLIPModel(cfg).eval()
    randomise_vectors(ref, seed)
    with torch.no_grad():
        ref.logit_scale.fill_(4.6052)  # ln 100, the trained value (the init is 2.6592)
    return ref


def save_quietly(model, folder, **kw) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, **kw)


def pixels(B: int, seed: int, size: int = 32) -> torch.Tensor:
    """Normalised pixel values as clip_preprocess makes them, roughly N(0, 1)."""
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


def features(out) -> torch.Tensor:
    """get_image_features / get_text_features return a tensor in transformers 4, an output object in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def vision_reference(tmp_path_factory):
    ref = hf_vision()
    folder = tmp_path_factory.mktemp("clip-vision")
    save_quietly(ref, folder)
    return ref, folder


@pytest.fixture(scope="module")
def clip_reference(tmp_path_factory):
    ref = hf_clip_model()
    folder = tmp_path_factory.mktemp("clip")
    save_quietly(ref, folder)
    return ref, folder


def assert_vision_matches(ours: CLIPVision, ref) -> None:
    """last_hidden_state, the pooled class token and image_embeds, for batches of 1 and 3."""
    for B, seed in [(1, 0), (3, 1)]:
        x = pixels(B, seed)
        with torch.no_grad():
            got = ours(x)
            vision = ref.vision_model(pixel_values=x)  # pooler_output = post_layernorm(class token)
            if isinstance(ref, transformers.CLIPVisionModelWithProjection):
                embeds = ref(pixel_values=x).image_embeds
            else:  # a CLIPModel
                embeds = features(ref.get_image_features(pixel_values=x))
        assert got.last_hidden_state.shape == (B, 17, VISION_TINY["hidden_size"])
        assert got.image_embeds.shape == (B, PROJECTION)
        assert max_diff(got.last_hidden_state, vision.last_hidden_state) <= ATOL
        assert max_diff(got.pooled, vision.pooler_output) <= ATOL
        assert max_diff(got.image_embeds, embeds) <= ATOL


# -----------------------------------------------------------------------------------------------
# The vision tower


def test_vision_parity_with_transformers(vision_reference):
    ref, folder = vision_reference
    ours = load_clip_vision(folder)
    assert ours.cfg == CLIPVisionConfig(**VISION_TINY, projection_dim=PROJECTION)
    assert not any(p.is_meta for p in ours.parameters())
    assert_vision_matches(ours, ref)


def test_vision_from_a_full_clip_folder(clip_reference):
    ref, folder = clip_reference
    ours = load_clip_vision(folder)  # the text tensors of the file are set aside
    assert ours.cfg.projection_dim == PROJECTION  # the top-level projection_dim, not vision_config's default 512
    assert_vision_matches(ours, ref)


def test_vision_sharded_folder_old_buffer_and_dtype(tmp_path):
    ref = hf_vision(seed=1)
    save_quietly(ref, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_vision_matches(load_clip_vision(tmp_path), ref)
    # transformers 4.x before 4.31 stored the position_ids buffer; it is accepted and ignored
    flat = tmp_path / "flat"
    flat.mkdir()
    state = {k: v for shard in sorted(tmp_path.glob("model-*.safetensors")) for k, v in load_file(shard).items()}
    save_file(state | {"vision_model.embeddings.position_ids": torch.arange(17)[None]}, flat / "model.safetensors")
    (flat / "config.json").write_text((tmp_path / "config.json").read_text())
    assert_vision_matches(load_clip_vision(flat), ref)
    bf16 = load_clip_vision(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        # bf16 has 8 mantissa bits: relative error ~ 2^-8 per op; 2 layers stay well under 0.1 * scale
        expected = ref(pixel_values=pixels(2, 3)).image_embeds
        assert max_diff(bf16(pixels(2, 3)).image_embeds.float(), expected) <= 0.1 * expected.abs().max().item()


def test_vision_loading_is_strict(vision_reference, tmp_path):
    ref, folder = vision_reference
    state = load_file(folder / "model.safetensors")
    config = (folder / "config.json").read_text()

    def folder_with(name, tensors, cfg=config):
        out = tmp_path / name
        out.mkdir()
        save_file(tensors, out / "model.safetensors")
        (out / "config.json").write_text(cfg)
        return out

    missing = {k: v for k, v in state.items() if k != "vision_model.post_layernorm.bias"}
    with pytest.raises(CheckpointError, match="missing: vision_model.post_layernorm.bias"):
        load_clip_vision(folder_with("missing", missing))
    with pytest.raises(CheckpointError, match="unexpected: vision_model.extra"):
        load_clip_vision(folder_with("extra", state | {"vision_model.extra": torch.zeros(2)}))
    gelu = json.dumps(json.loads(config) | {"hidden_act": "gelu"})
    with pytest.raises(CheckpointError, match="quick_gelu"):
        load_clip_vision(folder_with("gelu", state, gelu))
    wrong_patch = json.dumps(json.loads(config) | {"patch_size": 4, "image_size": 32})
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_clip_vision(folder_with("patch", state, wrong_patch))
    with pytest.raises(CheckpointError, match="model_type"):
        load_clip_vision(folder_with("t5", state, json.dumps({"model_type": "t5"})))
    with pytest.raises(CheckpointError, match="config.json"):
        load_clip_vision(tmp_path / "nowhere")


def test_vision_rejects_bad_input(vision_reference):
    ours = load_clip_vision(vision_reference[1])
    with pytest.raises(ValueError, match=r"shape \(\*, 3, 32, 32\)"):
        ours(torch.zeros(1, 3, 64, 64))  # positions exist for the trained size only: preprocess first
    with pytest.raises(ValueError, match="divisible by patch_size"):
        CLIPVisionConfig(**VISION_TINY | {"patch_size": 5}, projection_dim=4)


@pytest.mark.parametrize("name", ["clip-vit-large-patch14", "tiny"])
def test_presets_have_the_transformers_layout(name):
    # Names and shapes of every tensor of the real ViT-L/14 (303 M parameters), on the meta device.
    cfg = CLIP_VISION_CONFIGS[name]
    with torch.device("meta"):
        ours = CLIPVision(cfg)
        ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**dataclasses.asdict(cfg)))
    assert shapes(ours) == shapes(ref)
    if name == "clip-vit-large-patch14":
        assert cfg.num_positions == 257
        assert sum(p.numel() for p in ours.parameters()) == 303_966_208  # 303,179,776 tower + 1024 x 768 projection


# -----------------------------------------------------------------------------------------------
# The full CLIP model (both towers, both projections)


@pytest.mark.parametrize("eos_token_id", [2, TEXT_TINY["vocab_size"] - 1])
def test_full_clip_parity_with_transformers(tmp_path, eos_token_id):
    ref = hf_clip_model(seed=3, eos_token_id=eos_token_id)
    save_quietly(ref, tmp_path)
    ours = load_clip(tmp_path)
    assert isinstance(ours, CLIP) and not any(p.is_meta for p in ours.parameters())
    x, ids = pixels(3, 7), clip_ids(3, TEXT_TINY["max_position_embeddings"], TEXT_TINY["vocab_size"], seed=7)
    with torch.no_grad():
        image, text = ours.image_embeds(x), ours.text_embeds(ids)
        out = ref(input_ids=ids, pixel_values=x)
        assert max_diff(image, features(ref.get_image_features(pixel_values=x))) <= ATOL
        assert max_diff(text, features(ref.get_text_features(input_ids=ids))) <= ATOL
    assert image.shape == text.shape == (3, PROJECTION)
    # CLIP's logits: exp(logit_scale) * cosine of every image with every text
    cos = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T  # (3, 3)
    assert ours.logit_scale.item() == pytest.approx(4.6052)
    # logits are ~100 x the cosines, so their float32 error is ~100 x larger
    assert max_diff(ours.logit_scale.exp() * cos, out.logits_per_image) <= 100 * ATOL


def test_full_clip_loading_is_strict(clip_reference, vision_reference, tmp_path):
    ref, folder = clip_reference
    state = load_file(folder / "model.safetensors")
    ours = load_clip(folder)
    assert set(clip_from_transformers(dict(state))) == set(ours.state_dict())  # the remap covers every key
    assert_vision_matches(ours.vision, ref)
    with pytest.raises(CheckpointError, match="not a full CLIPModel"):
        load_clip(vision_reference[1])  # a vision-only folder has no text tower
    out = tmp_path / "no-projection"
    out.mkdir()
    save_file({k: v for k, v in state.items() if k != "text_projection.weight"}, out / "model.safetensors")
    (out / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="missing: text_projection.weight"):
        load_clip(out)
    # a CLIPModel file with an unknown tensor is not silently accepted by the vision loader either
    save_file(state | {"vision_model.extra": torch.zeros(1)}, out / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected: vision_model.extra"):
        load_clip_vision(out)


# -----------------------------------------------------------------------------------------------
# Preprocessing: the same numbers as transformers' PIL-based CLIPImageProcessor, but differentiable

# The processor works on 8-bit PIL images and rounds after each 1-D pass: <= 0.5 / 255 after the
# first, carried into the second by a bicubic kernel whose absolute weights sum to <= 1.25, plus
# <= 0.5 / 255 after the second, so <= 1.125 / 255 per pixel (measured max 1.09 / 255). Divided by
# the smallest channel std this is the bound on the normalised values; 1.2 / 255 leaves room for
# PIL's fixed-point filter coefficients.
PREPROCESS_ATOL = 1.2 / 255 / min(CLIP_IMAGE_STD)


def processor(size: int):
    """transformers' PIL-based CLIP processor (the default in 4.x; 5.x defaults to a torchvision one
    when torchvision is installed and keeps the PIL one as CLIPImageProcessorPil)."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:
        Processor = transformers.CLIPImageProcessor
    return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@pytest.mark.parametrize("H, W, size", [
    (32, 32, 224),     # the embedded model's images: 7x upsampling
    (1024, 768, 224),  # a FLUX.1 image: antialiased downsampling, portrait, centre crop of the height
    (300, 400, 224),   # landscape, centre crop of the width
    (230, 225, 224),   # nearly the size: int() rounding of the long side, odd crop offsets
    (224, 224, 224),   # no resize at all
    (40, 20, 32),      # the tiny tower's size
])
def test_preprocess_matches_the_transformers_processor(H, W, size):
    # Uniform noise in 0..255 is the worst case: every pixel is an edge, bicubic overshoots everywhere.
    image = torch.randint(0, 256, (3, H, W), generator=torch.Generator().manual_seed(H * W), dtype=torch.uint8)
    expected = torch.from_numpy(processor(size)(images=[image.numpy()], return_tensors="np")["pixel_values"])
    got = clip_preprocess(image[None].double() / 255, size).float()
    assert got.shape == expected.shape == (1, 3, size, size)
    assert max_diff(got, expected) <= PREPROCESS_ATOL


def test_preprocess_is_differentiable_and_checks_input():
    # Pixels in [0.25, 0.75]: a bicubic pass overshoots by at most 0.125 of the range, so no value
    # reaches the clipping at 0 or 1 and the map is linear; float64 central differences.
    g = torch.Generator().manual_seed(0)
    images = (0.25 + 0.5 * torch.rand(2, 3, 9, 13, dtype=torch.float64, generator=g)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: clip_preprocess(x, 6), (images,), eps=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        clip_preprocess(torch.zeros(3, 8, 8))
