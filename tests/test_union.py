"""ControlNet Union / ProMax against diffusers' `ControlNetUnionModel` (>= 0.32) on the same random
weights, saved by diffusers' own `save_pretrained` (folder with config.json, and the weights file
alone, as xinsir ships it).

Every expectation comes from diffusers' forward (single types; the default stack = the sum of
single-type forwards, ComfyUI's chain; several types in one pass with per-type
`conditioning_scale`, the multi-condition option), from the rules written in union.py / control.py
(which controls fuse into one pass), or from xinsir's inpainting script (masked pixels set to 0). Tiny configs:
diffusers needs the token width (`num_trans_channel`) equal to the first block width, so it is 64
here (320 in the real files).
"""

from __future__ import annotations

import dataclasses
import shutil

import diffusers  # the `test` extra (>= 0.32: ControlNetUnionModel)
import numpy as np
import pytest
import torch

from comfyui_controlnet_core import preprocessors as pp
from comfyui_controlnet_core.controlnet_core import inspect_controlnet, load_controlnet
from comfyui_controlnet_core.controlnet_core.control import Control, ControlSettings, ControlStack, fusion_groups, with_control_type
from comfyui_controlnet_core.controlnet_core.errors import InputError, LoadError
from comfyui_controlnet_core.controlnet_core.host import StepRequest
from comfyui_controlnet_core.controlnet_core.layers import timestep_embedding
from comfyui_controlnet_core.controlnet_core.union import CONTROL_TYPES, UnionControlNet, type_index
from helpers_models import _randomize_, make_tiny_config, random_controlnet, rel_err

TOL = 1e-4
ADD = 8  # addition_time_embed_dim of the tiny config (256 in SDXL)
TEXT = 16  # pooled text width of the tiny config (1280 in SDXL)

TINY = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), block_out_channels=(64, 128), layers_per_block=1,
    cross_attention_dim=32, transformer_layers_per_block=1, attention_head_dim=(1, 2),  # diffusers: heads; 64 wide
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=ADD,
    projection_class_embeddings_input_dim=TEXT + 6 * ADD, conditioning_embedding_out_channels=(16, 16, 32, 32),
    num_trans_channel=64, num_trans_head=8, num_proj_channel=64,
)


def random_union(num_types: int, seed: int = 0):
    """diffusers' model with every weight random (the zero-initialised ones too), types that matter."""
    dm = diffusers.ControlNetUnionModel(num_control_type=num_types, **TINY)
    _randomize_(dm.named_parameters(), seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        dm.task_embedding.copy_(torch.randn(dm.task_embedding.shape, generator=g))  # xinsir: N(0, 320)
    return dm.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """ProMax (8 types) as a diffusers folder and as the lone weights file; Union (6 types) as a file."""
    root = tmp_path_factory.mktemp("union")
    promax = random_union(8, seed=1)
    promax.save_pretrained(root / "promax")
    shutil.copy(root / "promax" / "diffusion_pytorch_model.safetensors", root / "diffusion_pytorch_model_promax.safetensors")
    union6 = random_union(6, seed=2)
    union6.save_pretrained(root / "union6")
    shutil.copy(root / "union6" / "diffusion_pytorch_model.safetensors", root / "union6.safetensors")
    return dict(dm=promax, folder=root / "promax", file=root / "diffusion_pytorch_model_promax.safetensors",
                dm6=union6, file6=root / "union6.safetensors")


@pytest.fixture(scope="module")
def net(files):
    return load_controlnet(files["file"])


@dataclasses.dataclass
class Inp:
    x: torch.Tensor
    t: torch.Tensor
    ctx: torch.Tensor
    text: torch.Tensor
    time_ids: torch.Tensor

    @property
    def y(self) -> torch.Tensor:
        """SDXL's y as ComfyUI builds it: pooled text, then each size/crop number as a sinusoid."""
        b = self.text.shape[0]
        return torch.cat([self.text, timestep_embedding(self.time_ids.flatten(), ADD).reshape(b, -1)], 1)

    def rows(self, i: slice) -> "Inp":
        return Inp(self.x[i], self.t[i], self.ctx[i], self.text[i], self.time_ids[i])


def inputs(batch: int = 1, seed: int = 1) -> Inp:
    g = torch.Generator().manual_seed(seed)
    return Inp(torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([700.0, 300.0, 20.0][:batch]),
               torch.randn(batch, 5, 32, generator=g), torch.randn(batch, TEXT, generator=g),
               torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch))


