"""The text stack of model.py (T5 v1.1 encoder, CLIP text tower, both tokenizers, their loaders and
savers) against transformers, on CPU in float32 with tiny random models.

Parity goes through the files: a random transformers model is saved with `save_pretrained` and our
loader reads that folder; our saver's folder is read by transformers' `from_pretrained`. Norm
gains and biases are randomised so that a wrongly named or transposed tensor changes the output.
The CLIP tokenizer is checked on the real CLIP BPE vocabulary (rebuilt from the merges file that
open_clip ships), the T5 tokenizer on a SentencePiece model trained here.
"""

import gzip
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import (CLIP_CONFIGS, CLIP_EOS, T5_CONFIGS, CLIPText, CLIPTextConfig, T5Config, T5Encoder, clip_byte_alphabet, relative_position_bucket)
from checkpoints import (CheckpointError, load_clip_text, load_clip_tokenizer, load_t5, load_t5_tokenizer, save_clip_text, save_t5)
from train import (train_clip_bpe, train_t5_sentencepiece)
from tiny import clip_ids, max_diff, randomise_vectors

transformers = pytest.importorskip("transformers")

# Parity tolerance: float32 with different (but exact-math-equivalent) kernels: SDPA vs eager
# softmax(q k^T) v, fused vs separate norms. Observed differences are ~1e-6 for outputs of size ~1-5.
ATOL = 1e-5

# Small T5: max_distance 20 and lengths up to 45 reach every branch of the bucketing (exact,
# log-spaced, saturated) in both directions.
T5_TINY = dict(vocab_size=57, d_model=32, d_kv=6, d_ff=40, num_layers=3, num_heads=5,
               relative_attention_num_buckets=16, relative_attention_max_distance=20, layer_norm_epsilon=1e-6)
CLIP_TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=40, layer_norm_eps=1e-5)
SHAPES = [(1, 1), (1, 7), (3, 12), (2, 40)]  # (batch, tokens)

SHAPE_CORPUS = [f"{n} {c} {s} {rel} one {c2} {s2}"
                for n in ["one", "two", "three", "four"] for c in ["red", "green", "blue"]
                for s in ["circles", "squares", "stars"] for rel in ["and", "above", "left of"]
                for c2 in ["purple", "yellow"] for s2 in ["triangle", "circle"]]


# -----------------------------------------------------------------------------------------------
# T5


def hf_t5(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(**T5_TINY, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                use_cache=False)
    ref = transformers.T5EncoderModel(cfg).eval()
    randomise_vectors(ref, seed)
    with torch.no_grad():  # HF initialises the bias table near 0; make positions matter
        ref.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 1.0)
    return ref


def t5_ids(B: int, L: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def t5_reference(tmp_path_factory):
    ref = hf_t5()
    folder = tmp_path_factory.mktemp("flux") / "text_encoder_2"
    ref.save_pretrained(folder)
    return ref, folder


def assert_t5_matches(ours: T5Encoder, ref) -> None:
    for i, (B, L) in enumerate(SHAPES + [(2, 45)]):
        ids = t5_ids(B, L, T5_TINY["vocab_size"], seed=i)
        with torch.no_grad():
            got, expected = ours(ids), ref(input_ids=ids).last_hidden_state
        assert got.shape == (B, L, T5_TINY["d_model"])
        assert max_diff(got, expected) <= ATOL, (B, L)


def test_relative_position_bucket_matches_transformers():
    offsets = torch.arange(-300, 301)[None, :]
    for buckets, distance in [(32, 128), (16, 20), (8, 9), (4, 4)]:
        expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            offsets, bidirectional=True, num_buckets=buckets, max_distance=distance)
        got = relative_position_bucket(offsets, buckets, distance)
        assert torch.equal(got, expected), (buckets, distance)
        assert got.min() == 0 and got.max() == buckets - 1  # every bucket reachable, none beyond


@pytest.mark.parametrize("layout", ["component-folder", "repo-root"])
def test_t5_parity_with_transformers(t5_reference, layout):
    ref, folder = t5_reference
    ours = load_t5(folder if layout == "component-folder" else folder.parent)
    assert ours.cfg == T5Config(**T5_TINY)
    assert not any(p.is_meta for p in ours.parameters())
    assert_t5_matches(ours, ref)


