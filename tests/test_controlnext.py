"""ControlNeXt against a reference built from diffusers' own blocks, on random weights in the released
key layouts.

The reference side is written here from the authors' code (dvlab-research/ControlNeXt @ab4b3ac), in
diffusers' pieces: the module from `ResnetBlock2D` / `Downsample2D` / `Timesteps` /
`TimestepEmbedding` and plain torch layers, exactly as `ControlNeXt-SDXL/models/controlnet.py`
(= `ControlNeXt-SD1.5-Training/models/controlnext.py`) and `ControlNeXt-SD1.5/models/controlnet.py`
build it (same attribute names, so its state dict IS the released key layout); the host is a stock
diffusers `UNet2DConditionModel` with a hook at the variant's injection point running the reference
formula (its own lines, not our `cross_normalize`):

    SDXL      forward pre-hook on down_blocks[0] (after conv_in; the conv_in skip was taken before)
    SD1.5 v2  forward pre-hook on down_blocks[1] (after down_blocks[0] and its downsampler)
    SD1.5 v1  forward hook on mid_block

Ours: the file written as .safetensors, loaded by `load_controlnet`, run through `Control` and the
reference UNet (`unet.py`, the host protocol's FEATURE point). fp32, <= 1e-4 relative.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from torch import nn

from comfyui_controlnet_core.controlnet_core import loader
from comfyui_controlnet_core.controlnet_core.control import Control, ControlSettings, ControlStack
from comfyui_controlnet_core.controlnet_core.controlnext import ControlNeXt, cross_normalize
from comfyui_controlnet_core.controlnet_core.errors import InputError, LoadError
from comfyui_controlnet_core.controlnet_core.host import FEATURE, StepRequest
from comfyui_controlnet_core.controlnet_core.formats import controlnext as fmt
from helpers_models import _randomize_, make_inputs, make_tiny_config, random_controlnet, rel_err
from test_unet import SIZE, unet_pair

pytest.importorskip("diffusers")


# ------------------------------------------------------------------------------------------
# the reference, from diffusers' blocks

class RefModule(nn.Module):
    """The authors' module: `layout` "stem" (SDXL / SD1.5-v2) or "sd15-v1"."""

    def __init__(self, layout: str, final_out_channels: int):
        super().__init__()
        from diffusers.models.downsampling import Downsample2D
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.resnet import ResnetBlock2D

        self.layout = layout
        self.time_proj = Timesteps(128, True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(128, 256)
        if layout == "stem":
            self.embedding = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1), nn.GroupNorm(2, 64), nn.ReLU(),
                nn.Conv2d(64, 64, kernel_size=3, padding=1), nn.GroupNorm(2, 64), nn.ReLU(),
                nn.Conv2d(64, 128, kernel_size=3, padding=1), nn.GroupNorm(2, 128), nn.ReLU(),
            )
            ins, outs, groups = [128, 128], [128, 256], [4, 8]
        else:
            ins, outs, groups = [3, 128, 256], [128, 256, 256], [1, 8, 8]
        self.down_res = nn.ModuleList(
            ResnetBlock2D(in_channels=i, out_channels=o, temb_channels=256, groups=g) for i, o, g in zip(ins, outs, groups))
        self.down_sample = nn.ModuleList(
            Downsample2D(o, use_conv=True, out_channels=o, padding=1, name="op") for o in outs)
        c = outs[-1]
        if layout == "stem":
            mid = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(), nn.GroupNorm(8, c), nn.Conv2d(c, c, 3, 1, 1),
                                nn.GroupNorm(8, c))
            self.scale = 1.0
        else:
            mid = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1))
            self.scale = nn.Parameter(torch.tensor(1.0))
        self.mid_convs = nn.ModuleList([mid, nn.Conv2d(c, final_out_channels, 1, 1)])

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> dict:
        t_emb = self.time_proj(timestep.expand(sample.shape[0])).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb)
        if self.layout == "stem":
            sample = self.embedding(sample)
        for res, down in zip(self.down_res, self.down_sample):
            sample = down(res(sample, emb))
        if self.layout == "stem":
            sample = self.mid_convs[0](sample) + sample
        else:
            sample = self.mid_convs[0](sample)
        return {"out": self.mid_convs[1](sample), "scale": self.scale}


