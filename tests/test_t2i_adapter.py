"""T2I-Adapters against diffusers' `T2IAdapter` and `UNet2DConditionModel`, in every file layout.

Fixtures are written by the reference library's own code: `diffusers.T2IAdapter(...)` with random
weights, saved with `save_pretrained` (the diffusers folder and its single safetensors file), and
the TencentARC layout made from it with the key table of diffusers'
`scripts/convert_original_t2i_adapter.py`, inverted here by hand (`to_tencentarc`), saved the way
TencentARC saves (`torch.save` of the state dict; also wrapped as `{"adapter": ...}`). Tiny widths
for every variant, one full-size file per variant at a tiny spatial size.

The odd-size rule (ComfyUI's) is checked on a hand-computed pool and against diffusers' adapter
with its pooling swapped for the stated rule; end to end, our UNet fed through the runtime
against diffusers' UNet fed `down_intrablock_additional_residuals`. The same adapter against
ComfyUI's own T2I-Adapter is in tests/test_comfyui_integration.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from comfyui_controlnet_core.controlnet_core import loader
from comfyui_controlnet_core.controlnet_core.control import Control, ControlSettings, ControlStack
from comfyui_controlnet_core.controlnet_core.errors import InputError, LoadError
from comfyui_controlnet_core.controlnet_core.host import StepRequest
from comfyui_controlnet_core.controlnet_core.t2i_adapter import T2IAdapter, downsample
from comfyui_controlnet_core.controlnet_core.unet import UNet
from comfyui_controlnet_core.nodes.control_object import NetHandle
from helpers_models import _randomize_, make_inputs, make_tiny_config, random_controlnet, rel_err
from test_nodes import Sampling, StandInControl, apply_node, combine_node, conditioning, fake_model
from test_unet import unet_pair

# (diffusers adapter_type, hint channels, channels, num_res_blocks, unshuffle) at tiny widths that fit
# the tiny UNets of helpers_models (SD1.5: 32, 64, 64, 64; SDXL: 64, 128, 128).
TINY = {
    "full-1ch": ("full_adapter", 1, [32, 64, 64, 64], 2, 8),
    "full-3ch": ("full_adapter", 3, [32, 64, 64, 64], 2, 8),
    "xl-1ch": ("full_adapter_xl", 1, [64, 128, 128, 128], 2, 16),
    "xl-3ch": ("full_adapter_xl", 3, [64, 128, 128, 128], 2, 16),
    "light-3ch": ("light_adapter", 3, [32, 64, 64], 4, 8),  # diffusers lists 3 widths; the 4th repeats the last
}
LAYOUTS = ("diffusers-folder", "diffusers-file", "tencentarc-pth", "tencentarc-safetensors", "adapter-wrapped-pth")


def everything(p: float) -> float:
    return 1e9 if p <= 0 else (0.0 if p >= 1 else 10.0 * (1.0 - p))


def diffusers_adapter(kind: str, cin: int, channels: list, n: int, factor: int, seed: int = 0):
    from diffusers import T2IAdapter as DiffusersT2IAdapter

    model = DiffusersT2IAdapter(in_channels=cin, channels=channels, num_res_blocks=n, downscale_factor=factor,
                                adapter_type=kind)
    _randomize_(model.named_parameters(), seed)
    return model.eval()


def to_tencentarc(sd: dict, light: bool, n: int = 2) -> dict:
    """diffusers names -> TencentARC names: the table of diffusers' convert_original_t2i_adapter.py,
    read backwards. Full: body.{n*i+j} <- adapter.body.{i}.resnets.{j}, in_conv of level i at
    body.{n*i}; light: body.{i}.body.{j} <- adapter.body.{i}.resnets.{j}."""
    out = {}
    for key, t in sd.items():
        assert key.startswith("adapter."), key
        rest = key[len("adapter."):]
        m = re.match(r"^body\.(\d+)\.resnets\.(\d+)\.(.*)$", rest)
        if m:
            i, j, tail = int(m.group(1)), int(m.group(2)), m.group(3)
            rest = f"body.{i}.body.{j}.{tail}" if light else f"body.{n * i + j}.{tail}"
        else:
            m = re.match(r"^body\.(\d+)\.in_conv\.(.*)$", rest)
            if m and not light:
                rest = f"body.{n * int(m.group(1))}.in_conv.{m.group(2)}"
        out[rest] = t.detach().clone()
    return out


def write_layout(d_model, layout: str, folder) -> object:
    """The file or folder of `layout` for diffusers adapter `d_model`; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout.startswith("diffusers"):
        d_model.save_pretrained(folder / "diffusers")
        if layout == "diffusers-folder":
            return folder / "diffusers"
        return folder / "diffusers" / "diffusion_pytorch_model.safetensors"
    light = d_model.config.adapter_type == "light_adapter"
    sd = to_tencentarc(d_model.state_dict(), light, d_model.config.num_res_blocks)
    if layout == "tencentarc-pth":
        torch.save(sd, folder / "adapter.pth")
        return folder / "adapter.pth"
    if layout == "tencentarc-safetensors":
        safetensors.torch.save_file(sd, str(folder / "adapter.safetensors"))
        return folder / "adapter.safetensors"
    torch.save({"adapter": sd, "step": 1000}, folder / "wrapped.pth")  # a training checkpoint
    return folder / "wrapped.pth"