@pytest.mark.parametrize("embedding_keys", [["encoder.embed_tokens.weight"],
                                            ["shared.weight", "encoder.embed_tokens.weight"]])
def test_t5_accepts_the_tied_embedding_under_either_name(t5_reference, tmp_path, embedding_keys):
    ref, folder = t5_reference
    state = load_file(folder / "model.safetensors")
    shared = state.pop("shared.weight")
    state |= {k: shared.clone() for k in embedding_keys}
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ours = load_t5(tmp_path)
    assert [n for n, _ in ours.named_parameters() if "shared" in n or "embed" in n] == ["shared.weight"]
    assert_t5_matches(ours, ref)


def test_t5_sharded_folder_and_dtype(tmp_path):
    ref = hf_t5(seed=1)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_t5_matches(load_t5(tmp_path), ref)
    bf16 = load_t5(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    ids = t5_ids(2, 9, T5_TINY["vocab_size"], seed=0)
    with torch.no_grad():
        # bf16 has 8 mantissa bits: relative error ~ 2^-8 per op; 3 blocks stay well under 0.1 * scale
        expected = ref(input_ids=ids).last_hidden_state
        assert max_diff(bf16(ids).float(), expected) <= 0.1 * expected.abs().max().item()


def test_save_t5_is_read_by_transformers(tmp_path):
    torch.manual_seed(0)
    ours = T5Encoder(T5Config(**T5_TINY)).eval()
    randomise_vectors(ours, seed=5)
    save_t5(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    ref = transformers.T5EncoderModel.from_pretrained(tmp_path).eval()
    assert_t5_matches(ours, ref)
    back = load_t5(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


# -----------------------------------------------------------------------------------------------
# CLIP


def hf_clip(seed: int = 0, eos_token_id: int = 2):
    """eos_token_id=2 is OpenAI's legacy config value (argmax pooling); vocab-1 selects transformers'
    "first eos" pooling, which must give the same vector since <|endoftext|> is the largest id."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(**CLIP_TINY, hidden_act="quick_gelu", eos_token_id=eos_token_id)
    ref = transformers.CLIPTextModel(cfg).eval()
    randomise_vectors(ref, seed)
    return ref


@pytest.fixture(scope="module")
def clip_reference(tmp_path_factory):
    ref = hf_clip()
    folder = tmp_path_factory.mktemp("flux") / "text_encoder"
    ref.save_pretrained(folder)
    return ref, folder


def assert_clip_matches(ours: CLIPText, ref) -> None:
    for i, (B, L) in enumerate(SHAPES):
        ids = clip_ids(B, L, CLIP_TINY["vocab_size"], seed=i)
        with torch.no_grad():
            hidden, pooled = ours(ids)
            out = ref(input_ids=ids)
        assert hidden.shape == (B, L, CLIP_TINY["hidden_size"]) and pooled.shape == (B, CLIP_TINY["hidden_size"])
        assert max_diff(hidden, out.last_hidden_state) <= ATOL, (B, L)
        assert max_diff(pooled, out.pooler_output) <= ATOL, (B, L)


@pytest.mark.parametrize("layout", ["transformers5-folder", "repo-root", "transformers4-prefixed-keys"])
def test_clip_parity_with_transformers(clip_reference, layout, tmp_path):
    ref, folder = clip_reference
    if layout == "transformers5-folder":
        assert not any(k.startswith("text_model.") for k in load_file(folder / "model.safetensors"))
        ours = load_clip_text(folder)
    elif layout == "repo-root":
        ours = load_clip_text(folder.parent)
    else:  # the FLUX.1 release / transformers 4 layout, with the old persistent position_ids buffer
        state = {f"text_model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
        state["text_model.embeddings.position_ids"] = torch.arange(CLIP_TINY["max_position_embeddings"])[None]
        save_file(state, tmp_path / "model.safetensors")
        (tmp_path / "config.json").write_text((folder / "config.json").read_text())
        ours = load_clip_text(tmp_path)
    assert ours.cfg == CLIPTextConfig(**CLIP_TINY)
    assert_clip_matches(ours, ref)


def test_clip_pooling_equals_first_eos_pooling():
    legacy, modern = hf_clip(seed=3, eos_token_id=2), hf_clip(seed=4, eos_token_id=CLIP_TINY["vocab_size"] - 1)
    modern.load_state_dict(legacy.state_dict())
    ours = CLIPText(CLIPTextConfig(**CLIP_TINY)).eval()
    ours.load_state_dict({f"text_model.{k}": v for k, v in legacy.state_dict().items()})
    assert_clip_matches(ours, modern)


def test_save_clip_text_is_read_by_transformers(tmp_path):
    torch.manual_seed(0)
    ours = CLIPText(CLIPTextConfig(**CLIP_TINY)).eval()
    randomise_vectors(ours, seed=6)
    save_clip_text(ours, tmp_path)
    assert all(k.startswith("text_model.") for k in load_file(tmp_path / "model.safetensors"))
    ref = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    assert_clip_matches(ours, ref)
    back = load_clip_text(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


def test_full_size_presets_have_the_release_parameter_counts():
    """T5-XXL and CLIP-L built on the meta device (no memory) have the parameter counts measured
    on transformers' models (flux.md section 2): same tensors at full size."""
    with torch.device("meta"):
        t5, clip = T5Encoder(T5_CONFIGS["t5-v1_1-xxl"]), CLIPText(CLIP_CONFIGS["clip-vit-large-patch14"])
    assert sum(p.numel() for p in t5.parameters()) == 4_762_310_656
    assert sum(p.numel() for p in clip.parameters()) == 123_060_480


# -----------------------------------------------------------------------------------------------
# Loader errors


def test_mismatched_clip_file_gives_one_error(clip_reference, tmp_path):
    _, folder = clip_reference
    state = load_file(folder / "model.safetensors")
    del state["encoder.layers.0.mlp.fc1.bias"]
    state["text_projection.weight"] = torch.zeros(4, 4)  # a CLIPTextModelWithProjection file
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"(?s)1 missing: text_model.encoder.layers.0.mlp.fc1.bias.*"
                                              r"1 unexpected: text_model.text_projection.weight"):
        load_clip_text(tmp_path)


def test_unknown_layouts_say_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match=r"expected a T5 encoder folder \(config.json \+ model.safetensors"
                                              r".*text_encoder_2/.*notes.txt"):
        load_t5(tmp_path)
    with pytest.raises(CheckpointError, match=r"expected a CLIP text encoder folder .*text_encoder/"):
        load_clip_text(tmp_path)
    with pytest.raises(CheckpointError, match=r"vocab.json \+ merges.txt.*tokenizer/"):
        load_clip_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match=r"spiece.model.*tokenizer_2/"):
        load_t5_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="no such folder"):
        load_t5(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"feed_forward_proj": "gated-gelu", **T5_TINY}))
    with pytest.raises(CheckpointError, match=r"expected model.safetensors or model.safetensors.index.json"):
        load_t5(tmp_path)