def ref_module(layout: str, out: int, seed: int) -> RefModule:
    m = RefModule(layout, out)
    _randomize_(m.named_parameters(), seed)
    with torch.no_grad():
        if layout == "sd15-v1":
            m.scale.fill_(0.7)  # a learned scale != 1, so its use is checked
    return m.eval()


def ref_inject(sample: torch.Tensor, out: dict, strength: float, pool_first: bool) -> torch.Tensor:
    """The reference formula, as the three UNet files write it (pool first: SD1.5; last: SDXL)."""
    scale = out["scale"] * strength
    controls = out["out"]
    if pool_first:
        controls = nn.functional.adaptive_avg_pool2d(controls, sample.shape[-2:])
    controls = controls.to(sample)
    mean_l, std_l = torch.mean(sample, dim=(1, 2, 3), keepdim=True), torch.std(sample, dim=(1, 2, 3), keepdim=True)
    mean_c, std_c = torch.mean(controls, dim=(1, 2, 3), keepdim=True), torch.std(controls, dim=(1, 2, 3), keepdim=True)
    controls = (controls - mean_c) * (std_l / (std_c + 1e-12)) + mean_l
    if not pool_first:
        controls = nn.functional.adaptive_avg_pool2d(controls, sample.shape[-2:])
    return sample + controls * scale


VARIANTS = {
    # name: (tiny host arch, module layout, hook site, pool_first)
    "sdxl": ("sdxl", "stem", "pre:down_blocks.0", False),
    "sd15-v2": ("sd15", "stem", "pre:down_blocks.1", True),
    "sd15-v1": ("sd15", "sd15-v1", "post:mid_block", True),
}


def host_width(arch: str, variant: str) -> int:
    cfg = make_tiny_config(arch)
    return cfg.model_channels * (cfg.channel_mult[-1] if variant == "sd15-v1" else 1)


def run_reference(dm, ref: RefModule, variant: str, inp, hint, strength=1.0, capture=None):
    """diffusers UNet output with the reference injection (hook), and the patched feature."""
    _, _, site, pool_first = VARIANTS[variant]
    kind, name = site.split(":")
    module = dm.get_submodule(name)
    with torch.no_grad():
        out = ref(hint, inp.t)
    seen = {}

    if kind == "pre":
        def hook(mod, args, kwargs):
            h = kwargs["hidden_states"]
            kwargs["hidden_states"] = seen["h"] = ref_inject(h, out, strength, pool_first)
            return args, kwargs
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        def hook(mod, args, output):
            seen["h"] = ref_inject(output, out, strength, pool_first)
            return seen["h"]
        handle = module.register_forward_hook(hook)
    kw = {}
    if inp.text_embeds is not None:
        kw["added_cond_kwargs"] = {"text_embeds": inp.text_embeds, "time_ids": inp.time_ids}
    try:
        with torch.no_grad():
            eps = dm(inp.x, inp.t, encoder_hidden_states=inp.context, return_dict=False, **kw)[0]
    finally:
        handle.remove()
    return eps, out["out"], seen["h"]


def save_module(ref: RefModule, path) -> None:
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    safetensors.torch.save_file(sd, str(path))


def everything(p: float) -> float:
    return 1e9 if p <= 0 else 0.0 if p >= 1 else 1.0


def our_residuals(unet, net, hint, inp, settings=None, mask=None, rows=None):
    control = Control(net, hint, settings or ControlSettings(), mask=mask)
    control.pre_run(everything, unet.state_dict)
    b = inp.x.shape[0]
    return control, control.residuals(StepRequest(inp.x, torch.full((b,), 5.0), inp.t, inp.context, inp.y,
                                                  rows or (0,)))


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request, tmp_path_factory):
    variant = request.param
    arch, layout, _, _ = VARIANTS[variant]
    dm, ours = unet_pair(arch, seed=20 + list(VARIANTS).index(variant))
    ref = ref_module(layout, host_width(arch, variant), seed=30 + list(VARIANTS).index(variant))
    path = tmp_path_factory.mktemp("cnx") / f"controlnext_{variant}.safetensors"
    save_module(ref, path)
    net = loader.load_controlnet(path)
    return variant, dm, ours, ref, net, make_tiny_config(arch)


