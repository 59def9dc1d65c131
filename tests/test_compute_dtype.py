"""Weights stored in one dtype, computed in another (ComfyUI's manual cast: fp16 weights, fp32
compute on a CPU): `load_controlnet(path, dtype=torch.float16, compute_dtype=torch.float32)`.

For every family the weights stay fp16 (half the bytes of an fp32 load) and the outputs equal the
family's reference run in fp32 on the same weights rounded to fp16 (<= 1e-4 relative, the
project's fp32 bound): diffusers' ControlNetModel / T2IAdapter / ControlNetUnionModel, kohya's
LLLite formula written out (test_lllite.py), the Control-LoRA rule built by hand in float64
(helpers_control_lora.by_the_rule).
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import helpers_control_lora as H
from comfyui_controlnet_core.controlnet_core import load_controlnet, save_controlnet
from comfyui_controlnet_core.controlnet_core.host import ATTENTION
from comfyui_controlnet_core.controlnet_core.layers import CAST_OPS
from comfyui_controlnet_core.controlnet_core.union import type_index
from helpers_models import TINY_HINT_BLOCKS, make_inputs, make_tiny_config, random_diffusers_controlnet, rel_err, run_diffusers

TOL = 1e-4
F16, F32 = torch.float16, torch.float32


def rounded(module: torch.nn.Module) -> torch.nn.Module:
    """The module with its weights rounded to fp16 and kept in fp32: the reference's weights."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def stored_in_fp16(net: torch.nn.Module) -> None:
    assert net.dtype == F32 and net.storage_dtype == F16
    assert {p.dtype for p in net.parameters()} == {F16}


def worst(got, want) -> float:
    assert len(got) == len(want)
    for b in want:
        assert b.abs().max() > 1e-3  # not trivially zero
    return max(rel_err(a, b) for a, b in zip(got, want))


def test_controlnet_fp16_storage_fp32_compute_equals_diffusers_on_the_rounded_weights(tmp_path):
    for arch in ("sd15", "sdxl"):
        dm = rounded(random_diffusers_controlnet(arch, seed=4))
        dm.save_pretrained(tmp_path / arch, safe_serialization=True)
        path = tmp_path / f"{arch}_fp16.safetensors"
        save_controlnet(load_controlnet(tmp_path / arch), path, dtype=F16)
        net = load_controlnet(path, dtype=F16, compute_dtype=F32)
        stored_in_fp16(net)
        assert isinstance(net.time_embed[0], CAST_OPS.Linear)  # the core's casting layers (no host ops given)
        wide = load_controlnet(path, dtype=F32)
        assert sum(p.numel() * p.element_size() for p in net.parameters()) * 2 == sum(
            p.numel() * p.element_size() for p in wide.parameters())
        inp = make_inputs(net.config, batch=2, size=16)
        with torch.no_grad():
            down, mid = net(inp.x, inp.hint, inp.t, inp.context, y=inp.y)
        assert down[0].dtype == F32
        err = worst([*down, mid], run_diffusers(dm, inp))
        print(f"\n[compute dtype] ControlNet {arch}: fp16 storage, fp32 compute vs diffusers: rel {err:.1e}")
        assert err <= TOL


def test_union_fp16_storage_fp32_compute_equals_diffusers_single_and_multi_condition(tmp_path):
    from test_union import hints, inputs, random_union, run_diffusers as union_diffusers

    dm = rounded(random_union(8, seed=3))
    path = tmp_path / "promax_fp16.safetensors"
    safetensors.torch.save_file({k: v.half().contiguous() for k, v in dm.state_dict().items()}, path)
    net = load_controlnet(path, dtype=F16, compute_dtype=F32)
    stored_in_fp16(net)
    inp, (h1, h2) = inputs(), hints(2)
    with torch.no_grad():
        down, mid = net(inp.x, h1, inp.t, inp.ctx, inp.y, control_type="depth")
        parts = [(type_index(t), net.select_type(t).embed_hint(h), s) for t, h, s in (("canny", h1, 0.7), ("tile", h2, 1.3))]
        multi = net.run_types(inp.x, inp.t, inp.ctx, inp.y, parts)
    err = worst([*down, mid], union_diffusers(dm, inp, [h1], [1], [1.0]))
    err_multi = worst([*multi["output"], multi["middle"][0]], union_diffusers(dm, inp, [h1, h2], [3, 6], [0.7, 1.3]))
    print(f"\n[compute dtype] Union: single type rel {err:.1e}, multi-condition rel {err_multi:.1e}")
    assert err <= TOL and err_multi <= TOL