def test_unsupported_configs_are_refused(t5_reference, clip_reference, tmp_path):
    config = json.loads((t5_reference[1] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "relu"}))
    with pytest.raises(CheckpointError, match="only T5 v1.1's 'gated-gelu'"):
        load_t5(tmp_path)
    config = json.loads((clip_reference[1] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(CheckpointError, match="only OpenAI CLIP's 'quick_gelu'"):
        load_clip_text(tmp_path)
    del config["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing CLIPTextConfig fields \['num_hidden_layers'\]"):
        load_clip_text(tmp_path)


def test_bad_input_ids_are_refused():
    t5, clip = T5Encoder(T5Config(**T5_TINY)), CLIPText(CLIPTextConfig(**CLIP_TINY))
    with pytest.raises(ValueError, match=r"ids in \[0, 57\]"):
        t5(torch.tensor([[0, 57]]))
    with pytest.raises(ValueError, match=r"shape \(B, L\)"):
        t5(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="dtype long"):
        clip(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="40 positions; got 41 tokens"):
        clip(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(**{**CLIP_TINY, "num_attention_heads": 5})


# -----------------------------------------------------------------------------------------------
# Tokenizers

TRICKY_PROMPTS = [
    "a photo of a cat",
    "A PHOTO of a Cat!!",
    "  two\tred\n\ncircles  ",
    "it's the cat's 3rd birthday, isn't it? they'll've",
    "café naïve Ünïcödé ﬁ ＡＢＣ",
    "🐈 emoji 👍🏽 and 中文字符",
    "",
    "hello...world --- 1234567 $4.99",
    "<|endoftext|> inside <|startoftext|>",
]


@pytest.fixture(scope="module")
def real_clip_vocab(tmp_path_factory):
    """The real CLIP BPE vocabulary (49408 tokens) as vocab.json + merges.txt (flux.md section 5).

    open_clip's bpe_simple_vocab_16e6.txt.gz is OpenAI's merges file: a header line, then merges.
    CLIP uses the first 49152 - 256 - 2 = 48894 of them; the vocabulary is the 256 byte characters,
    the same with `</w>`, one token per merge, and the two specials.
    """
    spec = importlib.util.find_spec("open_clip")  # located, not imported (open_clip needs torchvision)
    if spec is None:
        pytest.skip("open-clip-torch is not installed (it ships CLIP's BPE merges)")
    lines = gzip.open(Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz", "rt",
                      encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    chars = list(clip_byte_alphabet().values())
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("flux") / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def test_clip_byte_alphabet_is_the_byte_level_alphabet():
    import tokenizers
    alphabet = clip_byte_alphabet()
    assert sorted(alphabet) == list(range(256))
    assert set(alphabet.values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert alphabet[ord("a")] == "a" and alphabet[ord(" ")] == "Ġ" and list(alphabet)[:2] == [ord("!"), ord('"')]


def test_clip_tokenizer_matches_transformers_on_the_real_vocabulary(real_clip_vocab):
    ours = load_clip_tokenizer(real_clip_vocab.parent)  # through the repository-root layout
    ref = transformers.CLIPTokenizer.from_pretrained(real_clip_vocab)
    assert ours.vocab_size == 49408 and (ours.bos_id, ours.eos_id) == (49406, 49407)
    got = ours(TRICKY_PROMPTS)
    expected = ref(TRICKY_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert got.dtype == torch.long and torch.equal(got, expected.input_ids)
    # The known ids of the real tokenizer (flux.md section 2), padded with <|endoftext|>.
    assert got[0].tolist() == [49406, 320, 1125, 539, 320, 2368] + [49407] * 71
    assert ours.tokenize("Red circles!") == ["red</w>", "circles</w>", "!</w>"]
    assert ours.decode(got[0, 1:6].tolist()) == "a photo of a cat"
    assert ours.decode(got[4, 1:-1].tolist()).startswith("café naïve ünïcödé")  # UTF-8 bytes reassembled


def test_clip_tokenizer_truncates_like_transformers_and_warns(real_clip_vocab):
    ref = transformers.CLIPTokenizer.from_pretrained(real_clip_vocab)
    long_prompt = " ".join(f"circle{i}" for i in range(60))  # > 120 tokens
    for max_length in (77, 10):
        ours = load_clip_tokenizer(real_clip_vocab, max_length=max_length)
        with pytest.warns(UserWarning, match=r"CLIP tokenizer: the prompt 'circle0 circle1 .*' has \d+ tokens but "
                                             rf"only {max_length - 2} fit .*dropped the end: '.*circle 5 9'"):
            got = ours(["a cat", long_prompt])
        expected = ref(["a cat", long_prompt], padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt").input_ids
        assert torch.equal(got, expected)
        assert got[1, -1] == 49407 and got[0, 4] == 49407  # the end token survives truncation; padding
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when everything fits
        ours(["a cat"])


@pytest.fixture(scope="module")
def trained_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    train_clip_bpe(SHAPE_CORPUS, 400, root / "tokenizer")
    train_t5_sentencepiece(SHAPE_CORPUS, 64, root / "tokenizer_2")
    return root


T5_PROMPTS = SHAPE_CORPUS[:5] + [
    "", "  three   red  circles  ", "Three RED circles", "zebra quokka", "a red circle, and two!",
    "ünïcödé ﬁ ＡＢＣ", "a\tb\nc", "</s> <pad> <unk>", "red</s>circle", "<s> is not special",
]


def test_t5_tokenizer_matches_transformers(trained_tokenizers):
    ours = load_t5_tokenizer(trained_tokenizers, max_length=20)
    ref = transformers.T5Tokenizer.from_pretrained(trained_tokenizers / "tokenizer_2")
    assert ours.vocab_size == len(ref)
    got = ours(T5_PROMPTS)
    expected = ref(T5_PROMPTS, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    assert got.dtype == torch.long and torch.equal(got, expected.input_ids)
    assert ours.tokenize("two red stars") == ["▁two", "▁red", "▁stars"]


def test_t5_tokenizer_truncates_like_transformers_and_warns(trained_tokenizers):
    ours = load_t5_tokenizer(trained_tokenizers, max_length=8)
    ref = transformers.T5Tokenizer.from_pretrained(trained_tokenizers / "tokenizer_2")
    long_prompt = SHAPE_CORPUS[0] + " and " + SHAPE_CORPUS[-1]
    with pytest.warns(UserWarning, match=rf"T5 tokenizer: the prompt '{long_prompt}' has \d+ tokens but only 7 "
                                         r"fit in max_length=8; dropped the end: '.*circle'"):
        got = ours(["red", long_prompt])
    expected = ref(["red", long_prompt], padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    assert torch.equal(got, expected.input_ids)
    assert got[1, -1] == 1 and got[0].tolist()[-1] == 0  # </s> kept; short rows padded with <pad> = 0


def test_trained_clip_bpe_round_trips_its_corpus(trained_tokenizers):
    folder = trained_tokenizers / "tokenizer"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    ids = sorted(vocab.values())
    assert ids == list(range(len(vocab))) and len(vocab) <= 400
    assert list(vocab)[:256] == list(clip_byte_alphabet().values())  # CLIP's layout: bytes first
    assert list(vocab)[-2:] == ["<|startoftext|>", CLIP_EOS]     # and the specials last (argmax pooling)
    ours = load_clip_tokenizer(trained_tokenizers)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    prompts = SHAPE_CORPUS[::7] + ["Two  RED stars!", "zebra", "fox"]
    got = ours(prompts)
    assert torch.equal(got, ref(prompts, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids)
    for prompt in SHAPE_CORPUS:
        row = ours([prompt])[0].tolist()
        content = row[1:row.index(ours.eos_id)]
        assert ours.decode(content) == prompt  # no unknown token (= <|endoftext|>) inside, exact text back
    # 400 = 256 bytes + word-end forms + merges + 2: room for whole words
    assert ours.tokenize("three red circles") == ["three</w>", "red</w>", "circles</w>"]
    # A character absent from the corpus has no `</w>` form, so cannot end a word (documented).
    assert "x" not in "".join(SHAPE_CORPUS) and ours.tokenize("fox")[-1] == CLIP_EOS


def test_trained_t5_sentencepiece_round_trips_its_corpus(trained_tokenizers):
    ours = load_t5_tokenizer(trained_tokenizers, max_length=32)
    sp = ours.sp
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert ours.vocab_size <= 64
    words = {w for prompt in SHAPE_CORPUS for w in prompt.split()}
    assert {f"▁{w}" for w in words} <= {sp.id_to_piece(i) for i in range(sp.get_piece_size())}  # whole words
    for prompt in SHAPE_CORPUS:
        ids = ours.encode(prompt)
        assert 2 not in ids and ours.decode(ids) == prompt
        assert len(ids) == len(prompt.split())


def test_trainers_are_deterministic_and_check_sizes(trained_tokenizers, tmp_path):
    train_clip_bpe(SHAPE_CORPUS, 400, tmp_path / "tokenizer")
    train_t5_sentencepiece(SHAPE_CORPUS, 64, tmp_path / "tokenizer_2")
    for name in ["tokenizer/vocab.json", "tokenizer/merges.txt"]:
        assert (tmp_path / name).read_bytes() == (trained_tokenizers / name).read_bytes(), name
    # spiece.model also records its training options, which include a temporary file name: compare
    # the model itself, pieces and scores.
    a, b = load_t5_tokenizer(tmp_path).sp, load_t5_tokenizer(trained_tokenizers).sp
    assert a.get_piece_size() == b.get_piece_size()
    assert all((a.id_to_piece(i), a.get_score(i)) == (b.id_to_piece(i), b.get_score(i))
               for i in range(a.get_piece_size()))
    with pytest.raises(ValueError, match=r"vocab_size 270 is too small: this corpus needs \d+ byte tokens"):
        train_clip_bpe(SHAPE_CORPUS, 270, tmp_path / "small")
    with pytest.raises(ValueError, match="must leave room"):
        load_clip_tokenizer(trained_tokenizers, max_length=1)