# ------------------------------------------------------------------------------------------
# parity: module output, patched feature, full UNet output

@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_module_feature_and_unet_output_match_the_reference(case, strength):
    variant, dm, ours, ref, net, cfg = case
    inp = make_inputs(cfg, batch=2, size=SIZE)
    inp.t = torch.tensor([999.0, 999.0]) if strength == 1.0 else torch.tensor([421.0, 421.0])
    hint = torch.rand(1, 3, 8 * SIZE, 8 * SIZE, generator=torch.Generator().manual_seed(4))
    want_eps, want_c, want_h = run_reference(dm, ref, variant, inp, hint.expand(2, -1, -1, -1), strength)

    control, res = our_residuals(ours, net, hint, inp, ControlSettings(strength=strength))
    # the module output itself
    got_c = net.control_map(net.embed_hint(hint), inp.t)
    assert got_c.shape[0] == 1  # one hint, one step: the module ran once for both rows
    assert rel_err(got_c.expand_as(want_c), want_c) <= 1e-4
    # the patched feature: record it with a second addition at the same block
    (block, fns), = res[FEATURE].items()
    seen = {}

    def record(h):
        seen["h"] = h.clone()
        return torch.zeros_like(h)
    res[FEATURE][block] = [*fns, record]
    with torch.no_grad():
        got_eps = ours(inp.x, inp.t, inp.context, inp.y, control=res)
        plain = ours(inp.x, inp.t, inp.context, inp.y)
    assert rel_err(seen["h"], want_h) <= 1e-4
    assert rel_err(got_eps, want_eps) <= 1e-4
    # the control visibly moves the output: 30x the parity bound at least (the v1 point, the tiny UNet's
    # 2x2 middle feature, moves the eps least: 0.6 %; the input points 5-20 %)
    assert rel_err(got_eps, plain) > 3e-3


def test_variant_points_are_the_reference_ones(case):
    variant, dm, ours, ref, net, cfg = case
    inp = make_inputs(cfg, batch=1, size=SIZE)
    _, res = our_residuals(ours, net, torch.rand(1, 3, 8 * SIZE, 8 * SIZE), inp)
    want = {"sdxl": ("input", 0), "sd15-v2": ("input", 3), "sd15-v1": ("middle", 0)}[variant]
    assert list(res[FEATURE]) == [want]
    assert net.variant.name == {"sdxl": "SDXL", "sd15-v2": "SD1.5 v2", "sd15-v1": "SD1.5 v1"}[variant]


@pytest.mark.parametrize("layout, out, n_tensors, n_params", [
    ("stem", 320, 52, 3_526_400), ("sd15-v1", 1280, 51, 5_352_327)])
def test_full_size_module_in_the_released_layout_matches(tmp_path, layout, out, n_tensors, n_params):
    """Full-size modules (the released widths, 52 / 51 tensors) from .safetensors; output <= 1e-4."""
    ref = ref_module(layout, out, seed=7)
    sd = ref.state_dict()
    assert len(sd) == n_tensors and sum(v.numel() for v in sd.values()) == n_params  # the notes' counts
    path = tmp_path / "controlnet.safetensors"
    save_module(ref, path)
    net = loader.load_controlnet(path)
    assert isinstance(net, ControlNeXt) and net.family == "ControlNeXt"
    info = loader.inspect_controlnet(path)
    assert info.supported and info.arch == ("sdxl" if layout == "stem" else "sd15")
    hint = torch.rand(2, 3, 96, 64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([640.0, 640.0])
    with torch.no_grad():
        want = ref(hint, t)["out"]
        got = net.control_map(net.embed_hint(hint), t)
    assert got.shape == want.shape == (2, out, 12, 8)
    assert rel_err(got, want) <= 1e-4


def test_cross_normalize_formula_by_hand():
    """A hand-computed case: h = [0, 2] (mean 1, std sqrt(2)), c = [1, 3] (mean 2, std sqrt(2)):
    c_hat = (c - 2) * 1 + 1 = [0, 2]."""
    h = torch.tensor([0.0, 2.0]).reshape(1, 2, 1, 1)
    c = torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1)
    assert torch.allclose(cross_normalize(h, c, True), torch.tensor([0.0, 2.0]).reshape(1, 2, 1, 1))
    # unbiased std (N-1): h = [0, 3, 6] std 3, c = [0, 1, 2] std 1 -> ratio 3
    h = torch.tensor([0.0, 3.0, 6.0]).reshape(1, 3, 1, 1)
    c = torch.tensor([0.0, 1.0, 2.0]).reshape(1, 3, 1, 1)
    assert torch.allclose(cross_normalize(h, c, False).flatten(), torch.tensor([0.0, 3.0, 6.0]))


