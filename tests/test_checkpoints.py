"""checkpoints.py's one error for a file that does not fit its model: the file's path and every
missing, unexpected and wrong-shape tensor, for each loader that reads a state dict (the FLUX
transformer, the autoencoder, the T5 encoder). The release-specific cases (diffusers folders, CLIP
with a projection head, truncated files) stay with their model's tests."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints as C
import model as M
from test_model_text import T5_TINY


def flux_file(tmp_path: Path) -> tuple[dict, Path, object]:
    params = M.FLUX_CONFIGS["tiny"]
    file = tmp_path / "flux1-tiny.safetensors"
    return M.Flux(params).state_dict(), file, lambda: C.load_flux(file, config=params)


def ae_file(tmp_path: Path) -> tuple[dict, Path, object]:
    params = M.AE_CONFIGS["tiny"]
    file = tmp_path / "ae.safetensors"
    return M.AutoEncoder(params).state_dict(), file, lambda: C.load_autoencoder(file, config=params)


def t5_folder(tmp_path: Path) -> tuple[dict, Path, object]:
    C.save_t5(M.T5Encoder(M.T5Config(**T5_TINY)), tmp_path)  # config.json + model.safetensors
    file = tmp_path / "model.safetensors"
    return load_file(file), file, lambda: C.load_t5(tmp_path)


# (how to make it, the tensor to drop, a name the model does not have, the tensor to give a wrong shape)
CASES = {
    "flux": (flux_file, "double_blocks.1.txt_attn.proj.bias", "single_blocks.7.linear1.weight",
             "final_layer.linear.weight"),
    "autoencoder": (ae_file, "decoder.up.0.block.0.nin_shortcut.bias",
                    "decoder.up.0.upsample.conv.weight",  # level 0 has no upsample
                    "encoder.conv_out.weight"),
    "t5": (t5_folder, "encoder.block.1.layer.1.DenseReluDense.wo.weight",
           "encoder.block.1.layer.1.DenseReluDense.wi.weight",  # T5 v1.1 is gated: wi_0 and wi_1
           "encoder.final_layer_norm.weight"),
}


@pytest.mark.parametrize("name", CASES)
def test_missing_unexpected_and_wrong_shape_are_listed(name, tmp_path):
    torch.manual_seed(0)
    make, missing, unexpected, wrong = CASES[name]
    state, file, load = make(tmp_path)
    assert missing in state and unexpected not in state and wrong in state
    model_shape = tuple(state[wrong].shape)
    file_shape = (model_shape[0] + 1, *model_shape[1:])
    del state[missing]
    state[unexpected] = torch.zeros(3)
    state[wrong] = torch.zeros(file_shape)
    save_file(state, file)
    with pytest.raises(C.CheckpointError) as e:
        load()
    message = str(e.value)
    assert str(file.parent) in message
    assert f"1 missing: {missing}" in message
    assert f"1 unexpected: {unexpected}" in message
    assert f"{wrong}: file {file_shape} vs model {model_shape}" in message
