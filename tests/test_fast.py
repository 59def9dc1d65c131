"""The CUDA fast path (controlnet_core/fast/) gives the plain path's residuals.

CPU part (default suite): off CUDA the fast path is a no-op (identical results); its eager body,
forced onto the CPU with `allow_cpu`, matches the plain path for every setting it handles; the
switches, fp8 storage and channels_last preparation. CUDA part (`-m cuda`, skipped without a GPU):
graph replays against eager (fp32 <= 1e-5, fp16 <= 1e-2), overlap with the reference UNet,
several controls, fp8 and channels_last, weight moves, and fp16/bf16 against fp32.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from comfyui_controlnet_core.controlnet_core import fast
from comfyui_controlnet_core.controlnet_core.config import SD15, SDXL
from comfyui_controlnet_core.controlnet_core.control import Control, ControlSettings, ControlStack
from comfyui_controlnet_core.controlnet_core.host import StepRequest
from comfyui_controlnet_core.controlnet_core.model import ControlNet
from comfyui_controlnet_core.controlnet_core.unet import UNet

TINY_SD15 = dataclasses.replace(SD15, model_channels=32, channel_mult=(1, 2, 2, 2), context_dim=64,
                                hint_block_channels=(16, 16, 32, 32))
TINY_SDXL = dataclasses.replace(
    SDXL, model_channels=64, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2), transformer_depth_middle=2,
    context_dim=128, hint_block_channels=(16, 16, 32, 32), adm_in_channels=96,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def everything(p: float) -> float:
    return 1e9 if p <= 0 else (0.0 if p >= 1 else 10.0 * (1.0 - p))


def random_module_(m: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (zero convs too), well scaled: N(0, 1/fan_in), norms ~1, biases small."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(m.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                v = torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:]))
            elif "norm" in name or "in_layers.0" in name or "out_layers.0" in name:
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            else:
                v = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(v.to(p.dtype))
    return m.eval()


def make_net(cfg=TINY_SD15, seed=0, device="cpu", dtype=torch.float32) -> ControlNet:
    return random_module_(ControlNet(cfg), seed).to(device, dtype)


def make_request(cfg, batch=2, cond_or_uncond=(0, 1), size=4, seed=1, device="cpu", sigma=5.0) -> StepRequest:
    g = torch.Generator().manual_seed(seed)
    y = None if cfg.adm_in_channels is None else torch.randn(batch, cfg.adm_in_channels, generator=g).to(device)
    return StepRequest(
        x=torch.randn(batch, 4, size, size, generator=g).to(device),
        sigma=torch.full((batch,), sigma),
        timesteps=torch.full((batch,), 300.0 + 100 * seed).to(device),
        context=torch.randn(batch, 5, cfg.context_dim, generator=g).to(device),
        y=y, cond_or_uncond=cond_or_uncond,
    )


def hint(batch=1, size=32, seed=2):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def flat(d) -> torch.Tensor:
    return torch.cat([t.double().flatten() for t in [*d["output"], *d["middle"]]])


def rel_err(a, b) -> float:
    a, b = flat(a), flat(b)
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def plain(stack, req):
    with fast.override(enabled=False):
        return stack.residuals(req)


def fast_run(stack, req, **opts):
    with fast.override(**opts):
        return stack.residuals(req)


def started(*controls: Control) -> ControlStack:
    """A stack of these controls after its per-run start (hint embeddings reset)."""
    stack = ControlStack(list(controls))
    stack.pre_run(everything)
    return stack


@pytest.fixture(autouse=True)
def _fresh_runners():
    fast.release()
    fast.STATS.clear()
    yield
    fast.release()


# ------------------------------------------------------------------------------------------------
# CPU: the default suite


def test_noop_off_cuda_identical():
    stack = started(Control(make_net(), hint()))
    req = make_request(TINY_SD15)
    with torch.no_grad():
        a = stack.residuals(req)
        b = plain(stack, req)
    assert sum(fast.STATS.values()) == 0  # nothing ran on the fast path
    for x, y in zip([*a["output"], *a["middle"]], [*b["output"], *b["middle"]]):
        assert torch.equal(x, y)
    assert "sync" not in a


@pytest.mark.parametrize(
    "settings",
    [
        [ControlSettings()],
        [ControlSettings(strength=0.7, weights="soft")],
        [ControlSettings(apply_to="cond-only")],
        [ControlSettings(global_pool=True, strength=1.3)],
        [ControlSettings(), ControlSettings(strength=0.5, weights="diffusers")],
        [ControlSettings(apply_to="cond-only"), ControlSettings(strength=0.8), ControlSettings(global_pool=True)],
    ],
    ids=["plain", "soft", "cond-only", "pool", "two", "three-mixed"],
)
def test_fast_body_matches_plain_on_cpu(settings):
    cfg = TINY_SDXL if len(settings) == 2 else TINY_SD15
    controls = [Control(make_net(cfg, seed=i), hint(seed=i), s) for i, s in enumerate(settings)]
    stack = started(*controls)
    with torch.no_grad():
        for seed in (1, 2, 3):  # new inputs every call: the static buffers must be refilled
            req = make_request(cfg, seed=seed)
            got = fast_run(stack, req, allow_cpu=True)
            want = plain(stack, req)
            assert set(got) == {"input", "middle", "output"}
            assert len(got["output"]) == len(want["output"])
            assert rel_err(got, want) <= 1e-5
    assert fast.STATS["eager"] == 3


def test_fast_body_shape_change_strength_change_and_inactive():
    net = make_net()
    c = Control(net, hint(), ControlSettings(end_percent=0.5))  # active for sigma >= 5
    stack = started(c)
    with torch.no_grad(), fast.override(allow_cpu=True, max_graphs=2):
        for size in (4, 3, 4, 2):
            req = make_request(TINY_SD15, size=size)
            assert rel_err(stack.residuals(req), plain(stack, req)) <= 1e-5
        runner = next(iter(fast.runner._RUNNERS.values()))
        assert len(runner.entries) == 2  # least recently used shape dropped
        c2 = Control(net, hint(), ControlSettings(strength=0.25, end_percent=0.5))
        c.settings, c.weights = c2.settings, c2.weights  # strength changed between calls
        req = make_request(TINY_SD15, size=2)
        assert rel_err(stack.residuals(req), plain(stack, req)) <= 1e-5
        assert stack.residuals(make_request(TINY_SD15, sigma=1.0)) is None


def test_fresh_outputs_and_static_views():
    stack = started(Control(make_net(), hint()))
    with torch.no_grad(), fast.override(allow_cpu=True):
        a = stack.residuals(make_request(TINY_SD15, seed=1))
        b = stack.residuals(make_request(TINY_SD15, seed=2))
        assert a["middle"][0].data_ptr() != b["middle"][0].data_ptr()
        assert not torch.equal(a["middle"][0], b["middle"][0])
        with fast.override(fresh_outputs=False):
            s1 = stack.residuals(make_request(TINY_SD15, seed=1))
            s2 = stack.residuals(make_request(TINY_SD15, seed=2))
        assert s1["middle"][0].data_ptr() == s2["middle"][0].data_ptr()  # the static buffer


def test_weight_replacement_drops_entries():
    net = make_net()
    stack = started(Control(net, hint()))
    req = make_request(TINY_SD15)
    with torch.no_grad(), fast.override(allow_cpu=True):
        stack.residuals(req)
        net.middle_block_out[0].weight = torch.nn.Parameter(net.middle_block_out[0].weight * 2)  # a patcher's swap
        assert rel_err(stack.residuals(req), plain(stack, req)) <= 1e-5


def test_masks_and_grad_mode_use_plain_path():
    c = Control(make_net(), hint(), mask=torch.ones(1, 8, 8))
    stack = started(c)
    with fast.override(allow_cpu=True):
        with torch.no_grad():
            stack.residuals(make_request(TINY_SD15))
        c.mask = None
        stack.residuals(make_request(TINY_SD15))  # grad enabled: plain
    assert sum(fast.STATS.values()) == 0


def test_switches(monkeypatch):
    assert fast.enabled()
    monkeypatch.setenv("CNCORE_FAST", "0")
    assert not fast.enabled()
    stack = started(Control(make_net(), hint()))
    with torch.no_grad(), fast.override(allow_cpu=True):
        stack.residuals(make_request(TINY_SD15))
    assert sum(fast.STATS.values()) == 0
    monkeypatch.delenv("CNCORE_FAST")
    with fast.override(enabled=False):
        assert not fast.enabled()
    assert fast.enabled()
    with pytest.raises(ValueError, match="unknown fast-path option"):
        fast.configure(graph=True)
    with pytest.raises(ValueError, match=">= 1"):
        fast.configure(max_graphs=0)
    assert fast.get_options().graphs is True


@pytest.mark.skipif(not fast.fp8_supported(), reason="no float8 in this torch")
def test_fp8_storage_mechanism_and_memory():
    net = make_net(TINY_SDXL)
    ref = make_net(TINY_SDXL)
    before = fast.weight_bytes(net)
    fast.prepare(net, fp8=True)
    assert any(isinstance(m, fast.Fp8Linear) for m in net.modules())
    assert any(isinstance(m, fast.Fp8Conv2d) for m in net.modules())
    assert net.dtype == torch.float32  # time embedding kept
    # same weights as the dequantized reference -> same function
    with torch.no_grad():
        for (name, m), (_, mr) in zip(net.named_modules(), ref.named_modules()):
            if isinstance(m, (fast.Fp8Linear, fast.Fp8Conv2d)):
                mr.weight.copy_(m.weight)
    req = make_request(TINY_SDXL)
    with torch.no_grad():
        d1, m1 = net(req.x, hint(2), req.timesteps, req.context, req.y)
        d2, m2 = ref(req.x, hint(2), req.timesteps, req.context, req.y)
    for a, b in zip([*d1, m1], [*d2, m2]):
        assert (a - b).norm() <= 1e-5 * b.norm()
    # fp16 weights -> fp8 storage: about half the bytes
    net16 = make_net(TINY_SDXL).half()
    b16 = fast.weight_bytes(net16)
    fast.prepare(net16, fp8=True)
    assert fast.weight_bytes(net16) < 0.62 * b16
    assert fast.weight_bytes(net) < 0.4 * before
    # .to() keeps the fp8 payload and follows the compute dtype
    net16.to(torch.float32)
    lin = next(m for m in net16.modules() if isinstance(m, fast.Fp8Linear))
    assert lin.weight_fp8.dtype == torch.float8_e4m3fn and lin.weight.dtype == torch.float32


def test_channels_last_prepare_same_values_on_cpu():
    net = make_net()
    ref = make_net()
    assert fast.channels_last_pays(net) and not fast.channels_last_pays(make_net(TINY_SDXL))
    with pytest.raises(ValueError):
        fast.prepare(net, channels_last="yes")
    fast.prepare(net, channels_last="auto")
    conv = net.input_blocks[0][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    req = make_request(TINY_SD15)
    with torch.no_grad():
        a = net(req.x, hint(2), req.timesteps, req.context)
        b = ref(req.x, hint(2), req.timesteps, req.context)
    for x, y in zip([*a[0], a[1]], [*b[0], b[1]]):
        assert (x - y).norm() <= 1e-5 * y.norm()


# ------------------------------------------------------------------------------------------------
# CUDA


def _stack(cfgs, device, dtype, n=1, settings=None):
    controls = []
    for i in range(n):
        s = settings[i] if settings else ControlSettings(strength=1.0 - 0.2 * i)
        controls.append(Control(make_net(cfgs, seed=i, device=device, dtype=dtype), hint(seed=i), s))
    return started(*controls)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("cfg", [TINY_SD15, TINY_SDXL], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("n,parallel", [(1, False), (2, False), (2, True)], ids=["1", "2", "2-parallel"])
def test_graph_matches_eager_fp32(cfg, n, parallel):  # parallel streams need two controls
    stack = _stack(cfg, "cuda", torch.float32, n)
    with torch.no_grad(), fast.override(parallel=parallel):
        for seed in range(1, 6):
            req = make_request(cfg, seed=seed, device="cuda")
            got = stack.residuals(req)
            want = plain(stack, req)
            assert rel_err(got, want) <= 1e-5, seed
    assert fast.STATS["capture"] == 1 and fast.STATS["replay"] == 4 and fast.STATS["eager"] == 1


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_graph_matches_eager_half_with_overlap_and_cond_only(dtype):
    settings = [ControlSettings(apply_to="cond-only"), ControlSettings(strength=0.6, global_pool=True)]
    stack = _stack(TINY_SDXL, "cuda", dtype, 2, settings)
    with torch.no_grad(), fast.override(overlap=True, parallel=True):
        for seed in range(1, 5):
            req = make_request(TINY_SDXL, seed=seed, device="cuda")
            got = stack.residuals(req)
            assert "sync" in got
            got.pop("sync")()
            assert rel_err(got, plain(stack, req)) <= 1e-2


@pytest.mark.cuda
@cuda
def test_overlap_with_reference_unet_and_outer_graph():
    cfg = TINY_SD15
    unet = random_module_(UNet(cfg), 7).cuda().half()
    stack = _stack(cfg, "cuda", torch.float16, 2)
    reqs = [make_request(cfg, seed=s, device="cuda") for s in range(1, 5)]
    with torch.no_grad():
        want = [unet(r.x, r.timesteps, r.context, control=plain(stack, r)).float() for r in reqs]
        with fast.override(overlap=True):
            got = [unet(r.x, r.timesteps, r.context, control=stack.residuals(r)).float() for r in reqs]
            for a, b in zip(got, want):
                assert (a - b).norm() <= 1e-2 * b.norm()
            # the whole step captured in an outer graph (the benchmark's GPU timing): the fast path
            # runs its body eagerly inside, forking the side stream into the capture
            r = reqs[0]
            static_x = r.x.clone()
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    unet(static_x, r.timesteps, r.context, control=stack.residuals(
                        StepRequest(static_x, r.sigma, r.timesteps, r.context, None, r.cond_or_uncond)))
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                out = unet(static_x, r.timesteps, r.context, control=stack.residuals(
                    StepRequest(static_x, r.sigma, r.timesteps, r.context, None, r.cond_or_uncond)))
            static_x.copy_(reqs[0].x)
            g.replay()
            torch.cuda.synchronize()
            assert (out.float() - want[0]).norm() <= 1e-2 * want[0].norm()


@pytest.mark.cuda
@cuda
def test_weights_moved_off_and_back_recapture():
    stack = _stack(TINY_SD15, "cuda", torch.float16, 1)
    net = stack.controls[0].net
    with torch.no_grad():
        for _ in range(3):
            stack.residuals(make_request(TINY_SD15, device="cuda"))
        net.cpu()
        torch.cuda.empty_cache()
        net.cuda()
        req = make_request(TINY_SD15, seed=9, device="cuda")
        assert rel_err(stack.residuals(req), plain(stack, req)) <= 1e-2
    assert fast.STATS["capture"] == 1  # the old graph was dropped; the new entry starts eager


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("what", ["fp8", "channels_last"])
def test_fp8_and_channels_last_in_graphs(what):
    stack = _stack(TINY_SDXL, "cuda", torch.float16, 1)
    net = stack.controls[0].net
    fast.prepare(net, fp8=what == "fp8", channels_last=what == "channels_last")
    with torch.no_grad():
        for seed in range(1, 5):
            req = make_request(TINY_SDXL, seed=seed, device="cuda")
            got = stack.residuals(req)
            want = plain(stack, req)
            assert rel_err(got, want) <= 1e-2
            assert got["output"][0].is_contiguous()
    assert fast.STATS["replay"] >= 2


def _dtype_parity(cfg, size, batch=2):
    import copy

    net32 = make_net(cfg, seed=3, device="cuda", dtype=torch.float32)
    req = make_request(cfg, batch=batch, size=size, device="cuda")
    h = torch.rand(1, 3, 8 * size, 8 * size, generator=torch.Generator().manual_seed(5)).cuda()
    errs = {}
    tf32 = torch.backends.cudnn.allow_tf32
    with torch.no_grad():
        torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
        try:
            ref = net32(req.x, h, req.timesteps, req.context, req.y)
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        b = torch.cat([o.double().flatten() for o in [*ref[0], ref[1]]])
        for dtype in (torch.float16, torch.bfloat16):
            net = copy.deepcopy(net32).to(dtype)
            out = net(req.x, h, req.timesteps, req.context, req.y)
            a = torch.cat([o.double().flatten() for o in [*out[0], out[1]]])
            errs[str(dtype)] = ((a - b).norm() / b.norm()).item()
            del net
    return errs


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("cfg", [TINY_SD15, TINY_SDXL], ids=["sd15", "sdxl"])
def test_half_precision_matches_fp32_tiny(cfg):
    errs = _dtype_parity(cfg, 8)
    _check_half(errs)


@pytest.mark.cuda
@pytest.mark.slow
@cuda
@pytest.mark.parametrize("cfg", [SD15, SDXL], ids=["sd15", "sdxl"])
def test_half_precision_matches_fp32_full_size(cfg):
    errs = _dtype_parity(cfg, 32)
    print(cfg.arch, errs)
    _check_half(errs)


def _check_half(errs):
    """fp16 within 1e-2 (measured on the H100: 1.2e-3 to 1.3e-3). bf16 keeps 3 fewer significand
    bits, so its rounding error is 8x fp16's: measured 0.95e-2 to 1.14e-2 on random weights, i.e.
    rounding alone (the 8x ratio holds), not a bug; it is held to 1.5e-2."""
    assert errs["torch.float16"] <= 1e-2, errs
    assert errs["torch.bfloat16"] <= 1.5e-2, errs