def test_fp16_constant_map_gives_no_nan():
    """fp16: eps 1e-12 rounds to 0; a constant map must give mean(h) (the fp32 result), not NaN."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 8, 4, 4, generator=g)
    c = torch.full((1, 8, 4, 4), 0.5)
    want = cross_normalize(h, c, True)  # fp32
    assert torch.allclose(want, h.mean(dim=(1, 2, 3), keepdim=True).expand_as(h))
    got = cross_normalize(h.half(), c.half(), True)
    assert torch.isfinite(got).all()
    assert (got.float() - want).abs().max() <= 1e-2


# ------------------------------------------------------------------------------------------
# the runtime: strength 0, start/end, cond-only, masks, stacks, CFG de-duplication

def test_strength_zero_and_outside_the_range_leave_the_feature_untouched(case):
    variant, dm, ours, ref, net, cfg = case
    inp = make_inputs(cfg, batch=2, size=SIZE)
    hint = torch.rand(1, 3, 8 * SIZE, 8 * SIZE)
    with torch.no_grad():
        plain = ours(inp.x, inp.t, inp.context, inp.y)
    for settings in (ControlSettings(strength=0.0), ControlSettings(start_percent=0.5, end_percent=1.0)):
        control = Control(net, hint, settings)
        control.pre_run(lambda p: 10.0 * (1 - p), ours.state_dict)  # sigma 5.0 -> outside [0, 5) when start 0.5
        res = control.residuals(StepRequest(inp.x, torch.full((2,), 7.0), inp.t, inp.context, inp.y, (0,)))
        assert res is None
        with torch.no_grad():
            assert torch.equal(ours(inp.x, inp.t, inp.context, inp.y, control=res), plain)


def test_cond_only_and_mask(case):
    variant, dm, ours, ref, net, cfg = case
    inp = make_inputs(cfg, batch=2, size=SIZE)
    hint = torch.rand(1, 3, 8 * SIZE, 8 * SIZE)
    _, full = our_residuals(ours, net, hint, inp, rows=(0, 1))
    _, cond = our_residuals(ours, net, hint, inp, ControlSettings(apply_to="cond-only"), rows=(0, 1))
    (block, [fn_full]), = full[FEATURE].items()
    (_, [fn_cond]), = cond[FEATURE].items()
    h = torch.randn(2, host_width(*(VARIANTS[variant][0], variant)), *feature_size(variant))
    with torch.no_grad():
        a, b = fn_full(h), fn_cond(h)
    assert rel_err(b[:1], a[:1]) <= 1e-5  # per-sample statistics: row 0 alone gives the same term
    assert torch.equal(b[1:], torch.zeros_like(b[1:]))  # uncond row untouched
    mask = torch.zeros(1, 8 * SIZE, 8 * SIZE)
    mask[:, :, : 4 * SIZE] = 1.0
    _, masked = our_residuals(ours, net, hint, inp, mask=mask, rows=(0, 1))
    (_, [fn_mask]), = masked[FEATURE].items()
    with torch.no_grad():
        m = fn_mask(h)
    half = h.shape[-1] // 2
    assert torch.equal(m[..., :half], a[..., :half])
    assert torch.equal(m[..., half:], torch.zeros_like(m[..., half:]))


def feature_size(variant: str) -> tuple[int, int]:
    return {"sdxl": (SIZE, SIZE), "sd15-v2": (SIZE // 2, SIZE // 2), "sd15-v1": (SIZE // 8, SIZE // 8)}[variant]


def test_global_pool_is_refused_in_a_sentence(case):
    net = case[4]
    with pytest.raises(InputError, match="no meaning for a ControlNeXt"):
        Control(net, torch.rand(1, 3, 64, 64), ControlSettings(global_pool=True))


def test_stack_with_a_classic_controlnet_adds_both(case):
    """ControlNeXt + a ControlNet in one stack: the ControlNet's residuals are added first, and the
    ControlNeXt normalises against the feature with them (ComfyUI's order; documented in controlnext.py)."""
    variant, dm, ours, ref, net, cfg = case
    inp = make_inputs(cfg, batch=2, size=SIZE)
    hint = torch.rand(1, 3, 8 * SIZE, 8 * SIZE)
    cn = random_controlnet(cfg, seed=3)
    a = Control(net, hint)
    b = Control(cn, hint)
    stack = ControlStack([a, b])
    stack.pre_run(everything, ours.state_dict)
    req = StepRequest(inp.x, torch.full((2,), 5.0), inp.t, inp.context, inp.y, (0,))
    res = stack.residuals(req)
    assert FEATURE in res and res["output"]
    only_cn = b.residuals(req)
    only_cnx = a.residuals(req)
    with torch.no_grad():
        both = ours(inp.x, inp.t, inp.context, inp.y, control=res)
        cn_out = ours(inp.x, inp.t, inp.context, inp.y, control=only_cn)
        cnx_out = ours(inp.x, inp.t, inp.context, inp.y, control=only_cnx)
    assert rel_err(both, cn_out) > 1e-3 and rel_err(both, cnx_out) > 1e-3


def test_a_cfg_batch_with_one_hint_runs_the_module_once(case):
    variant, dm, ours, ref, net, cfg = case
    inp = make_inputs(cfg, batch=2, size=SIZE)
    inp.t = torch.tensor([500.0, 500.0])  # a CFG batch: cond and uncond rows at the same step
    calls, stem = [], []
    handles = [net.mid_convs[1].register_forward_hook(lambda m, a, o: calls.append(o.shape[0]))]
    if net.embedding is not None:
        handles.append(net.embedding.register_forward_hook(lambda m, a, o: stem.append(o.shape[0])))
    try:
        control, _ = our_residuals(ours, net, torch.rand(1, 3, 8 * SIZE, 8 * SIZE), inp, rows=(0, 1))
        control.residuals(StepRequest(inp.x, torch.full((2,), 4.0), inp.t - 100, inp.context, inp.y, (0, 1)))
    finally:
        for h in handles:
            h.remove()
    assert calls == [1, 1]  # once per model call for both CFG rows
    assert stem == ([] if net.embedding is None else [1])  # the stem (no t): once per run


# ------------------------------------------------------------------------------------------
# bad input: sentences

def test_an_sd15_v1_module_on_sdxl_is_refused_before_the_first_step(tmp_path):
    ref = ref_module("sd15-v1", 64, seed=1)
    save_module(ref, tmp_path / "v1.safetensors")
    net = loader.load_controlnet(tmp_path / "v1.safetensors")
    _, sdxl = unet_pair("sdxl", seed=1)
    control = Control(net, torch.rand(1, 3, 64, 64))
    with pytest.raises(InputError, match="SD1.5 v1 one, but the model being sampled is an SDXL"):
        control.pre_run(everything, sdxl.state_dict)


def test_a_module_of_the_wrong_width_is_refused_before_the_first_step(tmp_path):
    ref = ref_module("stem", 320, seed=1)  # the full-size SDXL module on a tiny (64-wide) SDXL UNet
    save_module(ref, tmp_path / "m.safetensors")
    net = loader.load_controlnet(tmp_path / "m.safetensors")
    _, sdxl = unet_pair("sdxl", seed=1)
    with pytest.raises(InputError, match="adds a 320-channel map after its first conv.*64 channels wide"):
        Control(net, torch.rand(1, 3, 64, 64)).pre_run(everything, sdxl.state_dict)


def test_a_truncated_module_names_the_family(tmp_path):
    ref = ref_module("stem", 320, seed=1)
    path = tmp_path / "controlnet.safetensors"
    save_module(ref, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="ControlNeXt"):
        loader.load_controlnet(cut)


def test_a_module_with_missing_weights_is_refused(tmp_path):
    sd = ref_module("stem", 320, seed=1).state_dict()
    sd.pop("down_res.1.conv_shortcut.weight")
    with pytest.raises(LoadError, match="missing"):
        loader.load_controlnet(sd, name="partial.safetensors")


def test_the_unet_weights_file_in_the_controlnet_loader_is_named(tmp_path):
    sd = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.weight": torch.zeros(4, 4),
          "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.bias": torch.zeros(4)}
    with pytest.raises(LoadError, match="UNet-weights half of a ControlNeXt.*Load ControlNeXt UNet Weights"):
        loader.load_controlnet(sd, name="unet.safetensors")