def hint_for(cin: int, size: int, batch: int = 2, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, cin, size, size, generator=g)


def compare(ours: list, ref: list) -> tuple[float, float]:
    assert len(ours) == len(ref) == 4
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
    errs = [rel_err(a, b) for a, b in zip(ours, ref)]
    return max(errs), max((a - b).abs().max().item() for a, b in zip(ours, ref))


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """Every tiny variant written in every layout, with its diffusers model."""
    root = tmp_path_factory.mktemp("t2i")
    out = {}
    for k, (kind, cin, channels, n, factor) in TINY.items():
        d = diffusers_adapter(kind, cin, channels, n, factor, seed=list(TINY).index(k))
        out[k] = (d, {layout: write_layout(d, layout, root / k / layout) for layout in LAYOUTS})
    return out


# ------------------------------------------------------------------ parity with diffusers

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", list(TINY))
def test_features_match_diffusers_in_every_layout(tiny_files, variant, layout):
    d, paths = tiny_files[variant]
    kind, cin, channels, n, factor = TINY[variant]
    net = loader.load_controlnet(paths[layout])
    assert isinstance(net, T2IAdapter) and net.family == "T2I-Adapter"
    assert net.arch == ("sdxl" if "xl" in variant else "sd15")
    assert net.source_format == ("diffusers" if layout.startswith("diffusers") else "tencentarc")
    assert net.config.in_channels == cin and net.config.num_res_blocks == n
    size = 8 * factor  # 64 px (latent 8) / 128 px (latent 16): every level divides evenly
    hint = hint_for(cin, size)
    with torch.no_grad():
        ref = d(hint)
        ours = net.embed_hint(hint)
    err, max_abs = compare(ours, ref)
    assert err <= 1e-4, (err, max_abs)
    info = loader.inspect_controlnet(paths[layout])
    assert (info.family, info.arch, info.layout, info.supported) == (
        "T2I-Adapter (light)" if "light" in variant else "T2I-Adapter", net.arch, net.source_format, True)


def test_a_one_channel_adapter_reads_the_mean_of_rgb(tiny_files):
    d, paths = tiny_files["full-1ch"]
    net = loader.load_controlnet(paths["tencentarc-pth"])
    rgb = hint_for(3, 64)
    with torch.no_grad():
        ours = net.embed_hint(rgb)
        ref = d(rgb.mean(dim=1, keepdim=True))  # ComfyUI: torch.mean(hint, 1, keepdim=True)
    assert compare(ours, ref)[0] <= 1e-4