def hints(n: int, batch: int = 1, seed: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, 64, 64, generator=g) for _ in range(n)]


def run_diffusers(dm, inp: Inp, hint_list, types, scales) -> list[torch.Tensor]:
    """diffusers' residuals, the skips then the middle; `control_type` is the one-hot of the types."""
    onehot = torch.zeros(inp.x.shape[0], dm.config.num_control_type)
    onehot[:, types] = 1.0
    with torch.no_grad():
        down, mid = dm(inp.x, inp.t, inp.ctx, hint_list, control_type=onehot, control_type_idx=list(types),
                       conditioning_scale=list(scales), return_dict=False,
                       added_cond_kwargs={"text_embeds": inp.text, "time_ids": inp.time_ids})
    return [*down, mid]


def everything(p: float) -> float:
    return 1e9 if p <= 0 else (0.0 if p >= 1 else 10.0 * (1.0 - p))


def run_stack(controls, inp: Inp, cond_or_uncond=(0,), sigma: float = 5.0, fuse: bool = False) -> list[torch.Tensor]:
    """A stack's residuals as the host gets them, back in diffusers' order (skips, then middle);
    `fuse`: the multi-condition option (several types of one network in one pass)."""
    stack = ControlStack(controls, fuse=fuse)
    stack.pre_run(everything)
    b = inp.x.shape[0]
    with torch.no_grad():
        out = stack.residuals(StepRequest(inp.x, torch.full((b,), sigma), inp.t, inp.ctx, inp.y, cond_or_uncond))
    return [*out["output"], out["middle"][0]]


def worst(ours, ref) -> tuple[float, float]:
    assert len(ours) == len(ref)
    return (max(rel_err(a, b) for a, b in zip(ours, ref)),
            max((a.double() - b.double()).abs().max().item() for a, b in zip(ours, ref)))


def count_passes(net: UnionControlNet) -> list[int]:
    """Counts encoder passes of `net` (each network evaluation runs `encode` once)."""
    calls = [0]
    real = net.encode

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    net.encode = counting
    return calls


# ------------------------------------------------------------------------------------------
# detection and loading

def test_detected_from_keys_with_the_type_count_in_both_forms(files):
    for key, types in (("folder", 8), ("file", 8), ("file6", 6)):
        m = load_controlnet(files[key])
        assert isinstance(m, UnionControlNet) and m.family == "ControlNet Union"
        assert m.num_types == types and m.control_types == CONTROL_TYPES[:types]
        assert (m.arch, m.source_format) == ("sdxl", "diffusers")
        assert m.config.model_channels == 64 and m.config.adm_in_channels == TEXT + 6 * ADD
    info = inspect_controlnet(files["file"])
    assert (info.arch, info.layout, info.supported) == ("sdxl", "diffusers", True)
    assert "Union" in info.family


def test_a_damaged_union_file_is_named(tmp_path, files):
    from safetensors.torch import load_file, save_file

    sd = load_file(files["file"])
    del sd["control_add_embedding.linear_1.weight"]
    save_file(sd, tmp_path / "cut.safetensors")
    with pytest.raises(LoadError, match="cut.safetensors: the Union weight control_add_embedding.linear_1.weight is missing"):
        load_controlnet(tmp_path / "cut.safetensors")
    save_file({"task_embedding": torch.zeros(8, 64), "control_add_embedding.linear_1.bias": torch.zeros(3)},
              tmp_path / "bare.safetensors")
    with pytest.raises(LoadError, match="bare.safetensors: a ControlNet Union file without the diffusers"):
        load_controlnet(tmp_path / "bare.safetensors")


