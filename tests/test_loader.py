"""Loader behaviour: config inference from shapes, the head/groups rule, metadata, dtypes, ops."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from comfyui_controlnet_core.controlnet_core.config import PRESETS, SD15, SD21
from comfyui_controlnet_core.controlnet_core.errors import LoadError
from comfyui_controlnet_core.controlnet_core.formats.diffusers import from_diffusers_config, to_diffusers_config
from comfyui_controlnet_core.controlnet_core.loader import infer_config, load_controlnet, save_controlnet
from comfyui_controlnet_core.controlnet_core.model import ControlNet
from helpers_models import make_inputs, make_tiny_config, random_controlnet, rel_err, run_ours


def meta_state_dict(cfg):
    """Shapes only: a full-size state dict costs nothing on the meta device."""
    return ControlNet(cfg, device="meta").state_dict()


@pytest.mark.parametrize("arch", list(PRESETS))
def test_infer_full_size_presets(arch):
    assert infer_config(meta_state_dict(PRESETS[arch])) == PRESETS[arch]


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_infer_tiny_configs(arch):
    cfg = make_tiny_config(arch)
    assert infer_config(meta_state_dict(cfg)) == cfg


def test_infer_varied_structure():
    """Depths, res blocks, hint widths, in/hint channels all come from shapes."""
    cfg = dataclasses.replace(
        SD15, model_channels=32, channel_mult=(1, 3), num_res_blocks=3, transformer_depth=(2, 0),
        transformer_depth_middle=3, context_dim=40, in_channels=9, hint_channels=4,
        hint_block_channels=(8, 24, 32),
    )
    assert infer_config(meta_state_dict(cfg)) == cfg


def test_head_rule_for_files_without_config():
    """Linear projections: 64-wide heads, unless a width is not a multiple of 64 -> 8 heads."""
    odd = dataclasses.replace(SD21, model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 1), head_dim=32)
    got = infer_config(meta_state_dict(odd))
    assert got.use_linear_projection and got.head_dim is None and got.num_heads == 8
    assert infer_config(meta_state_dict(SD21)).heads(640) == (10, 64)
    assert infer_config(meta_state_dict(SD15)).heads(640) == (8, 80)


def test_our_metadata_restores_heads_and_groups(tmp_path):
    """What shapes cannot show (heads, GroupNorm groups) travels in our safetensors metadata."""
    cfg = dataclasses.replace(
        SD21, model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 1), head_dim=16, norm_groups=16,
        context_dim=48, hint_block_channels=(16, 16, 32, 32),
    )
    net = random_controlnet(cfg, seed=3)
    save_controlnet(net, tmp_path / "odd.safetensors")
    back = load_controlnet(tmp_path / "odd.safetensors")
    assert back.config == cfg
    inp = make_inputs(cfg, batch=1, size=8)
    for a, b in zip(run_ours(back, inp), run_ours(net, inp)):
        assert rel_err(a, b) <= 1e-6  # equal weights; only memory alignment changes the kernels
    # a .pth has no metadata: the rule applies, and `config=` is the way to say otherwise
    save_controlnet(net, tmp_path / "odd.pth")
    assert load_controlnet(tmp_path / "odd.pth").config.norm_groups == 32
    assert load_controlnet(tmp_path / "odd.pth", config=cfg).config == cfg


def test_config_override_is_checked_against_shapes(tmp_path):
    net = random_controlnet(make_tiny_config("sd15"))
    save_controlnet(net, tmp_path / "a.safetensors")
    with pytest.raises(LoadError, match="a.safetensors.*shape"):
        load_controlnet(tmp_path / "a.safetensors", config=make_tiny_config("sd21"))


def test_diffusers_head_quirk():
    """diffusers SD1.5 configs store attention_head_dim=8 meaning 8 heads; SD2.1 lists heads per level."""
    sd15 = {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768}
    assert from_diffusers_config(sd15, "x") == SD15
    sd21 = dict(sd15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True)
    assert from_diffusers_config(sd21, "x") == SD21
    for preset in PRESETS.values():
        assert from_diffusers_config(to_diffusers_config(preset), "x") == preset


def test_config_json_contradicting_weights(tmp_path):
    net = random_controlnet(make_tiny_config("sd15"))
    save_controlnet(net, tmp_path / "folder", format="diffusers")
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    config["cross_attention_dim"] = 768
    (tmp_path / "folder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"folder: config.json says context_dim=768 but the weights have context_dim=64"):
        load_controlnet(tmp_path / "folder")


def test_fp16_variant_in_folder(tmp_path):
    net = random_controlnet(make_tiny_config("sdxl"), seed=2)
    folder = tmp_path / "cn"
    save_controlnet(net, folder, format="diffusers", dtype=torch.float16)
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.fp16.safetensors")
    cn = load_controlnet(folder, dtype=torch.float16)
    assert cn.dtype == torch.float16 and cn.checkpoint_dtype == torch.float16 and cn.arch == "sdxl"
    for k, v in cn.state_dict().items():
        assert torch.equal(v, net.state_dict()[k].half()), k


def test_dtype_none_keeps_checkpoint_dtype_and_records_source(tmp_path):
    net = random_controlnet(make_tiny_config("sd15"))
    save_controlnet(net, tmp_path / "half.safetensors", dtype=torch.float16)
    cn = load_controlnet(tmp_path / "half.safetensors", dtype=None)
    assert cn.dtype == torch.float16
    assert cn.source_name == "half.safetensors" and cn.source_format == "original"
    named = load_controlnet(tmp_path / "half.safetensors", name="my canny")
    assert named.source_name == "my canny"


def test_no_meta_tensors_left_and_eval_mode(tmp_path):
    net = random_controlnet(make_tiny_config("sd21"))
    save_controlnet(net, tmp_path / "a.safetensors")
    cn = load_controlnet(tmp_path / "a.safetensors")
    assert not cn.training
    assert all(p.device.type == "cpu" for p in cn.parameters())


def test_state_dict_wrapper_and_prefixed_full_checkpoint(tmp_path):
    """A 1.0-style .ckpt: {"state_dict": {control_model.*, model.diffusion_model.*}, "epoch": 3}."""
    net = random_controlnet(make_tiny_config("sd15"), seed=4)
    sd = {"control_model." + k: v for k, v in net.state_dict().items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2, 4, 3, 3)
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 100}, tmp_path / "control_sd15_x.ckpt")
    cn = load_controlnet(tmp_path / "control_sd15_x.ckpt")
    assert cn.source_format == "original-prefixed"
    for k, v in cn.state_dict().items():
        assert torch.equal(v, net.state_dict()[k])


def test_state_dict_input():
    net = random_controlnet(make_tiny_config("sd15"))
    cn = load_controlnet(net.state_dict())
    assert cn.config == net.config and cn.source_name == "state dict"


def test_host_ops_namespace(tmp_path):
    """A host's layer namespace (ComfyUI's comfy.ops) is used for every weighted layer."""
    made = []

    def counting(base):
        class Layer(base):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                made.append(type(self).__name__)
        Layer.__name__ = "Host" + base.__name__
        return Layer

    ops = SimpleNamespace(**{n: counting(getattr(nn, n)) for n in ("Linear", "Conv2d", "GroupNorm", "LayerNorm")})
    net = random_controlnet(make_tiny_config("sdxl"))
    save_controlnet(net, tmp_path / "xl.safetensors")
    cn = load_controlnet(tmp_path / "xl.safetensors", ops=ops)
    assert made and all(
        type(m).__name__.startswith("Host") for m in cn.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm))
    )
    inp = make_inputs(net.config, batch=1)
    for a, b in zip(run_ours(cn, inp), run_ours(net, inp)):
        assert rel_err(a, b) <= 1e-6


def test_sharded_diffusers_folder(tmp_path):
    from safetensors.torch import save_file

    from comfyui_controlnet_core.controlnet_core.formats.diffusers import native_to_diffusers

    net = random_controlnet(make_tiny_config("sd15"))
    sd = native_to_diffusers(net.state_dict(), net.config)
    keys = sorted(sd)
    folder = tmp_path / "sharded"
    folder.mkdir()
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for fname, ks in halves.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(folder / fname))
    index = {"weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(to_diffusers_config(net.config)))
    cn = load_controlnet(folder)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in cn.state_dict().items())


def test_save_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        save_controlnet(random_controlnet(make_tiny_config("sd15")), tmp_path / "x.pth", format="onnx")