FULL_SIZE = {
    # (diffusers type, hint channels, channels, blocks, unshuffle, layout written, dtype on disk, tensors, params)
    "full-1ch": ("full_adapter", 1, [320, 640, 1280, 1280], 2, 8, "tencentarc-pth", torch.float32, 38, 77_000_640),
    "light-3ch": ("light_adapter", 3, [320, 640, 1280], 4, 8, "diffusers-file", torch.float32, 80, 18_689_200),
    "xl-3ch": ("full_adapter_xl", 3, [320, 640, 1280, 1280], 2, 16, "diffusers-folder", torch.float16, 38, 79_028_160),
}


@pytest.mark.parametrize("variant", list(FULL_SIZE))
def test_full_size_adapters_match_diffusers(tmp_path, variant):
    """The public architectures at full width (param counts of the released files, TencentARC's
    AdapterZoo), at a tiny spatial size. The light adapter is read from the diffusers layout, the
    one ComfyUI 0.3.64 fails to load."""
    kind, cin, channels, n, factor, layout, dtype, tensors, params = FULL_SIZE[variant]
    d = diffusers_adapter(kind, cin, channels, n, factor, seed=7)
    assert sum(p.numel() for p in d.parameters()) == params
    if dtype == torch.float16:  # the SDXL repos ship fp16 weights: compare with the rounded ones
        d = d.half()
    path = write_layout(d, layout, tmp_path)
    d = d.float()
    if layout == "tencentarc-pth":  # the asserts of diffusers' conversion script, on our fixture's real names
        sd = torch.load(path, weights_only=True)
        assert len(sd) == tensors
        assert sd["body.0.block1.weight"].shape == (320, 320, 3, 3)
        assert sd["body.2.in_conv.weight"].shape == (640, 320, 1, 1)
        assert sd["body.4.in_conv.weight"].shape == (1280, 640, 1, 1)
        assert sd["body.6.block1.weight"].shape == (1280, 1280, 3, 3)
        assert sd["conv_in.weight"].shape == (320, 64 * cin, 3, 3)
    net = loader.load_controlnet(path)
    assert net.checkpoint_dtype == dtype and net.dtype == torch.float32
    assert sum(p.numel() for p in net.parameters()) == params
    assert net.host_layout == ((320, (1, 2, 4), 2) if "xl" in variant else (320, (1, 2, 4, 4), 2))
    hint = hint_for(cin, 8 * factor, batch=1)
    with torch.no_grad():
        err, max_abs = compare(net.embed_hint(hint), d(hint))
    print(f"\n[t2i parity] {variant} full size: rel err {err:.2e}, max abs {max_abs:.2e}")
    assert err <= 1e-4


# ------------------------------------------------------------------ the odd-size rule (ComfyUI's)

def test_pooling_of_an_odd_side_counts_one_zero_of_padding_on_each_end():
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    # windows over the zero-padded 5x5: rows {pad, 1} and {2, 3}, the same for columns, each / 4
    want = torch.tensor([[1 / 4, (2 + 3) / 4], [(4 + 7) / 4, (5 + 6 + 8 + 9) / 4]])
    assert torch.equal(downsample(x)[0, 0], want)
    even = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(downsample(even), F.avg_pool2d(even, 2))  # even sides: plain 2x2 means


class RulePool(torch.nn.Module):
    """The stated rule, written another way: zero-pad each odd side by one on both ends, then take
    plain 2x2 means (no ceil mode)."""

    def forward(self, x):
        ph, pw = x.shape[-2] % 2, x.shape[-1] % 2
        return F.avg_pool2d(F.pad(x, (pw, pw, ph, ph)), 2, 2)