# ------------------------------------------------------------------------------------------
# parity with diffusers

@pytest.mark.parametrize("form, name", [("folder", "openpose"), ("file", "canny/lineart/anime_lineart/mlsd"),
                                        ("file", "tile"), ("file", "repaint")])
def test_single_type_matches_diffusers_at_batch_1(files, form, name):
    net = load_controlnet(files[form])
    inp, (hint,) = inputs(), hints(1)
    with torch.no_grad():
        down, mid = net(inp.x, hint, inp.t, inp.ctx, inp.y, control_type=name)
    ref = run_diffusers(files["dm"], inp, [hint], [type_index(name)], [1.0])
    rel, abs_ = worst([*down, mid], ref)
    print(f"\n[union parity] {name} ({form}): rel {rel:.2e}, max abs {abs_:.2e}")
    assert rel <= TOL


def test_the_type_changes_the_result_so_parity_is_not_trivial(net):
    inp, (hint,) = inputs(), hints(1)
    with torch.no_grad():
        a = net(inp.x, hint, inp.t, inp.ctx, inp.y, control_type="depth")
        b = net(inp.x, hint, inp.t, inp.ctx, inp.y, control_type="segment")
    assert rel_err(a[0][0], b[0][0]) > 0.05 and rel_err(a[1], b[1]) > 0.05


@pytest.mark.parametrize("types, scales", [
    (["canny", "depth"], [1.0, 1.0]),
    (["canny", "depth"], [0.7, 1.3]),
    (["openpose", "normal", "tile"], [0.5, 1.0, 0.8]),
])
def test_one_fused_pass_matches_diffusers_multi_type(net, files, types, scales):
    """The multi-condition option: several controls of one Union network in a stack = diffusers' one
    pass with a list of hints and per-type conditioning_scale (each control's strength), one encoder pass."""
    inp, hs = inputs(), hints(len(types))
    controls = [Control(net.select_type(t), h, ControlSettings(strength=s)) for t, h, s in zip(types, hs, scales)]
    passes = count_passes(net)
    try:
        got = run_stack(controls, inp, fuse=True)
    finally:
        del net.encode
    ref = run_diffusers(files["dm"], inp, hs, [type_index(t) for t in types], scales)
    rel, abs_ = worst(got, ref)
    print(f"\n[union parity] fused {types} x {scales}: rel {rel:.2e}, max abs {abs_:.2e}")
    assert rel <= TOL and passes == [1]


@pytest.mark.parametrize("types, scales", [
    (["canny", "depth"], [1.0, 1.0]),
    (["canny", "depth"], [0.7, 1.3]),
    (["openpose", "normal", "tile"], [0.5, 1.0, 0.8]),
])
def test_by_default_a_stack_is_the_sum_of_one_pass_per_type_as_comfyuis_chain(net, files, types, scales):
    """The default: one pass per control, each diffusers' single-type forward scaled by the strength
    (ComfyUI's SetUnionControlNetType -> Apply chain: strength on the outputs, outputs summed), and
    that is not the multi-condition pass."""
    inp, hs = inputs(), hints(len(types))
    controls = [Control(net.select_type(t), h, ControlSettings(strength=s)) for t, h, s in zip(types, hs, scales)]
    passes = count_passes(net)
    try:
        got = run_stack(controls, inp)
    finally:
        del net.encode
    singles = [run_diffusers(files["dm"], inp, [h], [type_index(t)], [1.0]) for t, h in zip(types, hs)]
    ref = [sum(s * r[i] for s, r in zip(scales, singles)) for i in range(len(singles[0]))]
    rel, abs_ = worst(got, ref)
    print(f"\n[union parity] default (chain) {types} x {scales}: rel {rel:.2e}, max abs {abs_:.2e}")
    assert rel <= TOL and passes == [len(types)]
    multi = run_diffusers(files["dm"], inp, hs, [type_index(t) for t in types], scales)
    assert worst(multi, ref)[0] > 1e-2  # the two rules differ: the choice is visible


