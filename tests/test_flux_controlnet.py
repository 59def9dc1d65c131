"""Flux ControlNets (controlnet_core/flux_controlnet.py) against diffusers 0.42's FluxControlNetModel
and FluxTransformer2DModel: per-block outputs, the host output with the control, the tiling rules,
the layouts (diffusers, XLabs native, BFL-named latent), union modes, and the refusals."""

from __future__ import annotations

import pytest
import torch

from comfyui_controlnet_core.controlnet_core.control import Control, ControlSettings, ControlStack
from comfyui_controlnet_core.controlnet_core.errors import InputError
from comfyui_controlnet_core.controlnet_core.formats import detect
from comfyui_controlnet_core.controlnet_core.host import BlockMap, StepRequest
from comfyui_controlnet_core.controlnet_core.loader import inspect_controlnet, load_controlnet

from helpers_flux import diffusers_controlnet, diffusers_host, ids, inputs, pack, rel, save_state_dict

pytest.importorskip("diffusers")
TOL = 1e-4


def _diffusers_samples(net, inp, mode=None, scale=1.0, pixel=False):
    x = inp["x"]
    txt_ids, img_ids = ids(x.shape[-2], x.shape[-1], inp["context"].shape[1])
    cond = inp["pixel_hint"] * 2 - 1 if pixel else pack(inp["latent_hint"])
    with torch.no_grad():
        double, single = net(
            hidden_states=pack(x), controlnet_cond=cond,
            controlnet_mode=None if mode is None else torch.tensor([[mode]] * x.shape[0]),
            conditioning_scale=scale, encoder_hidden_states=inp["context"], pooled_projections=inp["y"],
            timestep=inp["t"], img_ids=img_ids, txt_ids=txt_ids, guidance=inp["guidance"], return_dict=False,
        )
    return list(double or []), list(single or [])


def _ours(net, inp, modes=(), pixel=False):
    hint = net.embed_hint(inp["pixel_hint"] if pixel else inp["latent_hint"])
    with torch.no_grad():
        return net.forward(inp["x"], hint, inp["t"], inp["context"], inp["y"], inp["guidance"], modes)