@pytest.mark.parametrize("variant", ["full-1ch", "light-3ch", "xl-3ch"])
def test_odd_latent_sizes_follow_the_rule(tiny_files, variant):
    d, paths = tiny_files[variant]
    net = loader.load_controlnet(paths["diffusers-file"])
    h, w = 13, 11  # latent size: odd, not a multiple of 8 (SD1) or 4 (SDXL)
    H, W = net.hint_size(h, w)
    assert (H, W) == ((112, 96) if "xl" in variant else (104, 88))  # rounded up to the unshuffle factor
    hint = torch.rand(1, net.config.in_channels, H, W, generator=torch.Generator().manual_seed(4))
    d = copy.deepcopy(d)
    with torch.no_grad():
        ours = net.embed_hint(hint)
        ceil_mode = d(hint)  # diffusers' own rule: same shapes, other values along the border
        for block in d.adapter.body:
            if block.downsample is not None:
                block.downsample = RulePool()
        ref = d(hint)
    sizes = [(7, 6), (7, 6), (4, 3), (4, 3)] if "xl" in variant else [(13, 11), (7, 6), (4, 3), (2, 2)]
    assert [tuple(f.shape[-2:]) for f in ours] == sizes  # = the UNet's block sizes, ceil(h / 2**level)
    assert compare(ours, ref)[0] <= 1e-4
    pooled = 2 if "xl" in variant else 1  # the first level after a pool
    assert torch.equal(ours[pooled - 1], ceil_mode[pooled - 1])
    assert rel_err(ours[pooled], ceil_mode[pooled]) > 1e-3  # the choice is visible: not diffusers' values


# ------------------------------------------------------------------ end to end through the UNet

@pytest.mark.parametrize("arch, variant", [("sd15", "full-1ch"), ("sd15", "light-3ch"), ("sdxl", "xl-3ch")])
def test_unet_with_adapter_matches_diffusers_intrablock_residuals(tiny_files, arch, variant):
    d, paths = tiny_files[variant]
    dm, unet = unet_pair(arch, seed=21)  # the same random weights, through diffusers' own converter
    cfg = make_tiny_config(arch)
    net = loader.load_controlnet(paths["diffusers-folder"])
    assert net.host_layout == (cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks)

    size = 16
    inp = make_inputs(cfg, batch=2, size=size)
    image = torch.rand(1, 8 * size, 8 * size, 3, generator=torch.Generator().manual_seed(9))  # ComfyUI IMAGE
    control = Control(net, image, ControlSettings(strength=0.7))
    control.pre_run(everything)
    got_control = control.residuals(StepRequest(inp.x, torch.full((2,), 5.0), inp.t, inp.context, inp.y, (0, 1)))
    with torch.no_grad():
        got = unet(inp.x, inp.t, inp.context, inp.y, control=got_control)
        plain = unet(inp.x, inp.t, inp.context, inp.y)
        hint = image.movedim(-1, 1)
        if net.config.in_channels == 1:
            hint = hint.mean(dim=1, keepdim=True)
        feats = [0.7 * f.expand(2, -1, -1, -1) for f in d(hint)]  # diffusers adds the middle one only at equal shapes
        kw = {}
        if inp.text_embeds is not None:
            kw["added_cond_kwargs"] = {"text_embeds": inp.text_embeds, "time_ids": inp.time_ids}
        want = dm(inp.x, inp.t, encoder_hidden_states=inp.context, down_intrablock_additional_residuals=feats,
                  return_dict=False, **kw)[0]
    err = rel_err(got, want)
    print(f"\n[t2i end to end] {arch} {variant}: rel err {err:.2e}, max abs {(got - want).abs().max().item():.2e}")
    assert err <= 1e-4
    assert rel_err(got, plain) > 1e-3  # the adapter did something


def test_odd_latents_fit_the_unet_blocks(tiny_files):
    for arch, variant in (("sd15", "full-3ch"), ("sdxl", "xl-1ch")):
        cfg = make_tiny_config(arch)
        unet = UNet(cfg).eval()
        net = loader.load_controlnet(tiny_files[variant][1]["tencentarc-pth"])
        inp = make_inputs(cfg, batch=1, size=16)
        x = torch.randn(1, 4, 13, 11)
        c = Control(net, torch.rand(1, 100, 90, 3))
        c.pre_run(everything)
        control = c.residuals(StepRequest(x, 5.0, inp.t, inp.context, inp.y))
        with torch.no_grad():
            out = unet(x, inp.t, inp.context, inp.y, control=control)
        assert out.shape == x.shape


# ------------------------------------------------------------------ runtime rules on adapters