def test_auto_is_the_plain_hint_path_with_the_zero_type_embedding(net, files):
    """ComfyUI's "auto": guided = hint encoder output, emb += control_add_embedding(one-hot of nothing).
    diffusers computes exactly that when the token offset is zero and the one-hot is empty."""
    inp, (hint,) = inputs(), hints(1)
    dm = random_union(8, seed=1)  # the same weights as the fixture, but the offset layer zeroed
    with torch.no_grad():
        dm.spatial_ch_projs.weight.zero_()
        dm.spatial_ch_projs.bias.zero_()
        down, mid = net(inp.x, hint, inp.t, inp.ctx, inp.y)  # control_type defaults to "auto"
        onehot = torch.zeros(1, 8)
        ref_down, ref_mid = dm(inp.x, inp.t, inp.ctx, [hint], control_type=onehot, control_type_idx=[0],
                               return_dict=False, added_cond_kwargs={"text_embeds": inp.text, "time_ids": inp.time_ids})
    assert worst([*down, mid], [*ref_down, ref_mid])[0] <= TOL
    assert net.select_type("auto") is net and with_control_type(net, "auto") is net


# ------------------------------------------------------------------------------------------
# batch independence

def test_a_samples_residuals_do_not_depend_on_the_rest_of_the_batch(net, files):
    inp = inputs(batch=2)
    h2 = hints(2, batch=2)  # one hint per latent, per type
    for types in (["depth"], ["canny", "depth"]):
        both = run_stack([Control(net.select_type(t), h) for t, h in zip(types, h2)], inp, fuse=True)
        for i in range(2):
            row = slice(i, i + 1)
            alone = run_stack([Control(net.select_type(t), h[row]) for t, h in zip(types, h2)], inp.rows(row), fuse=True)
            assert max(rel_err(a[row], b) for a, b in zip(both, alone)) <= 1e-5
            # ... and each sample is what diffusers gives for that sample at batch 1
            ref = run_diffusers(files["dm"], inp.rows(row), [h[row] for h in h2[:len(types)]],
                                [type_index(t) for t in types], [1.0] * len(types))
            assert worst([a[row] for a in both], ref)[0] <= TOL
    # a CFG batch (cond, uncond: same latent, other text) leaves the cond row as it is alone
    cfg = Inp(inp.x[:1].repeat(2, 1, 1, 1), inp.t[:1].repeat(2), inp.ctx, inp.text, inp.time_ids)
    pair = run_stack([Control(net.select_type("depth"), h2[0][:1])], cfg, cond_or_uncond=(0, 1))
    alone = run_stack([Control(net.select_type("depth"), h2[0][:1])], cfg.rows(slice(0, 1)))
    assert max(rel_err(a[:1], b) for a, b in zip(pair, alone)) <= 1e-5
    # diffusers itself mixes the samples of a batch (attention along the batch axis): the choice matters
    other = torch.cat([h2[0][:1], torch.zeros_like(h2[0][:1])])  # sample 1: a black hint
    ref2 = run_diffusers(files["dm"], inp, [other], [1], [1.0])
    ref1 = run_diffusers(files["dm"], inp.rows(slice(0, 1)), [h2[0][:1]], [1], [1.0])
    mixed = max(rel_err(a[:1], b) for a, b in zip(ref2, ref1))
    print(f"\n[union batch] diffusers, sample 0 at batch 2 vs alone: rel {mixed:.2e}")
    assert mixed > 1e-3


# ------------------------------------------------------------------------------------------
# which controls fuse