def test_t2i_adapter_fp16_storage_fp32_compute_equals_diffusers(tmp_path):
    from test_t2i_adapter import diffusers_adapter, hint_for, write_layout

    dm = rounded(diffusers_adapter("full_adapter", 3, [32, 64, 64, 64], 2, 8, seed=5))
    path = write_layout(dm.half(), "tencentarc-safetensors", tmp_path)
    dm.float()
    net = load_controlnet(path, dtype=F16, compute_dtype=F32)
    stored_in_fp16(net)
    hint = hint_for(3, 64)
    with torch.no_grad():
        got = net.embed_hint(hint)
        want = dm(hint)
    err = worst(got, want)
    print(f"\n[compute dtype] T2I-Adapter: rel {err:.1e}")
    assert err <= TOL


def test_lllite_fp16_storage_fp32_compute_equals_kohyas_formula():
    from test_lllite import TINY_BLOCKS, hint_for, lllite_state_dict, ref_embeddings, ref_term

    sd = lllite_state_dict(TINY_BLOCKS, seed=6, dtype=F16)
    net = load_controlnet(sd, dtype=F16, compute_dtype=F32, name="tiny_lllite.safetensors")
    stored_in_fp16(net)
    latent = (4, 6)
    hint = hint_for(latent)
    with torch.no_grad():
        outs = dict(net.control_outputs(None, None, None, None, net.embed_hint(hint))[ATTENTION])
        ref = ref_embeddings(sd, TINY_BLOCKS, hint)  # the formula on the fp16 values, in fp32
        g = torch.Generator().manual_seed(3)
        errs = []
        for s in net.specs:
            grid = (2, 3) if s.level == 1 else (1, 2)
            x = torch.randn(2, grid[0] * grid[1], s.in_dim, generator=g)
            errs.append(rel_err(outs[s.site](x, grid), ref_term(sd, s.name, x, ref[s.name], 1.0)))
    print(f"\n[compute dtype] LLLite: rel {max(errs):.1e}")
    assert max(errs) <= TOL


def test_control_lora_fp16_storage_fp32_compute_equals_the_rule(tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from test_control_lora import outputs, rule_outputs

    arch = "sd15"
    cfg = make_tiny_config(arch)
    unet = H.randomize_(UNet2DConditionModel(**H.unet_config(arch)), 0)
    host = H.host_weights_of(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_HINT_BLOCKS).eval())
    file_sd = {k: v.half() for k, v in H.make_file_sd(cfg, host, rank=4, seed=1).items()}
    path = H.save(file_sd, tmp_path / "control_lora_rank4_sd15_fp16.safetensors", dtype=F16)
    model = load_controlnet(path, dtype=F16, compute_dtype=F32)
    assert model.dtype == F32 and model.storage_dtype == F16 and {p.dtype for p in model.parameters()} == {F16}
    model.bind_host(lambda: host)
    net = model.bound_net  # merged in the compute dtype, as ComfyUI builds its Control-LoRA's network
    assert net.dtype == F32 and {p.dtype for p in net.parameters()} == {F32}
    assert model.bound_bytes == sum(p.numel() * p.element_size() for p in net.parameters())
    inp = make_inputs(cfg, batch=2, size=8)
    want = rule_outputs(H.by_the_rule(cfg, host, {k: v.float() for k, v in file_sd.items()}), inp)
    err = worst(outputs(model, inp), want)
    print(f"\n[compute dtype] Control-LoRA: rel {err:.1e}")
    assert err <= TOL