def test_soft_weights_are_a1111s_t2i_table_and_paper_weights_follow_the_levels(tiny_files):
    sd1 = loader.load_controlnet(tiny_files["full-3ch"][1]["diffusers-file"])
    xl = loader.load_controlnet(tiny_files["xl-3ch"][1]["diffusers-file"])
    image = torch.rand(1, 64, 64, 3)
    # sd-webui-controlnet hook.py: T2I_Adapter soft scales (0.25, 0.62, 0.825, 1.0), shallowest first
    for net in (sd1, xl):
        assert Control(net, image, ControlSettings(weights="soft")).weights == [0.25, 0.62, 0.825, 1.0]
    # the paper's w_i = 64 / h_i at 512 px: SD1 features at sides 64, 32, 16, 8; SDXL (1024 px, 128
    # latent) features at 64, 64, 32, 32 against its top level of 128
    assert Control(sd1, image, ControlSettings(weights="paper")).weights == [1.0, 2.0, 4.0, 8.0]
    assert Control(xl, image, ControlSettings(weights="paper")).weights == [128 / 64, 128 / 64, 128 / 32, 128 / 32]


def test_global_pooling_is_refused_for_an_adapter_in_a_sentence(tiny_files):
    net = loader.load_controlnet(tiny_files["full-3ch"][1]["tencentarc-pth"])
    with pytest.raises(InputError, match=r"global average pooling has no meaning for a T2I-Adapter \('adapter.pth'"):
        Control(net, torch.rand(1, 64, 64, 3), ControlSettings(global_pool=True))


def test_hint_channels_the_adapter_cannot_take_are_named(tiny_files):
    net = loader.load_controlnet(tiny_files["full-3ch"][1]["tencentarc-pth"])
    with pytest.raises(InputError, match=r"hint for the T2I-Adapter \('adapter.pth', sd15\).*the hint image has 2 channels"):
        Control(net, torch.rand(1, 64, 64, 2))
    with pytest.raises(InputError, match=r"sd15 T2I-Adapter reads 3-channel \(RGB\) hints, but the hint has 1 "):
        net.embed_hint(torch.rand(1, 1, 64, 64))
    gray = loader.load_controlnet(tiny_files["full-1ch"][1]["tencentarc-pth"])
    assert len(gray.embed_hint(torch.rand(1, 1, 64, 64))) == 4  # gray into a gray adapter: as is


def test_stack_of_an_adapter_and_a_controlnet_adds_slot_by_slot(tiny_files):
    cfg = make_tiny_config("sd15")
    cn = random_controlnet(cfg, seed=5)
    d, paths = tiny_files["full-3ch"]
    net = loader.load_controlnet(paths["diffusers-file"])
    image = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(1))
    a = Control(cn, image, ControlSettings(strength=0.5))
    b = Control(net, image, ControlSettings(strength=0.8, apply_to="cond-only"))
    stack = ControlStack([a, b])
    stack.pre_run(everything)
    inp = make_inputs(cfg, batch=2, size=16)  # at 8x8 the deepest GroupNorm sees 1x1 cells and amplifies rounding
    out = stack.residuals(StepRequest(inp.x, 5.0, inp.t, inp.context, None, (1, 0)))  # uncond first
    with torch.no_grad():
        down, mid = cn(inp.x, image.movedim(-1, 1), inp.t, inp.context)
        feats = d(image.movedim(-1, 1))
    for got, want in zip(out["output"], down):
        torch.testing.assert_close(got, 0.5 * want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["middle"][0], 0.5 * mid, rtol=1e-4, atol=1e-5)
    inputs = out["input"][::-1]
    assert [i for i, t in enumerate(inputs) if t is not None] == [2, 5, 8, 11]
    for k, block in enumerate([2, 5, 8, 11]):
        assert torch.count_nonzero(inputs[block][0]) == 0  # uncond row: cond-only
        torch.testing.assert_close(inputs[block][1], 0.8 * feats[k][0], rtol=1e-4, atol=1e-5)