def test_only_what_can_share_one_output_is_fused(net, files):
    net2 = load_controlnet(files["folder"])
    h = hints(1)[0]
    mask = torch.ones(1, 64, 64)

    def ctl(model, **kw):
        mask_ = kw.pop("mask", None)
        return Control(model, h, ControlSettings(**kw), mask=mask_)

    canny, depth = net.select_type("canny"), net.select_type("depth")
    sizes = lambda cs: [len(g) for g in fusion_groups(cs)]  # noqa: E731
    assert sizes([ctl(canny), ctl(depth, strength=0.5, start_percent=0.2)]) == [2]  # strength, start/end may differ
    assert sizes([ctl(canny, mask=mask), ctl(depth, mask=mask.clone())]) == [2]  # equal masks
    assert sizes([ctl(canny, mask=mask), ctl(depth)]) == [1, 1]
    assert sizes([ctl(canny), ctl(depth, apply_to="cond-only")]) == [1, 1]
    assert sizes([ctl(canny), ctl(depth, weights="soft")]) == [1, 1]
    assert sizes([ctl(canny), ctl(depth, global_pool=True)]) == [1, 1]
    assert sizes([ctl(canny), ctl(net)]) == [1, 1]  # "auto" runs alone
    assert sizes([ctl(canny), ctl(net2.select_type("depth"))]) == [1, 1]  # another loaded network
    classic = random_controlnet(make_tiny_config("sdxl"))
    assert sizes([ctl(canny), ctl(classic), ctl(depth)]) == [2, 1]


def test_a_control_outside_its_window_leaves_the_pass_to_the_others(net, files):
    """With the multi-condition option, start/end are gated per call: at a step where only one
    control is active, the pass is that control alone (a single-type pass, strength on the outputs,
    as diffusers with one type)."""
    inp, (h1, h2) = inputs(), hints(2)
    late = Control(net.select_type("depth"), h2, ControlSettings(strength=0.8, start_percent=0.5))
    early = Control(net.select_type("canny"), h1, ControlSettings(strength=0.6))
    sigma_early = everything(0.2)  # before `late` starts
    got = run_stack([early, late], inp, sigma=sigma_early, fuse=True)
    ref = run_diffusers(files["dm"], inp, [h1], [3], [0.6])
    assert worst(got, ref)[0] <= TOL
    got = run_stack([early, late], inp, sigma=everything(0.7), fuse=True)
    ref = run_diffusers(files["dm"], inp, [h1, h2], [3, 1], [0.6, 0.8])
    assert worst(got, ref)[0] <= TOL


# ------------------------------------------------------------------------------------------
# types: names and errors

def test_type_names_and_the_sentences_for_wrong_types(files, net):
    assert [type_index(n) for n in ("openpose", "depth", "scribble", "LineArt", "mlsd", "normal", "segment", "tile",
                                    "repaint", 3)] == [0, 1, 2, 3, 3, 4, 5, 6, 7, 3]
    union6 = load_controlnet(files["file6"])
    with pytest.raises(InputError) as e:
        union6.select_type("repaint")
    msg = str(e.value)
    assert "'repaint' is not in this file" in msg and "6 types" in msg and "ProMax" in msg and "union6" in msg
    with pytest.raises(InputError, match="unknown control type 'sketch'"):
        net.select_type("sketch")
    classic = random_controlnet(make_tiny_config("sdxl"))
    assert with_control_type(classic, "auto") is classic
    with pytest.raises(InputError, match="'canny' is only for ControlNet Union / ProMax models, but 'x.pth' is a "
                                         "ControlNet.*set control_type to 'auto'"):
        with_control_type(classic, "canny", "x.pth")


# ------------------------------------------------------------------------------------------
# repaint (ProMax inpaint / outpaint)