def test_a_control_lora_keeps_its_file_tensors_as_stored_and_merges_in_the_dtype_asked_for(tmp_path):
    """ComfyUI keeps a Control-LoRA's file tensors as the file stores them and builds only the merged
    network in its compute dtype: an fp16 file loaded with dtype=fp32 (ComfyUI's CPU default) holds
    fp16 tensors, merges in fp32 and equals the rule on the file's values."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from test_control_lora import outputs, rule_outputs

    cfg = make_tiny_config("sd15")
    unet = H.randomize_(UNet2DConditionModel(**H.unet_config("sd15")), 0)
    host = H.host_weights_of(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_HINT_BLOCKS).eval())
    file_sd = {k: v.half() for k, v in H.make_file_sd(cfg, host, rank=4, seed=2).items()}
    model = load_controlnet(H.save(file_sd, tmp_path / "clora_fp16.safetensors", dtype=F16), dtype=F32)
    assert model.dtype == F32 and {p.dtype for p in model.parameters()} == {F16}
    model.bind_host(lambda: host)
    assert {p.dtype for p in model.bound_net.parameters()} == {F32}
    inp = make_inputs(cfg, batch=2, size=8)
    want = rule_outputs(H.by_the_rule(cfg, host, {k: v.float() for k, v in file_sd.items()}), inp)
    assert worst(outputs(model, inp), want) <= TOL


def test_flux_fp16_storage_fp32_compute_equals_diffusers(tmp_path):
    """The Flux family (a DiT net, issue 23) under the same rule: a Union with a mode and an XLabs-style
    pixel net (diffusers layout), fp16 weights and fp32 compute, against diffusers' FluxControlNetModel
    in fp32 on the rounded weights, per block output."""
    from helpers_flux import diffusers_controlnet, inputs as flux_inputs, save_state_dict
    from test_flux_controlnet import _diffusers_samples, _ours

    for name, kw, mode in (("union", {"modes": 10}, 3), ("xlabs", {"pixel": True}, None)):
        dm = rounded(diffusers_controlnet(2, 2 if mode is not None else 0, seed=41, **kw))
        path = tmp_path / f"flux_{name}_fp16.safetensors"
        save_state_dict({k: v.half() for k, v in dm.state_dict().items()}, path)
        net = load_controlnet(path, dtype=F16, compute_dtype=F32)
        stored_in_fp16(net)
        assert isinstance(net.img_in, CAST_OPS.Linear)
        inp = flux_inputs()
        pixel = "pixel" in kw
        got = sum(_ours(net, inp, () if mode is None else (mode,), pixel=pixel), [])
        assert got[0].dtype == F32
        err = worst(got, sum(_diffusers_samples(dm, inp, mode, pixel=pixel), []))
        print(f"\n[compute dtype] Flux {name}: fp16 storage, fp32 compute vs diffusers: rel {err:.1e}")
        assert err <= TOL


def test_flux_fp8_file_stored_as_fp8_computed_wider_equals_the_upcast_model(tmp_path):
    """A float8_e4m3fn Flux file as ComfyUI's storage rule keeps it (the adapter: storage = the file's
    e4m3, compute fp16/fp32, manual cast): every weight stays e4m3, and the outputs equal those of
    the model upcast to fp32 at load time exactly (the same values, widened per layer)."""
    from helpers_flux import diffusers_controlnet, inputs as flux_inputs, save_state_dict
    from test_flux_controlnet import _ours

    e4m3 = getattr(torch, "float8_e4m3fn", None)
    if e4m3 is None:
        pytest.skip("this torch has no float8_e4m3fn")
    ref = diffusers_controlnet(2, 2, modes=10, seed=43)
    path = tmp_path / "flux_fp8.safetensors"
    save_state_dict({k: v.to(e4m3) for k, v in ref.state_dict().items()}, path)
    net = load_controlnet(path, dtype=e4m3, compute_dtype=F32)
    assert net.dtype == F32 and net.storage_dtype == e4m3 and {p.dtype for p in net.parameters()} == {e4m3}
    upcast = load_controlnet(path, dtype=F32)
    inp = flux_inputs()
    got, want = sum(_ours(net, inp, (3,)), []), sum(_ours(upcast, inp, (3,)), [])
    assert got[0].dtype == F32 and all(torch.equal(a, b) for a, b in zip(got, want))