def test_features_are_computed_once_per_run(tiny_files, monkeypatch):
    net = loader.load_controlnet(tiny_files["full-3ch"][1]["diffusers-file"])
    calls = []
    real = net.features
    monkeypatch.setattr(net, "features", lambda h: calls.append(1) or real(h))
    c = Control(net, torch.rand(1, 64, 64, 3))
    c.pre_run(everything)
    inp = make_inputs(make_tiny_config("sd15"), batch=2, size=8)
    for sigma in (9.0, 5.0, 1.0):
        c.residuals(StepRequest(inp.x, sigma, inp.t, inp.context, None, (0, 1)))
    assert len(calls) == 1
    c.pre_run(everything)
    c.residuals(StepRequest(inp.x, 5.0, inp.t, inp.context, None, (0, 1)))
    assert len(calls) == 2


# ------------------------------------------------------------------ bad files

def test_truncated_adapter_files_are_named(tiny_files, tmp_path):
    whole = tiny_files["full-3ch"][1]["tencentarc-safetensors"].read_bytes()
    cut = tmp_path / "t2iadapter_canny_sd15v2.safetensors"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(LoadError) as e:
        loader.load_controlnet(cut)
    msg = str(e.value)
    assert msg.startswith("t2iadapter_canny_sd15v2.safetensors: ") and "truncated" in msg
    assert "download it again" in msg and "T2I-Adapter" in msg  # the header still names the family
    whole = tiny_files["full-3ch"][1]["tencentarc-pth"].read_bytes()
    cut = tmp_path / "t2iadapter_canny_sd15v2.pth"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(LoadError, match=r"^t2iadapter_canny_sd15v2.pth: .*truncated or corrupt: download it again"):
        loader.load_controlnet(cut)  # a cut zip has lost its index: the family cannot be read


def test_incomplete_and_unknown_adapter_variants_are_named(tiny_files, tmp_path):
    sd = to_tencentarc(tiny_files["full-3ch"][0].state_dict(), light=False)
    part = {k: v for k, v in sd.items() if not k.startswith("body.7.")}
    safetensors.torch.save_file(part, str(tmp_path / "part.safetensors"))
    with pytest.raises(LoadError, match=r"part.safetensors: .*T2I-Adapter.*incomplete"):
        loader.load_controlnet(tmp_path / "part.safetensors")
    skep = dict(sd, **{"body.0.skep.weight": torch.zeros(32, 32, 1, 1)})
    safetensors.torch.save_file(skep, str(tmp_path / "skep.safetensors"))
    with pytest.raises(LoadError, match=r"skep.safetensors: a T2I-Adapter variant .*ComfyUI's own ControlNet loader"):
        loader.load_controlnet(tmp_path / "skep.safetensors")
    d = tiny_files["light-3ch"][0]
    d.save_pretrained(tmp_path / "light")
    cfg = json.loads((tmp_path / "light" / "config.json").read_text())
    (tmp_path / "light" / "config.json").write_text(json.dumps(dict(cfg, adapter_type="full_adapter")))
    with pytest.raises(LoadError, match=r"light: config.json says 'full_adapter' but the weights are a light adapter"):
        loader.load_controlnet(tmp_path / "light")


# ------------------------------------------------------------------ the nodes (stand-in host, see test_nodes)

SD1_TEXT = 768  # adapters read no text; the host's text width tells its family (SD1.x here)


def tiny_controlnet(seed: int = 3, name: str = "tiny_canny.safetensors") -> NetHandle:
    cfg = dataclasses.replace(make_tiny_config("sd15"), context_dim=SD1_TEXT)
    return NetHandle(random_controlnet(cfg, seed=seed), object(), name)


@pytest.fixture(scope="module")
def handles(tiny_files):
    sd1 = loader.load_controlnet(tiny_files["full-1ch"][1]["tencentarc-pth"], name="t2iadapter_canny_sd15v2.pth")
    xl = loader.load_controlnet(tiny_files["xl-3ch"][1]["diffusers-file"], name="t2i-adapter-canny-sdxl-1.0")
    return (NetHandle(sd1, object(), "t2iadapter_canny_sd15v2.pth"),
            NetHandle(xl, object(), "t2i-adapter-canny-sdxl-1.0"), tiny_files["full-1ch"][0])