def test_repaint_takes_the_inpaint_preprocessors_output_as_xinsir_expects(net, files):
    g = np.random.default_rng(3)
    image = g.random((1, 64, 64, 3), dtype=np.float32)
    mask = np.zeros((1, 64, 64), np.float32)
    mask[:, 16:48, 8:40] = 1.0
    ours = pp.run("inpaint", image, mask=mask)  # masked pixels -1 (the v1.1 inpaint convention)
    assert (ours[mask >= 0.5] == -1.0).all()
    xinsir = image.copy()
    xinsir[mask >= 0.5] = 0.0  # promax/controlnet_union_test_inpainting.py: controlnet_img[mask > 0] = 0
    inp = inputs()
    got = run_stack([Control(net.select_type("repaint"), torch.from_numpy(ours))], inp)
    hint = torch.from_numpy(xinsir).movedim(-1, 1)
    assert worst(got, run_diffusers(files["dm"], inp, [hint], [7], [1.0]))[0] <= TOL
    # without the mapping the -1 marker would be a different hint
    raw = torch.from_numpy(ours).movedim(-1, 1)
    assert worst(run_diffusers(files["dm"], inp, [raw], [7], [1.0]), run_diffusers(files["dm"], inp, [hint], [7], [1.0]))[0] > 1e-3


# ------------------------------------------------------------------------------------------
# the nodes (ComfyUI's control protocol on the stand-in host of test_nodes.py)

def _node_setup(files, name="promax.safetensors", key="file"):
    from comfyui_controlnet_core.nodes.control_object import NetHandle
    from test_nodes import StandInControl

    return StandInControl(NetHandle(load_controlnet(files[key]), patcher=object(), name=name))


def _host_step(inp: Inp, sigma: float = 3.0):
    """ComfyUI's inputs for a CFG batch (cond row, uncond row) and what the net sees of them."""
    from test_nodes import Sampling

    s = Sampling()
    x = inp.x.repeat(2, 1, 1, 1)
    t = torch.full((2,), sigma)
    ctx = torch.cat([inp.ctx, torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(9))])
    cond = {"c_crossattn": ctx, "y": torch.cat([inp.y, inp.y])}
    seen = [Inp(s.calculate_input(t, x)[i:i + 1], s.timestep(t)[i:i + 1], ctx[i:i + 1], inp.text, inp.time_ids)
            for i in range(2)]
    return x, t, cond, seen


def test_apply_and_combine_with_types_chain_by_default_and_fuse_with_the_option(files):
    """Combine (depth) + Apply (canny) on one Union file: by default one pass per type summed (each row
    = diffusers' single-type forwards scaled by the strengths and summed: ComfyUI's chain); with
    `union_multi_condition` one pass = diffusers' multi-condition forward."""
    from comfyui_controlnet_core import NODE_CLASS_MAPPINGS
    from test_nodes import Sampling, fake_model

    union = _node_setup(files)
    h1, h2 = hints(2)
    img1, img2 = h1.movedim(1, -1), h2.movedim(1, -1)  # ComfyUI IMAGE layout
    combine = NODE_CLASS_MAPPINGS["CNCore_CombineControls"]()
    apply = NODE_CLASS_MAPPINGS["CNCore_ApplyControlNet"]()
    stack = combine.combine(union, img2, 1.3, 0.0, 1.0, control_type="depth")[0]
    text = [[torch.randn(1, 5, 32), {}]]
    x, t, cond, seen = _host_step(inputs())
    for multi in (False, True):
        kw = {"union_multi_condition": True} if multi else {}  # the default is what a saved workflow gets
        pos, neg = apply.apply(text, text, union, img1, 0.7, 0.0, 1.0, control_stack=stack,
                               control_type="canny/lineart/anime_lineart/mlsd", **kw)
        c = pos[0][1]["control"]
        assert neg[0][1]["control"] is c
        c.pre_run(fake_model(context_dim=32, adm=TEXT + 6 * ADD), Sampling().percent_to_sigma)
        passes = count_passes(union.handle.net)
        try:
            out = c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})
        finally:
            del union.handle.net.encode
        assert passes == ([1] if multi else [2])
        got = [*out["output"], out["middle"][0]]
        for row in range(2):  # each row is diffusers' batch-1 result for it (diffusers would mix the two)
            if multi:
                ref = run_diffusers(files["dm"], seen[row], [h1, h2], [3, 1], [0.7, 1.3])
            else:
                a, b = (run_diffusers(files["dm"], seen[row], [h], [k], [1.0]) for h, k in ((h1, 3), (h2, 1)))
                ref = [0.7 * p + 1.3 * q for p, q in zip(a, b)]
            assert worst([g[row:row + 1] for g in got], ref)[0] <= TOL
    # one type alone through Apply: strength scales the outputs, as diffusers' single-type scale
    pos, _ = apply.apply(text, text, union, img2, 0.4, 0.0, 1.0, control_type="depth")
    c = pos[0][1]["control"]
    c.pre_run(fake_model(context_dim=32, adm=TEXT + 6 * ADD), Sampling().percent_to_sigma)
    out = c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})
    ref = run_diffusers(files["dm"], seen[0], [h2], [1], [0.4])
    assert worst([g[:1] for g in (*out["output"], out["middle"][0])], ref)[0] <= TOL