# ------------------------------------------------------------------------------------------
# the UNet weights: names and the delta/absolute rule

def test_unet_weight_names_map_as_diffusers_converter_does():
    """Our diffusers -> LDM rule for to_out keys against diffusers' own LDM -> diffusers converter,
    on full-size SD1.5 and SDXL UNet key sets (meta tensors)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from comfyui_controlnet_core.controlnet_core.config import SD15, SDXL
    from comfyui_controlnet_core.controlnet_core.unet import UNet

    for cfg, dconf in ((SD15, _sd15_diffusers()), (SDXL, _sdxl_diffusers())):
        with torch.device("meta"):
            ldm = UNet(cfg).state_dict()
        to_out = [k for k in ldm if ".to_out.0." in k]
        # tag each LDM tensor by its name so the converter's placement can be read back
        tagged = {"model.diffusion_model." + k: torch.full((1,), float(i)) for i, k in enumerate(ldm)}
        names = list(ldm)
        conv = convert_ldm_unet_checkpoint(tagged, dconf)
        back = {k: names[int(v.item())] for k, v in conv.items() if ".to_out.0." in k}
        assert len(back) == len(to_out) > 0
        for dkey, lkey in back.items():
            assert fmt.to_ldm(dkey, "f") == lkey
            assert fmt.to_ldm("model.diffusion_model." + lkey, "f") == lkey


def _sd15_diffusers() -> dict:
    return dict(layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768)


def _sdxl_diffusers() -> dict:
    return dict(layers_per_block=2, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048)


def test_delta_or_absolute_is_told_by_what_the_file_is_closer_to():
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}
    delta = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    assert fmt.unet_patch_kind(delta, base) == "delta"
    assert fmt.unet_patch_kind({k: base[k] + delta[k] for k in base}, base) == "absolute"


# ------------------------------------------------------------------------------------------
# the host protocol's feature point

def test_feature_blocks_are_checked_and_grouped():
    from comfyui_controlnet_core.controlnet_core.host import control_dict

    f, g = (lambda h: h), (lambda h: 2 * h)
    d = control_dict({FEATURE: [(("input", 0), f), (("middle", 0), g), (("input", 0), g)]})
    assert d[FEATURE] == {("input", 0): [f, g], ("middle", 0): [g]}
    for bad in (("output", 1), ("middle", 1), ("input", -1), "input"):
        with pytest.raises(InputError, match="feature"):
            control_dict({FEATURE: [(bad, f)]})
    cfg = make_tiny_config("sd15")
    from comfyui_controlnet_core.controlnet_core.unet import UNet

    inp = make_inputs(cfg, batch=1, size=SIZE)
    with pytest.raises(InputError, match="input block 12, which this sd15 UNet"):
        UNet(cfg).eval()(inp.x, inp.t, inp.context, control=control_dict({FEATURE: [(("input", 12), f)]}))


def test_the_skip_kept_at_the_point_is_the_uncontrolled_feature():
    """After input block i the skip is kept first, then the addition acts: a huge addition at
    ("input", 11) (the deepest skip of SD1.5) reaches the middle block, but the skip the decoder reads
    is the block's own output (checked with a hook on output block 0's input)."""
    from comfyui_controlnet_core.controlnet_core.host import control_dict
    from comfyui_controlnet_core.controlnet_core.unet import UNet

    cfg = make_tiny_config("sd15")
    unet = UNet(cfg).eval()
    inp = make_inputs(cfg, batch=1, size=SIZE)
    seen = {}
    h_in = unet.input_blocks[11].register_forward_hook(lambda m, a, o: seen.__setitem__("skip", o.clone()))
    h_out = unet.output_blocks[0][0].register_forward_pre_hook(lambda m, a: seen.__setitem__("cat", a[0].clone()))
    try:
        with torch.no_grad():
            got = unet(inp.x, inp.t, inp.context, control=control_dict({FEATURE: [(("input", 11), lambda h: h + 100.0)]}))
    finally:
        h_in.remove()
        h_out.remove()
    width = seen["skip"].shape[1]
    assert torch.equal(seen["cat"][:, -width:], seen["skip"])  # the decoder's skip: untouched
    with torch.no_grad():
        assert rel_err(got, unet(inp.x, inp.t, inp.context)) > 1e-2  # while the addition did act


def test_comfyui_patches_act_at_their_block_only():
    from comfyui_controlnet_core.nodes.control_object import FeaturePatches, add_feature_patches

    h = torch.ones(1, 2, 2, 2)
    p = FeaturePatches({("input", 3): [lambda x: x], ("middle", 0): [lambda x: 2 * x]})
    assert torch.equal(p.after_skip(h, {"block": ("input", 3)}), 2 * h)
    assert torch.equal(p.after_skip(h, {"block": ("input", 0)}), h)
    out, skip = p.output_block(h, h, {"block": ("output", 0)})
    assert torch.equal(out, 3 * h) and skip is h
    out, _ = p.output_block(h, h, {"block": ("output", 1)})
    assert out is h
    shared = {"input_block_patch_after_skip": [len]}
    options = {"patches": shared}
    add_feature_patches(options, p.features, "x")
    assert shared == {"input_block_patch_after_skip": [len]}  # ComfyUI's own dict is not changed
    assert len(options["patches"]["input_block_patch_after_skip"]) == 2 and len(options["patches"]["output_block_patch"]) == 1


def test_a_stack_with_an_lllite_adds_both_in_one_call():
    """ControlNeXt (SDXL, after conv_in) + a ControlNet-LLLite (attention inputs) in one stack on an
    SDXL-shaped UNet: the stack's dict carries both hooks, and the result equals running the UNet
    with each control's hook (they act at different points, so order does not matter) added by hand."""
    from test_lllite import CFG, lllite_state_dict
    from comfyui_controlnet_core.controlnet_core.host import ATTENTION
    from comfyui_controlnet_core.controlnet_core.unet import UNet

    unet = UNet(CFG)
    _randomize_(unet.named_parameters(), 5)
    unet.eval()
    lllite = loader.load_controlnet(lllite_state_dict(), name="tiny_lllite.safetensors")
    cnx = loader.load_controlnet({k: v for k, v in ref_module("stem", CFG.model_channels, seed=6).state_dict().items()},
                                 name="controlnext.safetensors")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    req = StepRequest(x, torch.full((2,), 5.0), torch.full((2,), 400.0), torch.randn(2, 5, CFG.context_dim, generator=g),
                      torch.randn(2, 2816, generator=g), (0, 1))
    hint = torch.rand(1, 3, 64, 64, generator=g)
    a, b = Control(cnx, hint), Control(lllite, hint)
    stack = ControlStack([a, b])
    stack.pre_run(everything, unet.state_dict)
    both = stack.residuals(req)
    assert FEATURE in both and ATTENTION in both
    ra, rb = a.residuals(req), b.residuals(req)
    merged = {**rb, FEATURE: ra[FEATURE]}
    with torch.no_grad():
        got = unet(req.x, req.timesteps, req.context, req.y, control=both)
        want = unet(req.x, req.timesteps, req.context, req.y, control=merged)
        only = [unet(req.x, req.timesteps, req.context, req.y, control=r) for r in (a.residuals(req), b.residuals(req))]
    assert torch.equal(got, want)
    assert all(rel_err(got, o) > 1e-3 for o in only)