def step(batch=2, size=8, sigma=3.0, ctx=SD1_TEXT):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(batch, 4, size, size, generator=g), torch.full((batch,), sigma),
            {"c_crossattn": torch.randn(batch, 5, ctx, generator=g)})


def test_apply_node_adds_strength_times_features_on_the_input_side(handles):
    sd1, _, d = handles
    image = torch.rand(1, 48, 48, 3, generator=torch.Generator().manual_seed(2))
    pos, neg = apply_node(conditioning(SD1_TEXT), conditioning(SD1_TEXT), StandInControl(sd1), image, 0.6, 0.0, 1.0,
                          control_mode="prompt is more important")
    c = pos[0][1]["control"]
    c.pre_run(fake_model(SD1_TEXT), Sampling().percent_to_sigma)
    x, t, cond = step()
    out = c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})
    assert out["output"] == [] and out["middle"] == []
    hint = F.interpolate(image.movedim(-1, 1), size=(64, 64), mode="nearest-exact").mean(dim=1, keepdim=True)
    with torch.no_grad():
        feats = d(hint)
    inputs = out["input"][::-1]
    for k, block in enumerate([2, 5, 8, 11]):  # soft: A1111's T2I table
        torch.testing.assert_close(inputs[block], (0.6 * (0.25, 0.62, 0.825, 1.0)[k] * feats[k]).expand(2, -1, -1, -1),
                                   rtol=1e-4, atol=1e-5)


def test_combine_an_adapter_with_a_controlnet_mask_and_schedule(handles):
    sd1, _, d = handles
    cn = tiny_controlnet()
    image = torch.rand(1, 64, 64, 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    stack = combine_node(StandInControl(sd1), image, 1.0, 0.0, 0.5, mask=mask)
    pos, _ = apply_node(conditioning(SD1_TEXT), conditioning(SD1_TEXT), StandInControl(cn), image, 1.0, 0.0, 1.0,
                        control_stack=stack)
    c = pos[0][1]["control"]
    s = Sampling()
    c.pre_run(fake_model(SD1_TEXT), s.percent_to_sigma)
    x, _, cond = step()
    early = c.get_control(x, torch.full((2,), s.percent_to_sigma(0.2)), cond, 2, {"cond_or_uncond": [0, 1]})
    late = c.get_control(x, torch.full((2,), s.percent_to_sigma(0.8)), cond, 2, {"cond_or_uncond": [0, 1]})
    feats = [f for f in early["input"] if f is not None]
    assert len(feats) == 4 and len(early["output"]) == 12
    first = feats[-1]  # block 2: the latent's resolution
    assert torch.count_nonzero(first[..., 4:]) == 0 and torch.count_nonzero(first[..., :4]) > 0
    assert all(f is None for f in late["input"]) and len(late["output"]) == 12  # the adapter ended at 0.5


def test_a_shuffle_controlnet_pools_alone_in_a_stack_with_an_adapter(handles):
    sd1, _, _ = handles
    shuffle = StandInControl(tiny_controlnet(name="control_v11e_sd15_shuffle.pth"))
    shuffle.global_average_pooling = True  # as the loader sets it for *_shuffle files
    stack = combine_node(StandInControl(sd1), torch.rand(1, 64, 64, 3), 1.0, 0.0, 1.0)
    pos, _ = apply_node(conditioning(SD1_TEXT), conditioning(SD1_TEXT), shuffle, torch.rand(1, 64, 64, 3), 1.0, 0.0,
                        1.0, control_stack=stack)
    c = pos[0][1]["control"]
    c.pre_run(fake_model(SD1_TEXT), Sampling().percent_to_sigma)
    x, t, cond = step()
    out = c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})
    for r in out["output"]:  # pooled: constant over H, W
        assert torch.allclose(r, r.mean(dim=(2, 3), keepdim=True).expand_as(r))
    f = out["input"][-3]  # block 2, not pooled
    assert not torch.allclose(f, f.mean(dim=(2, 3), keepdim=True).expand_as(f))
    pooled_adapter = StandInControl(sd1)
    pooled_adapter.global_average_pooling = True  # e.g. a T2I-Adapter file named *_shuffle
    with pytest.raises(InputError, match="global average pooling has no meaning for a T2I-Adapter"):
        apply_node(conditioning(SD1_TEXT), conditioning(SD1_TEXT), pooled_adapter, torch.rand(1, 64, 64, 3), 1.0,
                   0.0, 1.0)


