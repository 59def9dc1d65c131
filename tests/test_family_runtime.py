"""The family-independent runtime (control.py, host.py, loader dispatch) against hand-computed values.

A stand-in family (`Stub`, below) returns known tensors in the `input` and `middle` slots, the way
an adapter does; every expectation is written out from the rules in control.py's docstring, not
from our own output.
"""

import dataclasses

import pytest
import safetensors.torch
import torch

from comfyui_controlnet_core.controlnet_core import loader
from comfyui_controlnet_core.controlnet_core.config import SD15
from comfyui_controlnet_core.controlnet_core.control import Control, ControlSettings, ControlStack, residual_weights
from comfyui_controlnet_core.controlnet_core.errors import InputError, LoadError, UnsupportedFamilyError
from comfyui_controlnet_core.controlnet_core.host import StepRequest, control_dict, unet_control
from comfyui_controlnet_core.controlnet_core.model import ControlNet
from comfyui_controlnet_core.controlnet_core.unet import UNet

TINY = dataclasses.replace(SD15, model_channels=32, channel_mult=(1, 2, 2, 2), context_dim=64,
                           hint_block_channels=(16, 16, 32, 32))


def everything(p: float) -> float:
    return 1e9 if p <= 0 else (0.0 if p >= 1 else 10.0 * (1.0 - p))


class Stub:
    """An adapter-like family: a constant feature per level in the `input` slot (blocks 2, 5, 8, 11 of
    a 4-level UNet) and one in the middle. Features are the hint's mean times a per-output constant,
    so every scale can be checked by hand."""

    family = "Stub-Adapter"
    hint_channels = 3
    arch = "sd15"
    host_archs = ("sd15",)
    context_dim = None
    adm_channels = None
    host_layout = (32, (1, 2, 2, 2), 2)
    dtype = torch.float32
    widths = (32, 64, 64, 64)

    def __init__(self):
        self.embedded = 0

    def hint_size(self, h, w):
        return 8 * h, 8 * w

    def embed_hint(self, hint):
        self.embedded += 1
        m = hint.mean(dim=(1, 2, 3))  # (B,)
        h, w = hint.shape[-2] // 8, hint.shape[-1] // 8
        feats = [m[:, None, None, None] * (i + 1) * torch.ones(1, c, h >> i, w >> i) for i, c in enumerate(self.widths)]
        return feats + [m[:, None, None, None] * 10 * torch.ones(1, 64, h >> 3, w >> 3)]

    def output_levels(self):
        return [0, 1, 2, 3, 3]

    def control_outputs(self, x, timesteps, context, y, embedding):
        f = embedding
        inputs = [None, None, f[0], None, None, f[1], None, None, f[2], None, None, f[3]]
        return {"input": inputs, "middle": [f[4]]}


def req(batch=2, cond_or_uncond=(0, 1), size=8, sigma=5.0):
    g = torch.Generator().manual_seed(0)
    return StepRequest(torch.randn(batch, 4, size, size, generator=g), torch.full((batch,), sigma),
                       torch.full((batch,), 500.0), torch.randn(batch, 3, 64, generator=g), None, cond_or_uncond)


def test_control_dict_reverses_input_and_keeps_output_order():
    a, b, c, d = (torch.full((1,), float(i)) for i in range(4))
    got = control_dict({"input": [a, None, b], "output": [c, d], "middle": [a]})
    assert got["input"] == [b, None, a]  # popped from the end: block 0 first
    assert got["output"] == [c, d] and got["middle"] == [a]
    assert unet_control([c, d], a) == {"input": [], "middle": [a], "output": [c, d]}


def test_adapter_like_outputs_are_scaled_cond_only_and_counted_once_per_run():
    stub = Stub()
    hint = torch.full((1, 3, 64, 64), 0.5)
    c = Control(stub, hint, ControlSettings(strength=0.5, weights="soft", apply_to="cond-only"))
    c.pre_run(everything)
    out = c.residuals(req())
    soft = [0.825 ** (4 - i) for i in range(5)]  # 5 outputs: base ** (n-1-i)
    inputs = out["input"][::-1]  # back to encoder order
    assert [i for i, t in enumerate(inputs) if t is not None] == [2, 5, 8, 11]
    for k, block in enumerate([2, 5, 8, 11]):
        t = inputs[block]
        assert t.shape[0] == 2
        assert torch.all(t[1] == 0)  # the uncond row gets nothing
        assert torch.allclose(t[0], torch.full_like(t[0], 0.5 * (k + 1) * 0.5 * soft[k]))
    assert torch.allclose(out["middle"][0][0], torch.full_like(out["middle"][0][0], 0.5 * 10 * 0.5 * soft[4]))
    c.residuals(req())
    assert stub.embedded == 1  # step-independent part computed once per run
    c.pre_run(everything)
    c.residuals(req())
    assert stub.embedded == 2


def test_paper_weights_are_64_over_the_block_side():
    net = ControlNet(TINY)
    # SD1.5 at 512 px: sides 64 (stem, 2 ResBlocks), 32 (down + 2), 16 (down + 2), 8 (down + 2, middle)
    want = [64 / h for h in [64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8, 8, 8]]
    assert residual_weights("paper", 13, levels=net.output_levels()) == want
    s = ControlSettings.from_mode("CFG resolution weighting (paper)")
    assert (s.weights, s.apply_to) == ("paper", "cond-only")
    assert Control(net, torch.rand(1, 64, 64, 3), s).weights == want


