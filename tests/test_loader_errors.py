"""Bad input gets a clear error naming the file and the reason, never a raw KeyError from inside."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfyui_controlnet_core.controlnet_core.errors import InputError, LoadError, UnsupportedFamilyError
from comfyui_controlnet_core.controlnet_core.loader import load_controlnet, save_controlnet
from helpers_models import make_inputs, make_tiny_config, random_controlnet


@pytest.fixture(scope="module")
def tiny_sd():
    return {k: v.clone() for k, v in random_controlnet(make_tiny_config("sd15"), seed=0).state_dict().items()}


def _write(tmp_path, keys, name="model.safetensors"):
    path = tmp_path / name
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return path


# ------------------------------------------------------------------ broken files

def test_missing_file(tmp_path):
    with pytest.raises(LoadError, match=r"nope.safetensors: no such file"):
        load_controlnet(tmp_path / "nope.safetensors")


def test_empty_file(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(LoadError, match=r"empty.safetensors: the file is empty \(0 bytes\)"):
        load_controlnet(tmp_path / "empty.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file(tmp_path, tiny_sd, suffix):
    whole = tmp_path / ("whole" + suffix)
    save_controlnet(random_controlnet(make_tiny_config("sd15")), whole)
    data = whole.read_bytes()
    cut = tmp_path / ("cut" + suffix)
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"cut\.(safetensors|pth): .*truncated or corrupt"):
        load_controlnet(cut)


def test_text_file(tmp_path):
    (tmp_path / "readme.safetensors").write_text("this is not a model\n")
    with pytest.raises(LoadError, match=r"readme.safetensors: does not start with a safetensors header"):
        load_controlnet(tmp_path / "readme.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LoadError, match=r"notes.txt: is not a model file"):
        load_controlnet(tmp_path / "notes.txt")


class Payload:  # any class outside torch's allow-list
    pass


def test_pickle_with_arbitrary_objects_is_refused(tmp_path, tiny_sd):
    torch.save({"state_dict": tiny_sd, "payload": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(LoadError, match=r"evil.pth: this file needs arbitrary Python objects .* refused"):
        load_controlnet(tmp_path / "evil.pth")


def test_folder_without_weights(tmp_path):
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text("{}")
    with pytest.raises(LoadError, match=r"cn: this folder has no diffusion_pytorch_model"):
        load_controlnet(tmp_path / "cn")


# ------------------------------------------------------------------ other families and non-ControlNets

UNSUPPORTED = {
    "T2I-Adapter (style)": ["style_embedding", "transformer_layes.0.attn.in_proj_weight", "ln_post.weight"],
    "SD3 / SD3.5 ControlNet": ["controlnet_blocks.0.weight", "pos_embed_input.proj.weight"],
    "DiT ControlNet (SD3 / Flux family)": ["controlnet_blocks.0.weight", "double_blocks.0.img_attn.norm.key_norm.scale"],
    "HunyuanDiT ControlNet": ["after_proj_list.18.bias", "blocks.0.attn1.q.weight"],
    "Stable Cascade ControlNet": ["backbone.0.0.weight"],
    "SparseCtrl": ["controlnet_cond_embedding.conv_in.weight", "down_blocks.0.motion_modules.0.x.weight"],
    "Diff-ControlNet": ["control_model.zero_convs.0.0.weight", "difference"],
}


@pytest.mark.parametrize("family", list(UNSUPPORTED))
def test_recognised_unsupported_family(tmp_path, family):
    path = _write(tmp_path, UNSUPPORTED[family], "thing.safetensors")
    with pytest.raises(UnsupportedFamilyError) as info:
        load_controlnet(path)
    msg = str(info.value)
    assert msg.startswith("thing.safetensors: this is ")
    assert family in msg and "not yet supported" in msg


NOT_CONTROLNETS = {
    "full Stable Diffusion checkpoint": [
        "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    ],
    "LoRA": ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
             "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"],
    "VAE": ["encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.up.0.block.0.conv1.weight"],
    "text encoder": ["text_model.encoder.layers.0.mlp.fc1.weight", "text_model.embeddings.token_embedding.weight"],
}


@pytest.mark.parametrize("what", list(NOT_CONTROLNETS))
def test_not_a_controlnet_is_named(tmp_path, what):
    path = _write(tmp_path, NOT_CONTROLNETS[what], "mystery.safetensors")
    with pytest.raises(LoadError, match=rf"mystery.safetensors: this is an? {what}( \([^)]*\))?, not a ControlNet") as info:
        load_controlnet(path)
    assert not isinstance(info.value, UnsupportedFamilyError)


def test_unknown_keys(tmp_path):
    path = _write(tmp_path, ["foo.weight", "bar.bias"], "odd.safetensors")
    with pytest.raises(LoadError, match=r"odd.safetensors: is not a ControlNet.*first keys: bar.bias, foo.weight"):
        load_controlnet(path)


# ------------------------------------------------------------------ keys and shapes

def test_missing_keys_are_named(tiny_sd):
    sd = dict(tiny_sd)
    del sd["input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"], sd["zero_convs.3.0.bias"]
    with pytest.raises(LoadError, match=r"cn.pth: 2 weights are missing \(e.g. input_blocks.4.1.transformer_blocks.0"
                                        r".attn1.to_q.weight, zero_convs.3.0.bias\)"):
        load_controlnet(sd, name="cn.pth")


def test_missing_stem_is_named_not_a_keyerror(tiny_sd):
    sd = {k: v for k, v in tiny_sd.items() if k != "input_blocks.0.0.weight"}
    with pytest.raises(LoadError, match=r"the weight input_blocks.0.0.weight is missing"):
        load_controlnet(sd, name="cn.pth")


def test_extra_keys_are_named(tiny_sd):
    sd = dict(tiny_sd, **{"input_blocks.1.0.extra.weight": torch.zeros(1), "zero_convs.99.0.weight": torch.zeros(1)})
    with pytest.raises(LoadError, match=r"2 weights are not part of a sd15 ControlNet \(e.g. "
                                        r"input_blocks.1.0.extra.weight, zero_convs.99.0.weight\)"):
        load_controlnet(sd, name="cn.pth")


def test_extra_diffusers_keys_are_named(tmp_path, tiny_sd):
    save_controlnet(random_controlnet(make_tiny_config("sd15")), tmp_path / "d.safetensors", format="diffusers")
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "d.safetensors"))
    sd["class_embedding.linear_1.weight"] = torch.zeros(2, 2)
    with pytest.raises(LoadError, match=r"d2: 1 diffusers keys fit no part of a ControlNet \(e.g. class_embedding"):
        load_controlnet(sd, name="d2")


def test_wrong_shape(tiny_sd):
    sd = dict(tiny_sd)
    sd["input_blocks.1.1.proj_out.weight"] = torch.zeros(32, 16, 1, 1)
    with pytest.raises(LoadError, match=r"cn: input_blocks.1.1.proj_out.weight has shape \(32, 16, 1, 1\) but .* "
                                        r"needs \(32, 32, 1, 1\); the shapes fit no config"):
        load_controlnet(sd, name="cn")


def test_widths_that_fit_no_config(tiny_sd):
    sd = dict(tiny_sd)
    sd["input_blocks.2.0.out_layers.3.weight"] = torch.zeros(48, 32, 3, 3)
    with pytest.raises(LoadError, match=r"cn: a level mixes widths \[32, 48\].*shapes fit no config"):
        load_controlnet(sd, name="cn")
    sd = dict(tiny_sd)
    sd["input_blocks.0.0.weight"] = torch.zeros(40, 4, 3, 3)  # 40 is no multiple of 32 GroupNorm groups
    with pytest.raises(LoadError, match=r"cn: .*(fit no ControlNet config|fits? no config)"):
        load_controlnet(sd, name="cn")


# ------------------------------------------------------------------ forward-time input checks

@pytest.fixture(scope="module")
def nets():
    return {arch: random_controlnet(make_tiny_config(arch)) for arch in ("sd15", "sdxl")}


def test_hint_of_wrong_rank_or_channels(nets):
    net = nets["sd15"]
    inp = make_inputs(net.config, batch=1)
    with pytest.raises(InputError, match=r"the hint must be an image batch \(batch, 3, H, W\); got \(3, 64, 64\)"):
        net(inp.x, inp.hint[0], inp.t, inp.context)
    with pytest.raises(InputError, match=r"got \(1, 1, 64, 64\)"):
        net(inp.x, inp.hint[:, :1], inp.t, inp.context)


def test_hint_must_be_8x_the_latent(nets):
    net = nets["sd15"]
    inp = make_inputs(net.config, batch=1)
    with pytest.raises(InputError, match=r"the hint must be 8x the latent size: latent \(8, 8\) needs a hint of "
                                         r"64x64 pixels, got 32x32"):
        net(inp.x, inp.hint[:, :, :32, :32], inp.t, inp.context)


def test_latent_of_wrong_channels(nets):
    net = nets["sd15"]
    inp = make_inputs(net.config, batch=1)
    with pytest.raises(InputError, match=r"the latent must be \(batch, 4, h, w\); got \(1, 3, 8, 8\)"):
        net(inp.x[:, :3], inp.hint, inp.t, inp.context)


def test_sdxl_net_with_sd15_context(nets):
    net = nets["sdxl"]
    inp = make_inputs(net.config, batch=1)
    with pytest.raises(InputError, match=r"expects text context of width 128 .* got 768 \(SD1.x\)"):
        net(inp.x, inp.hint, inp.t, torch.zeros(1, 77, 768), y=inp.y)
    with pytest.raises(InputError, match=r"needs the SDXL `y` vector"):
        net(inp.x, inp.hint, inp.t, inp.context)


# ------------------------------------------------------------------ dtypes a ControlNet never has

@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int32, torch.uint8])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_integer_or_bool_weights_are_named_from_the_header(tmp_path, tiny_sd, dtype, suffix, monkeypatch):
    from comfyui_controlnet_core.controlnet_core import loader

    sd = dict(tiny_sd)
    key = "input_blocks.1.1.proj_out.weight"
    sd[key] = sd[key].to(dtype)
    path = tmp_path / ("quantised" + suffix)
    (save_file if suffix == ".safetensors" else lambda d, p: torch.save(d, p))(sd, str(path))
    read = []
    real_cast = loader._Reader.cast
    monkeypatch.setattr(loader._Reader, "cast", lambda self, t: read.append(1) or real_cast(self, t))
    stored = {torch.int8: "I8", torch.bool: "BOOL", torch.int32: "I32", torch.uint8: "U8"}[dtype]
    if suffix == ".pth":
        stored = str(dtype).removeprefix("torch.")
    with pytest.raises(LoadError, match=rf"quantised{suffix}: the weight {key} is stored as {stored}, but the "
                                        r"weights of a ControlNet \(v1.1 layout\) are floating point .*use a float16 "
                                        "or float32 version"):
        load_controlnet(path)
    assert read == []  # refused from the header: no tensor was read or cast
    # the same tensors handed over as a state dict get the same sentence
    with pytest.raises(LoadError, match=rf"cn: the weight {key} is stored as {str(dtype).removeprefix('torch.')}"):
        load_controlnet(sd, name="cn")


@pytest.mark.parametrize("f8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_files_are_upcast_to_the_compute_dtype(tmp_path, f8):
    """torch 2.13 has no float8 convolution (CPU: "slow_conv2d_cpu" not implemented), so a float8 file
    is upcast: to the dtype asked for, or float16 when the caller keeps the file's (dtype=None)."""
    net = random_controlnet(make_tiny_config("sd15"), seed=1)
    save_controlnet(net, tmp_path / "cn_f8.safetensors", dtype=f8)
    rounded = {k: v.to(f8).to(torch.float32) for k, v in net.state_dict().items()}  # what float8 keeps
    got = load_controlnet(tmp_path / "cn_f8.safetensors", dtype=torch.float32)
    assert got.checkpoint_dtype == f8 and got.dtype == torch.float32
    assert all(torch.equal(v, rounded[k]) for k, v in got.state_dict().items())
    kept = load_controlnet(tmp_path / "cn_f8.safetensors", dtype=None)
    assert kept.dtype == torch.float16 and all(v.dtype == torch.float16 for v in kept.state_dict().values())
    inp = make_inputs(kept.config, batch=1)
    with torch.no_grad():
        want = got(inp.x, inp.hint, inp.t, inp.context)
        down, mid = kept(inp.x.half(), inp.hint.half(), inp.t, inp.context.half())
    assert all(((a.float() - b).norm() / b.norm()) < 1e-2 for a, b in zip([*down, mid], [*want[0], want[1]]))