def test_nodes_refuse_types_the_model_does_not_have(files):
    from comfyui_controlnet_core import NODE_CLASS_MAPPINGS
    from comfyui_controlnet_core.nodes.control_object import NetHandle
    from test_nodes import StandInControl

    union6 = _node_setup(files, name="union6.safetensors", key="file6")
    img = hints(1)[0].movedim(1, -1)
    text = [[torch.randn(1, 5, 32), {}]]
    combine = NODE_CLASS_MAPPINGS["CNCore_CombineControls"]()
    apply = NODE_CLASS_MAPPINGS["CNCore_ApplyControlNet"]()
    with pytest.raises(InputError, match="'repaint' is not in this file.*6 types.*ProMax"):
        combine.combine(union6, img, 1.0, 0.0, 1.0, control_type="repaint")
    with pytest.raises(InputError, match="'repaint' is not in this file.*ProMax"):
        apply.apply(text, text, union6, img, 1.0, 0.0, 1.0, control_type="repaint")
    classic = StandInControl(NetHandle(random_controlnet(make_tiny_config("sdxl")), patcher=object(), name="canny_xl.pth"))
    with pytest.raises(InputError, match="only for ControlNet Union / ProMax models, but 'canny_xl.pth' is a ControlNet"):
        combine.combine(classic, img, 1.0, 0.0, 1.0, control_type="depth")
    with pytest.raises(InputError, match="set control_type to 'auto'"):
        apply.apply(text, text, classic, img, 1.0, 0.0, 1.0, control_type="depth")
    # saved 0.1.0 workflows call the nodes without control_type: "auto"
    entry = combine.combine(union6, img, 1.0, 0.0, 1.0)[0][0]
    assert entry.control_type == "auto"


# ------------------------------------------------------------------------------------------
# the example workflow