def test_sdxl_adapter_on_sd15_is_refused_at_apply_and_at_sampling_and_the_next_prompt_runs(handles):
    sd1, xl, _ = handles
    image = torch.rand(1, 64, 64, 3)
    with pytest.raises(InputError) as e:
        apply_node(conditioning(768), conditioning(768), StandInControl(xl), image, 1.0, 0.0, 1.0)
    msg = str(e.value)
    assert "T2I-Adapter 't2i-adapter-canny-sdxl-1.0' is made for SDXL models" in msg and "SD1.x" in msg
    c = StandInControl(xl).copy()  # through ComfyUI's own apply node: found when sampling starts
    c.set_cond_hint(image.movedim(-1, 1), 1.0, (0.0, 1.0))
    with pytest.raises(InputError) as e:
        c.pre_run(fake_model(context_dim=768), Sampling().percent_to_sigma)
    msg = str(e.value)
    assert "T2I-Adapter 't2i-adapter-canny-sdxl-1.0' is made for SDXL models" in msg and "SD1.x" in msg
    # an SD1.x adapter fits SD1.x and SD2.x (same UNet blocks), not SDXL
    assert sd1.fits(768, None) and sd1.fits(1024, None) and not sd1.fits(2048, 2816)
    pos, _ = apply_node(conditioning(SD1_TEXT), conditioning(SD1_TEXT), StandInControl(sd1), image, 1.0, 0.0, 1.0)
    ok = pos[0][1]["control"]
    ok.pre_run(fake_model(context_dim=768), Sampling().percent_to_sigma)
    x, t, cond = step()
    assert sum(f is not None for f in ok.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})["input"]) == 4


def test_a_stack_of_sd15_and_sdxl_models_is_refused(handles):
    sd1, xl, _ = handles
    stack = combine_node(StandInControl(xl), torch.rand(1, 64, 64, 3), 1.0, 0.0, 1.0)
    with pytest.raises(InputError, match=r"different architectures.*T2I-Adapter"):
        apply_node(conditioning(), conditioning(), StandInControl(sd1), torch.rand(1, 64, 64, 3), 1.0, 0.0, 1.0,
                   control_stack=stack)


# ------------------------------------------------------------------ the example workflow

def test_example_workflow_uses_an_adapter_and_has_a_clean_layout():
    import test_workflows as tw

    ui, api = tw.load_pair(tw.WORKFLOWS / "T2I-Adapter - Canny (SD1.5).json")
    loaders = [n for n in api.values() if n["class_type"] == "CNCore_LoadControlNet"]
    assert loaders and loaders[0]["inputs"]["control_net_name"].startswith("t2iadapter_")
    rects = []
    for n in ui["nodes"]:
        (x, y), (w, h) = n["pos"], n["size"]
        rects.append((n["id"], x, y - 30, x + w, y + h))  # + the title bar above pos
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            assert a[3] <= b[1] or b[3] <= a[1] or a[4] <= b[2] or b[4] <= a[2], f"nodes {a[0]} and {b[0]} overlap"
    ds = ui["extra"]["ds"]
    scale, (ox, oy) = ds["scale"], ds["offset"]
    assert scale >= 0.6
    left, top = min(r[1] for r in rects), min(r[2] for r in rects)
    right, bottom = max(r[3] for r in rects), max(r[4] for r in rects)
    # screen = (canvas + offset) * scale must lie inside a 1600 x 1000 view
    assert (left + ox) * scale >= 0 and (top + oy) * scale >= 0
    assert (right + ox) * scale <= 1600 and (bottom + oy) * scale <= 1000, (right, bottom, scale)
    assert math.isfinite(scale)