def test_a_stack_adds_adapter_slots_and_controlnet_slots():
    torch.manual_seed(0)
    net = ControlNet(TINY).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, 0, 0.05)
    stub = Stub()
    hint = torch.rand(1, 3, 64, 64)
    a, b = Control(net, hint), Control(stub, hint)
    stack = ControlStack([a, b])
    stack.pre_run(everything)
    r = req()
    got = stack.residuals(r)
    ra, rb = a.residuals(r), b.residuals(r)
    assert len(got["input"]) == 12
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(got["input"], rb["input"]))
    assert all(torch.equal(x, y) for x, y in zip(got["output"], ra["output"]))
    assert torch.allclose(got["middle"][0], ra["middle"][0] + rb["middle"][0])


def test_reference_unet_adds_input_features_after_their_blocks():
    torch.manual_seed(0)
    unet = UNet(TINY).eval()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 3, 64)
    feats = [torch.randn(1, c, 8 >> i, 8 >> i) for i, c in enumerate((32, 64, 64, 64))]
    inputs = [None, None, feats[0], None, None, feats[1], None, None, feats[2], None, None, feats[3]]
    with torch.no_grad():
        got = unet(x, t, ctx, control=control_dict({"input": inputs}))
        # by hand: the same forward with the feature added to each block's output (and so to its skip)
        from comfyui_controlnet_core.controlnet_core.layers import timestep_embedding

        emb = unet.time_embed(timestep_embedding(t, 32))
        h, skips = x, []
        for i, block in enumerate(unet.input_blocks):
            h = block(h, emb, ctx)
            if inputs[i] is not None:
                h = h + inputs[i]
            skips.append(h)
        want = unet(x, t, ctx, control=None)
        assert not torch.allclose(got, want)
        h = unet.middle_block(h, emb, ctx)
        for block in unet.output_blocks:
            h = torch.cat([h, skips.pop()], 1)
            size = tuple(skips[-1].shape[-2:]) if skips else None
            for layer in block:
                name = type(layer).__name__
                h = layer(h, emb) if name == "ResBlock" else layer(h, ctx) if name == "SpatialTransformer" else layer(h, size)
        want = unet.out(h)
    assert torch.allclose(got, want, atol=1e-6)


def test_stack_refuses_models_for_different_base_models():
    net = ControlNet(TINY)
    stub = Stub()
    stub.host_archs = ("sdxl",)
    with pytest.raises(InputError, match="different architectures.*Stub-Adapter"):
        ControlStack([Control(net, torch.rand(1, 64, 64, 3)), Control(stub, torch.rand(1, 64, 64, 3))])


# ------------------------------------------------------------------ loader dispatch, header first

WRONG_KINDS = {  # real key names of each kind of file (a few per file suffice for detection)
    "full SD checkpoint": ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                            "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)},
                           LoadError, "this is a full Stable Diffusion checkpoint"),
    "VAE": ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)},
            LoadError, "this is a VAE, not a ControlNet"),
    "LoRA": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()},
             LoadError, "this is a LoRA, not a ControlNet"),
    "text encoder": ({"text_model.embeddings.token_embedding.weight": (49408, 8),
                      "text_model.encoder.layers.0.mlp.fc1.weight": (32, 8)},
                     LoadError, "this is a text encoder"),
    "unsupported family": ({"controlnet_blocks.0.weight": (8, 8), "pos_embed_input.proj.weight": (8, 16, 2, 2)},
                           UnsupportedFamilyError, "this is an SD3 / SD3.5 ControlNet; that family is recognised but"),
}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("kind", list(WRONG_KINDS))
def test_wrong_kind_of_file_is_refused_from_its_header_without_reading_tensors(tmp_path, monkeypatch, kind, suffix):
    shapes, error, words = WRONG_KINDS[kind]
    sd = {k: torch.zeros(s) for k, s in shapes.items()}
    path = tmp_path / ("wrong" + suffix)
    if suffix == ".safetensors":
        safetensors.torch.save_file(sd, path)
    else:
        torch.save(sd, path)  # torch's zip format: read memory-mapped, names first

    def no_reading(*a, **k):
        raise AssertionError("tensor data was read")

    import safetensors as st

    monkeypatch.setattr(st, "safe_open", no_reading)
    read = []
    real_cast = loader._Reader.cast
    monkeypatch.setattr(loader._Reader, "cast", lambda self, t: read.append(1) or real_cast(self, t))
    with pytest.raises(error, match=f"wrong{suffix}: {words}"):
        loader.load_controlnet(path)
    assert read == []  # names seen, nothing read or cast


def test_inspect_reads_family_arch_and_layout_from_the_header(tmp_path):
    net = ControlNet(TINY)
    loader.save_controlnet(net, tmp_path / "a.safetensors", format="diffusers")
    loader.save_controlnet(net, tmp_path / "b.pth", format="original-prefixed")
    for f, layout in (("a.safetensors", "diffusers"), ("b.pth", "original-prefixed")):
        info = loader.inspect_controlnet(tmp_path / f)
        assert (info.family, info.arch, info.layout, info.supported) == ("ControlNet (" + (
            "diffusers layout)" if layout == "diffusers" else "original layout)"), "sd15", layout, True)
        assert info.size_bytes == (tmp_path / f).stat().st_size
    safetensors.torch.save_file({"controlnet_blocks.0.weight": torch.zeros(1), "pos_embed_input.proj.weight": torch.zeros(1)},
                                tmp_path / "sd3.safetensors")
    info = loader.inspect_controlnet(tmp_path / "sd3.safetensors")
    assert (info.family, info.arch, info.supported) == ("SD3 / SD3.5 ControlNet", None, False)