def test_the_union_workflow_runs_two_types_of_one_file_in_one_pass_and_is_laid_out_cleanly():
    """The shipped Union workflow shows the multi-condition pass: one loader, two types, the option on."""
    import json

    from test_workflows import WORKFLOWS, load_pair

    ui, api = load_pair(WORKFLOWS / "ControlNet Union - Canny and Tile (SDXL).json")
    loaders = [k for k, n in api.items() if n["class_type"] == "CNCore_LoadControlNet"]
    apply = next(n for n in api.values() if n["class_type"] == "CNCore_ApplyControlNet")
    combine = next(n for n in api.values() if n["class_type"] == "CNCore_CombineControls")
    assert len(loaders) == 1 and apply["inputs"]["control_net"][0] == combine["inputs"]["control_net"][0] == loaders[0]
    assert apply["inputs"]["control_stack"][0] in api
    assert {apply["inputs"]["control_type"], combine["inputs"]["control_type"]} == {
        "canny/lineart/anime_lineart/mlsd", "tile"}
    assert apply["inputs"]["union_multi_condition"] is True
    # clean layout: node rectangles (title bar ~30 px above pos) do not meet, and the saved view
    # shows the whole graph in a 1600 x 1000 viewport at a readable scale
    rects = [(n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in ui["nodes"]]
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    ds = ui["extra"]["ds"]
    scale, (ox, oy) = ds["scale"], ds["offset"]
    assert scale >= 0.6
    assert min((r[0] + ox) * scale for r in rects) >= 0 and min((r[1] + oy) * scale for r in rects) >= 0
    assert max((r[2] + ox) * scale for r in rects) <= 1600 and max((r[3] + oy) * scale for r in rects) <= 1000
    assert json.dumps(api)  # plain JSON


def test_comfyuis_set_union_type_node_on_our_object_is_honoured(files):
    """ComfyUI's SetUnionControlNetType stores extra_args["control_type"] = [n] on the object it
    copies; our object reads it when the node's own control_type is "auto"."""
    from comfyui_controlnet_core import NODE_CLASS_MAPPINGS
    from test_nodes import Sampling, fake_model

    union = _node_setup(files)
    union.extra_args = {"control_type": [1]}  # what SetUnionControlNetType("depth") leaves on the copy
    (h,) = hints(1)
    text = [[torch.randn(1, 5, 32), {}]]
    pos, _ = NODE_CLASS_MAPPINGS["CNCore_ApplyControlNet"]().apply(text, text, union, h.movedim(1, -1), 1.0, 0.0, 1.0)
    c = pos[0][1]["control"]
    c.extra_args = union.extra_args  # ComfyUI's copy_to copies extra_args; the stand-in host does not
    c.pre_run(fake_model(context_dim=32, adm=TEXT + 6 * ADD), Sampling().percent_to_sigma)
    x, t, cond, seen = _host_step(inputs())
    out = c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})
    ref = run_diffusers(files["dm"], seen[0], [h], [1], [1.0])
    assert worst([g[:1] for g in (*out["output"], out["middle"][0])], ref)[0] <= TOL


# ------------------------------------------------------------------------------------------
# full size

@pytest.mark.slow
def test_full_size_sdxl_promax_at_8x8_latent():
    """The real ProMax shape (1.26 B parameters: SDXL widths, 10-deep transformers, 320-wide tokens,
    2816-wide y, 256-wide type sinusoids), random weights, loaded from diffusers' key names without a
    config.json (so the SDXL 64-wide-heads rule is exercised); a fused pass of two types (the single-type
    path is the same code with one part, checked at tiny widths above)."""
    torch.manual_seed(0)
    dm = diffusers.ControlNetUnionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), block_out_channels=(320, 640, 1280),
        layers_per_block=2, cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, conditioning_embedding_out_channels=(16, 32, 96, 256), num_control_type=8,
    )
    with torch.no_grad():  # diffusers zero-initialises these: re-draw them, or every residual is 0
        for mod in [*dm.controlnet_down_blocks, dm.controlnet_mid_block, dm.spatial_ch_projs, dm.controlnet_cond_embedding.conv_out]:
            mod.weight.normal_(0.0, 0.02)
            mod.bias.normal_(0.0, 0.02)
    dm.eval()
    ours = load_controlnet(dict(dm.state_dict()), name="promax-full")  # same dtype: the tensors are shared
    assert isinstance(ours, UnionControlNet) and ours.num_types == 8 and ours.config.head_dim == 64
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 6, 2048, generator=g)
    text, time_ids = torch.randn(1, 1280, generator=g), torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
    y = torch.cat([text, timestep_embedding(time_ids.flatten(), 256).reshape(1, -1)], 1)
    h1, h2 = (torch.rand(1, 3, 64, 64, generator=g) for _ in range(2))
    inp = Inp(x, t, ctx, text, time_ids)
    types, scales, hs = [6, 3], [0.7, 1.3], [h1, h2]  # tile (ProMax only) + canny, one pass
    models = [ours.select_type(k) for k in types]
    with torch.no_grad():
        out = ours.run_types(x, t, ctx, y, [(k, m.embed_hint(h), s) for k, m, h, s in zip(types, models, hs, scales)])
    rel, abs_ = worst([*out["output"], out["middle"][0]], run_diffusers(dm, inp, hs, types, scales))
    print(f"\n[union parity] full-size ProMax, types {types}: rel {rel:.2e}, max abs {abs_:.2e}")
    assert rel <= TOL