CASES = {  # name: (double, single, modes, mode used)
    "instantx-canny-5-0": (5, 0, None, None),
    "union-2-4-mode-3": (2, 4, 10, 3),
    "shakker-depth-4-1": (4, 1, None, None),
    "union-pro-2-6-0": (6, 0, None, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_diffusers_layout_matches_diffusers_per_block(tmp_path, case):
    depth, single, modes, mode = CASES[case]
    ref = diffusers_controlnet(depth, single, modes=modes, seed=3)
    save_state_dict(ref.state_dict(), tmp_path / "cn.safetensors")
    net = load_controlnet(tmp_path / "cn.safetensors")
    assert net.family == "Flux ControlNet" and net.source_format == "diffusers" and net.hint_space == "latent"
    assert (net.config.depth, net.config.depth_single, net.config.num_modes) == (depth, single, modes or 0)
    inp = inputs()
    want_d, want_s = _diffusers_samples(ref, inp, mode)
    got_d, got_s = _ours(net, inp, () if mode is None else (mode,))
    assert len(got_d) == depth and len(got_s) == single
    for a, b in zip(got_d + got_s, want_d + want_s):
        assert rel(a, b) <= TOL
    assert min(float(b.abs().max()) for b in want_d + want_s) > 0.1  # re-randomised: no zero outputs


def test_xlabs_pixel_stem_both_layouts(tmp_path):
    """XLabs: the diffusers layout (which ComfyUI misreads as a latent net, dropping the stem) and
    the native BFL layout of the same weights both load as pixel-hint nets matching diffusers."""
    ref = diffusers_controlnet(2, 0, pixel=True, seed=5)
    save_state_dict(ref.state_dict(), tmp_path / "xlabs-diffusers.safetensors")
    net = load_controlnet(tmp_path / "xlabs-diffusers.safetensors")
    assert net.hint_space == "pixel" and net.tiling == "cyclic" and net.source_format == "diffusers"
    save_state_dict(net.state_dict(), tmp_path / "flux-canny-controlnet-v3.safetensors")
    native = load_controlnet(tmp_path / "flux-canny-controlnet-v3.safetensors")
    assert native.source_format == "xlabs" and native.hint_space == "pixel"
    inp = inputs()
    want_d, _ = _diffusers_samples(ref, inp, pixel=True)
    for model in (net, native):
        got_d, got_s = _ours(model, inp, pixel=True)
        assert not got_s
        for a, b in zip(got_d, want_d):
            assert rel(a, b) <= TOL


def test_latent_net_with_bfl_names_stays_latent(tmp_path):
    """A latent (InstantX) net re-saved with BFL names: ComfyUI builds it as XLabs; we do not."""
    ref = diffusers_controlnet(2, 1, seed=7)
    save_state_dict(ref.state_dict(), tmp_path / "a.safetensors")
    native_sd = load_controlnet(tmp_path / "a.safetensors").state_dict()
    assert "double_blocks.0.img_attn.norm.key_norm.scale" in native_sd
    save_state_dict(native_sd, tmp_path / "b.safetensors")
    net = load_controlnet(tmp_path / "b.safetensors")
    assert net.source_format == "native" and net.hint_space == "latent"
    inp = inputs()
    want_d, want_s = _diffusers_samples(ref, inp)
    got_d, got_s = _ours(net, inp)
    for a, b in zip(got_d + got_s, want_d + want_s):
        assert rel(a, b) <= TOL


def test_full_width_single_block_matches_diffusers(tmp_path):
    """Flux's real width (24 heads of 128, axes 16/56/56, T5 4096, CLIP 768) at 1 double + 1 single block."""
    ref = diffusers_controlnet(1, 1, modes=10, seed=9, heads=24, head_dim=128, axes=(16, 56, 56), context=4096,
                               pooled=768)
    net = load_controlnet(ref.state_dict(), name="full-width")
    assert net.config.axes_dim == (16, 56, 56) and net.config.num_heads == 24
    g = torch.Generator().manual_seed(2)
    inp = {"x": torch.randn(1, 16, 4, 6, generator=g), "latent_hint": torch.randn(1, 16, 4, 6, generator=g),
           "context": torch.randn(1, 3, 4096, generator=g), "y": torch.randn(1, 768, generator=g),
           "t": torch.tensor([0.4]), "guidance": torch.tensor([4.0])}
    want_d, want_s = _diffusers_samples(ref, inp, 2)
    got_d, got_s = _ours(net, inp, (2,))
    for a, b in zip(got_d + got_s, want_d + want_s):
        assert rel(a, b) <= TOL


# ------------------------------------------------------------------ the control in the host

def _host_forward(host, inp, double=None, single=None, repeat=False):
    x = inp["x"]
    txt_ids, img_ids = ids(x.shape[-2], x.shape[-1], inp["context"].shape[1])
    with torch.no_grad():
        return host(hidden_states=pack(x), encoder_hidden_states=inp["context"], pooled_projections=inp["y"],
                    timestep=inp["t"], img_ids=img_ids, txt_ids=txt_ids, guidance=inp["guidance"],
                    controlnet_block_samples=double, controlnet_single_block_samples=single,
                    controlnet_blocks_repeat=repeat, return_dict=False)[0]


class _FakeVAE:
    """A fixed stand-in for the host's VAE + latent format: 8x area pooling, then 3 -> 16 channels."""

    def __init__(self):
        self.proj = torch.randn(16, 3, generator=torch.Generator().manual_seed(11))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(image * 2 - 1, 8)
        return torch.einsum("oc,bchw->bohw", self.proj, pooled)


def _request(inp, cond_or_uncond=(0,)):
    return StepRequest(inp["x"], inp["t"], inp["t"], inp["context"], inp["y"], cond_or_uncond, guidance=inp["guidance"])


@pytest.mark.parametrize("case", ["instantx-canny-5-0", "union-2-4-mode-3", "xlabs-2-0"])
def test_control_in_diffusers_host(case, tmp_path):
    """Our Control's dict (ComfyUI's tiling, tokens, strength) fed one-to-one into diffusers' host =
    diffusers' own ControlNet samples with its own tiling; and the control visibly moves the output."""
    pixel = case.startswith("xlabs")
    depth, single, modes, mode = CASES.get(case, (2, 0, None, None))
    ref = diffusers_controlnet(depth, single, modes=modes, pixel=pixel, seed=13)
    net = load_controlnet(ref.state_dict(), name=case)
    vae = _FakeVAE()
    inp = inputs()
    inp["latent_hint"] = vae(inp["pixel_hint"])
    strength = 0.6
    model = net if mode is None else net.select_type("blur")  # Flux Union mode 3 is blur
    control = Control(model, inp["pixel_hint"], ControlSettings(strength=strength), hint_encoder=vae)
    control.pre_run(lambda p: 1.0 - p)
    got = control.residuals(_request(inp, (0,)))
    assert set(got) >= {"input", "middle", "output"} and len(got["input"]) == 19
    assert len(got["output"]) == (38 if single else 0)
    # strength is applied once to each distinct output: the repeats are the same tensor
    assert got["input"][0] is got["input"][1] if not pixel else got["input"][0] is got["input"][2]
    host = diffusers_host()
    want_d, want_s = _diffusers_samples(ref, inp, mode, scale=strength, pixel=pixel)
    want = _host_forward(host, inp, want_d, want_s or None, repeat=pixel)
    ours = _host_forward(host, inp, got["input"], got["output"] or None)
    plain = _host_forward(host, inp)
    assert rel(ours, want) <= TOL
    assert rel(plain, want) > 0.05  # the control moves the output


def test_tiling_rules():
    assert BlockMap(5, 19, "consecutive").sources() == [i // 4 for i in range(19)]
    assert BlockMap(2, 19, "cyclic").sources() == [i % 2 for i in range(19)]
    assert BlockMap(10, 38, "consecutive").sources() == [i // 4 for i in range(38)]
    assert BlockMap(6, 19, "consecutive").sources() == [i // 4 for i in range(19)]
    assert BlockMap(0, 38, "consecutive").sources() == []


def test_mask_acts_on_the_token_grid():
    ref = diffusers_controlnet(1, 1, seed=17)
    net = load_controlnet(ref.state_dict(), name="m")
    inp = inputs(batch=1)
    mask = torch.zeros(1, 64, 96)
    mask[:, :, :48] = 1.0  # left half of the image
    control = Control(net, inp["pixel_hint"], mask=mask, hint_encoder=_FakeVAE())
    control.pre_run(lambda p: 1.0 - p)
    out = control.residuals(_request(inp, (0,)))
    tokens = out["input"][0].reshape(1, 4, 6, -1)  # th=4, tw=6
    assert tokens[:, :, 3:].abs().max() == 0 and tokens[:, :, :3].abs().min() >= 0 and tokens[:, :, :3].abs().max() > 0


def test_two_flux_controlnets_sum():
    a = load_controlnet(diffusers_controlnet(2, 0, seed=21).state_dict(), name="a")
    b = load_controlnet(diffusers_controlnet(3, 2, seed=22).state_dict(), name="b")
    inp = inputs()
    vae = _FakeVAE()
    ca, cb = (Control(n, inp["pixel_hint"], hint_encoder=vae) for n in (a, b))
    stack = ControlStack([ca, cb])
    stack.pre_run(lambda p: 1.0 - p)
    both = stack.residuals(_request(inp))
    ra, rb = ca.residuals(_request(inp)), cb.residuals(_request(inp))
    assert len(both["input"]) == 19 and len(both["output"]) == 38
    assert torch.allclose(both["input"][7], ra["input"][7] + rb["input"][7])
    assert torch.equal(both["output"][5], rb["output"][5])


# ------------------------------------------------------------------ detection and refusals

def test_detection_and_label(tmp_path):
    ref = diffusers_controlnet(1, 0, pixel=True, seed=1)
    save_state_dict(ref.state_dict(), tmp_path / "x.safetensors")
    info = inspect_controlnet(tmp_path / "x.safetensors")
    assert info.supported and info.arch == "flux" and info.layout == "diffusers"
    assert "pixel hint" in info.family
    found = detect.detect(ref.state_dict().keys(), "x")
    assert found.family == detect.FLUX


def test_union_modes_are_flux_names_and_pro2_refuses_a_type():
    union = load_controlnet(diffusers_controlnet(1, 1, modes=10, seed=2).state_dict(), name="union")
    assert union.control_types[:3] == ("canny", "tile", "depth")
    assert union.select_type("pose").index == 4 and union.select_type("auto") is union
    with pytest.raises(InputError, match="no Flux Union control mode"):
        union.select_type("openpose")
    pro2 = load_controlnet(diffusers_controlnet(2, 0, seed=3).state_dict(), name="pro2.safetensors")
    with pytest.raises(InputError, match=r"'pro2.safetensors' has no control modes .*Union-Pro-2.0.*set control_type to 'auto'"):
        pro2.select_type("canny")


def test_latent_net_without_vae_is_refused():
    net = load_controlnet(diffusers_controlnet(1, 0, seed=4).state_dict(), name="instantx")
    with pytest.raises(InputError, match=r"takes its hint as a latent: connect the VAE"):
        Control(net, torch.rand(1, 64, 64, 3))


def test_wrong_latent_or_text_is_a_sentence():
    net = load_controlnet(diffusers_controlnet(1, 0, seed=4).state_dict(), name="instantx")
    inp = inputs(batch=1)
    hint = net.embed_hint(inp["latent_hint"])
    with pytest.raises(InputError, match="takes the Flux latent"):
        net.forward(torch.randn(1, 4, 8, 12), hint, inp["t"], inp["context"])
    with pytest.raises(InputError, match="T5 text conditioning of width 32"):
        net.forward(inp["x"], hint, inp["t"], torch.randn(1, 5, 768))


def test_flux_and_sd_controls_do_not_stack():
    from helpers_models import make_tiny_config, random_controlnet

    flux = load_controlnet(diffusers_controlnet(1, 0, seed=4).state_dict(), name="flux")
    sd = random_controlnet(make_tiny_config("sd15"))
    with pytest.raises(InputError, match="cannot be combined"):
        ControlStack([Control(flux, torch.rand(1, 64, 64, 3), hint_encoder=_FakeVAE()), Control(sd, torch.rand(1, 64, 64, 3))])


# ------------------------------------------------------------------ the control object (no ComfyUI)

def _flux_model(kind="flux"):
    from types import SimpleNamespace

    from test_nodes import Sampling

    return SimpleNamespace(model_sampling=Sampling(), latent_format=None, diffusion_model=None,
                           model_config=SimpleNamespace(unet_config={"image_model": kind, "context_in_dim": 32}))


def test_host_checks_in_the_control_object():
    """A Flux ControlNet on an SD1.5 UNet and an SD1.5 ControlNet on Flux: a sentence at pre_run."""
    from test_nodes import StandInControl, fake_model
    from helpers_models import make_tiny_config, random_controlnet
    from comfyui_controlnet_core.nodes.control_object import NetHandle

    flux = NetHandle(load_controlnet(diffusers_controlnet(1, 0, seed=4).state_dict(), name="x"), object(), "flux-cn.safetensors")
    c = StandInControl(flux).copy().set_cond_hint(torch.rand(1, 3, 64, 64), 1.0, (0.0, 1.0), vae=_FakeVAE())
    with pytest.raises(InputError, match=r"'flux-cn.safetensors' is made for Flux.1 models .* is SD1.x \(a UNet\)"):
        c.pre_run(fake_model(768), lambda p: 1.0 - p)
    c.pre_run(_flux_model("chroma"), lambda p: 1.0 - p)  # Chroma has Flux's blocks: accepted
    sd = NetHandle(random_controlnet(make_tiny_config("sd15")), object(), "sd15-canny.safetensors")
    c = StandInControl(sd).copy().set_cond_hint(torch.rand(1, 3, 64, 64), 1.0, (0.0, 1.0))
    with pytest.raises(InputError, match=r"'sd15-canny.safetensors' is made for SD1.x models, but .* is a Flux model \(not a Stable Diffusion UNet\)"):
        c.pre_run(_flux_model(), lambda p: 1.0 - p)


def test_control_object_feeds_guidance_pooled_and_the_vae_latent():
    """The mixin's get_control on a Flux net: latent hint through the connected VAE, y and guidance
    from the cond, a dict of 19 / 38 token lists equal to the Control's own."""
    from test_nodes import StandInControl
    from comfyui_controlnet_core.nodes.control_object import NetHandle

    class Flat:  # Flux's sampling: input as is, timestep = sigma
        def percent_to_sigma(self, p):
            return 1e9 if p <= 0 else 0.0 if p >= 1 else 1.0 - p

        def calculate_input(self, sigma, x):
            return x

        def timestep(self, sigma):
            return sigma

    net = load_controlnet(diffusers_controlnet(2, 3, seed=8).state_dict(), name="x")
    vae = _FakeVAE()

    class ComfyVAE:  # ComfyUI's VAE takes BHWC pixels
        def encode(self, pixels):
            return vae(pixels.movedim(-1, 1))

    model = _flux_model()
    model.model_sampling = Flat()
    inp = inputs(batch=2)
    hint = inp["pixel_hint"][:1]
    c = StandInControl(NetHandle(net, object(), "flux")).copy().set_cond_hint(hint, 0.5, (0.0, 1.0), vae=ComfyVAE())
    c.pre_run(model, model.model_sampling.percent_to_sigma)
    cond = {"c_crossattn": inp["context"], "y": inp["y"], "guidance": inp["guidance"]}
    got = c.get_control(inp["x"], inp["t"], cond, 2, {"cond_or_uncond": [0, 1]})
    control = Control(net, hint, ControlSettings(strength=0.5), hint_encoder=vae)
    control.pre_run(model.model_sampling.percent_to_sigma)
    want = control.residuals(_request(inp, (0, 1)))
    assert len(got["input"]) == 19 and len(got["output"]) == 38
    for a, b in zip(got["input"] + got["output"], want["input"] + want["output"]):
        assert torch.allclose(a, b, rtol=0, atol=0)
    no_guidance = c.get_control(inp["x"], inp["t"], {k: v for k, v in cond.items() if k != "guidance"}, 2,
                                {"cond_or_uncond": [0, 1]})
    assert not torch.allclose(no_guidance["input"][0], got["input"][0])  # guidance reaches the net


def test_fp8_file_keeps_fp8_storage_exactly(tmp_path):
    """A float8_e4m3fn file loaded wide (upcast to fp16/fp32) then stored as fp8 by fast.prepare, as
    the adapter does for DiT nets under --fp8_e4m3fn-unet (without the flag an fp8 file is stored as
    it is, test_compute_dtype.py): the e4m3 values are kept exactly (scale 1), the weights take
    half the memory of fp16, and the outputs equal the upcast model's."""
    from comfyui_controlnet_core.controlnet_core import fast

    if not fast.fp8_supported():
        pytest.skip("this torch has no float8_e4m3fn")
    ref = diffusers_controlnet(2, 2, seed=31)
    sd = {k: v.to(torch.float8_e4m3fn) for k, v in ref.state_dict().items()}
    save_state_dict(sd, tmp_path / "cn-fp8.safetensors")
    upcast = load_controlnet(tmp_path / "cn-fp8.safetensors", dtype=torch.float32)
    assert upcast.checkpoint_dtype == torch.float8_e4m3fn
    stored = fast.prepare(load_controlnet(tmp_path / "cn-fp8.safetensors", dtype=torch.float32), fp8=True)
    layer = stored.double_blocks[0].img_attn.qkv
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and float(layer.weight_scale) == 1.0
    assert torch.equal(layer.weight, upcast.double_blocks[0].img_attn.qkv.weight)
    assert fast.weight_bytes(stored) < 0.3 * fast.weight_bytes(upcast)  # fp8 against fp32: about a quarter
    inp = inputs()
    # the weights are bitwise equal (above); the outputs may differ in the last bits where oneDNN's
    # reduction order depends on the thread count (equal with one thread, 1e-7-level with two)
    for a, b in zip(sum(_ours(stored, inp), []), sum(_ours(upcast, inp), [])):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6
    # the adapter's way (half the load peak): read into fp16 (exact for e4m3), store fp8, then compute in fp32
    via16 = fast.prepare(load_controlnet(tmp_path / "cn-fp8.safetensors", dtype=torch.float16), fp8=True).to(torch.float32)
    assert via16.dtype == torch.float32 and via16.double_blocks[0].img_attn.qkv.weight_fp8.dtype == torch.float8_e4m3fn
    for a, b in zip(sum(_ours(via16, inp), []), sum(_ours(upcast, inp), [])):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6


def test_mistoline_layout_is_read():
    """TheMisto's MistoLine: BFL names, `input_cond_block.encoder` stem, SiLU'd `.linear` output
    blocks, single blocks under `single_controlnet_blocks.` (values checked against ComfyUI's class in
    tests/test_comfyui_flux.py)."""
    from comfyui_controlnet_core.controlnet_core.flux_controlnet import FluxControlNet, FluxControlNetConfig

    cfg = FluxControlNetConfig(hidden_size=32, num_heads=2, depth=2, depth_single=1, context_dim=32, vec_dim=24,
                               mlp_hidden=128, axes_dim=(4, 6, 6), hint="pixel", stem="mistoline")
    # values drawn here: the model's layers skip weight init (as ComfyUI's ops), so its own tensors are
    # uninitialised memory, which can hold NaN depending on what ran before
    gen = torch.Generator().manual_seed(0)
    sd = {("single_controlnet_blocks." + k[len("controlnet_single_blocks."):] if k.startswith("controlnet_single_blocks.")
           else k): 0.1 * torch.randn(v.shape, generator=gen) for k, v in FluxControlNet(cfg).state_dict().items()}
    assert "controlnet_blocks.0.linear.weight" in sd and "input_cond_block.encoder.18.weight" in sd
    assert detect.detect(sd.keys(), "m").layout == "mistoline"
    net = load_controlnet(sd, name="mistoLine_flux.dev.safetensors")
    assert net.config.stem == "mistoline" and net.hint_space == "pixel" and net.tiling == "cyclic"
    inp = inputs(batch=1)
    double, single = _ours(net, inp, pixel=True)
    assert len(double) == 2 and len(single) == 1 and double[0].shape == (1, 24, 32)
    assert (double[0] >= -0.2785).all()  # SiLU's minimum: the blocks end in a SiLU


def test_truncated_file_is_refused_naming_the_family(tmp_path):
    """A Flux ControlNet cut short (an interrupted 6 GB download): a LoadError that names the family
    from the header, not a crash."""
    from comfyui_controlnet_core.controlnet_core.errors import LoadError

    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_state_dict(diffusers_controlnet(2, 2, modes=10, seed=1).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"Its header says it is a Flux ControlNet"):
        load_controlnet(path)


def test_xlabs_given_a_vae_ignores_it_and_says_so_once(caplog):
    import logging

    from test_nodes import StandInControl, conditioning
    from comfyui_controlnet_core.nodes.adapter import apply_control
    from comfyui_controlnet_core.nodes.control_object import NetHandle

    net = load_controlnet(diffusers_controlnet(2, 0, pixel=True, seed=5).state_dict(), name="x")
    obj = StandInControl(NetHandle(net, object(), "flux-canny-controlnet-v3.safetensors"))
    image = torch.rand(1, 64, 64, 3)
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            pos, neg = apply_control(conditioning(32), conditioning(32), obj, image, 0.8, 0.0, 1.0, vae=object())
    notes = [r for r in caplog.records if "takes its hint as pixels" in r.getMessage()]
    assert len(notes) == 1 and "flux-canny-controlnet-v3.safetensors" in notes[0].getMessage()
    assert pos[0][1]["control"].cncore_stack().controls[0].hint_encoder is None  # the VAE is not used


def test_inpaint_net_gets_the_mask_after_the_latent():
    """A 17-channel (AliMama inpaint) net: the control object appends the mask ComfyUI's inpaint node
    hands over (resized to the latent, nearest) after the VAE latent; without one, ones (checked
    against ComfyUI in test_comfyui_flux)."""
    from test_nodes import StandInControl
    from comfyui_controlnet_core.controlnet_core.flux_controlnet import FluxControlNet, FluxControlNetConfig
    from comfyui_controlnet_core.nodes.control_object import NetHandle

    cfg = FluxControlNetConfig(hidden_size=32, num_heads=2, depth=1, depth_single=0, context_dim=32, vec_dim=24,
                               mlp_hidden=128, axes_dim=(4, 6, 6), hint_channels=68)
    net = FluxControlNet(cfg)
    assert net.latent_channels == 17 and net.mask_channels == 1
    vae = _FakeVAE()

    class ComfyVAE:
        def encode(self, pixels):
            return vae(pixels.movedim(-1, 1))

    image = torch.rand(1, 3, 64, 96)
    mask = torch.zeros(1, 1, 64, 96)
    mask[..., 32:, :] = 1.0
    c = StandInControl(NetHandle(net, object(), "inpaint")).copy()
    c.set_cond_hint(image, 1.0, (0.0, 1.0), vae=ComfyVAE(), extra_concat=[mask])
    latent = c.cncore_hint_encoder(net)(image)
    assert latent.shape == (1, 17, 8, 12)
    assert torch.equal(latent[:, :16], vae(image)) and torch.equal(latent[:, 16:], mask[..., ::8, ::8])
    c.set_cond_hint(image, 1.0, (0.0, 1.0), vae=ComfyVAE())
    assert torch.equal(c.cncore_hint_encoder(net)(image)[:, 16:], torch.ones(1, 1, 8, 12))
