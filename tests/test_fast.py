"""The CUDA fast path (controlnet_core/fast/) gives the plain path's residuals.

CPU part (default suite): off CUDA the fast path is a no-op (identical results); its eager body,
forced onto the CPU with `allow_cpu`, matches the plain path for every setting it handles; the
switches, fp8 storage and channels_last preparation; runners released with their controls and on
request; the memory gate of graph capture (free memory mocked); the wait-on-read residual dict.
CUDA part (`-m cuda`, skipped without a GPU): graph replays against eager in the same dtype (the
tolerances below are set from the H100 measurements, with the reason beside each), overlap with
the reference UNet and with a host that only reads the dict, several controls, fp8 and
channels_last, weight moves, graph memory given back, graphs refused when memory is short, the
cudaMallocAsync allocator ComfyUI runs with, and fp16/bf16 against fp32.
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

# Graph replay against the eager path in the same dtype. Both run the same kernels; they differ
# only where the fast path fuses the stack's sum (`addcmul_`: one rounding where the plain path has
# two), so each element is at most one unit roundoff u apart. Measured on the H100 (fp16, full
# size, benchmarks/results/bench_step_h100.md): 0 for one control, 2.6e-4 for two. Allowed: 2u.
U_FP16, U_BF16 = 2.0**-11, 2.0**-8  # 4.9e-4, 3.9e-3
SAME_DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 2 * U_FP16, torch.bfloat16: 2 * U_BF16}


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
    # channels_last changes the order of oneDNN's fp32 reductions, and with 2 threads it differs
    # again (1.3e-5 relative measured on the 2-core CI machine, 0 with one thread): the project's
    # fp32 parity bound, 1e-4 relative, is the right one here
    for x, y in zip([*a[0], a[1]], [*b[0], b[1]]):
        assert (x - y).norm() <= 1e-4 * y.norm()


def test_channels_last_net_keeps_its_layout_through_attention():
    """The attention blocks give back their input's layout: a channels_last-prepared net stays
    channels_last inside (what the prepare measured), a plain one stays NCHW (layers.SpatialTransformer)."""
    net = make_net()
    block = next(m for m in net.modules() if type(m).__name__ == "SpatialTransformer")
    c = block.norm.num_channels
    x = torch.randn(2, c, 4, 6)
    ctx = torch.randn(2, 5, net.config.context_dim)
    with torch.no_grad():
        plain = block(x, ctx)
        fast.prepare(net, channels_last=True)
        cl = block(x.to(memory_format=torch.channels_last), ctx)
    assert plain.is_contiguous()
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    assert (cl - plain).norm() <= 1e-5 * plain.norm()


def test_runner_dies_with_its_controls():
    """A run's controls dropped (ComfyUI's cleanup drops its stack) -> its runner, with its graphs
    and static buffers, goes too: nothing of a finished run stays in the module-level cache."""
    import gc

    net = make_net()
    stack = started(Control(net, hint()))
    with torch.no_grad(), fast.override(allow_cpu=True):
        stack.residuals(make_request(TINY_SD15))
    assert len(fast.runner._RUNNERS) == 1
    del stack
    gc.collect()
    assert fast.runner._RUNNERS == {}


def test_release_by_stack_control_or_net():
    net_a, net_b = make_net(seed=0), make_net(seed=1)
    a, b = started(Control(net_a, hint())), started(Control(net_b, hint()))
    both = started(Control(net_a, hint(seed=4)), Control(net_b, hint(seed=5)))
    with torch.no_grad(), fast.override(allow_cpu=True):
        for s in (a, b, both):
            s.residuals(make_request(TINY_SD15))
    assert len(fast.runner._RUNNERS) == 3
    assert fast.release(a) == 1 and len(fast.runner._RUNNERS) == 2
    assert fast.release(a.controls[0]) == 0  # already gone
    assert fast.release(net_b) == 2  # b and the stack that uses net_b
    assert fast.runner._RUNNERS == {}
    with torch.no_grad(), fast.override(allow_cpu=True):
        a.residuals(make_request(TINY_SD15))  # runs again after a release (a new runner)
    assert fast.release() == 1


class _FakeEntry:
    def __init__(self, n_bytes: int):
        self.out_flat = torch.empty(n_bytes // 2, dtype=torch.float16)
        self.graph = None
        self.graph_failed = False


def test_graphs_only_while_the_device_keeps_memory_free(monkeypatch, caplog):
    """The memory gate of a capture, with the driver's free-memory query mocked: it asks for the
    graph's need (twice its residual bytes, or the most a capture took so far) plus `min_free_mib`;
    below that it drops every graph, keeps the entry eager and logs once."""
    r = fast.runner
    mib = 2**20
    dev = torch.device("cpu")  # the gate only reads dev.index; the real one is a CUDA device
    entry = _FakeEntry(10 * mib)
    assert r.graph_need_bytes(entry, dev) == 20 * mib
    free = {"bytes": 0}
    monkeypatch.setattr(r, "_free_device_bytes", lambda d: free["bytes"])
    monkeypatch.setattr(r, "_LOGGED", set())
    opts = fast.FastOptions(min_free_mib=100)
    free["bytes"] = 120 * mib
    assert r._memory_allows_graph(entry, dev, opts)
    # a graph of another runner exists when memory runs short: it is dropped with its pool
    other = _FakeEntry(mib)
    other.graph = object()
    holder = type("R", (), {"entries": {"k": other}, "controls": lambda self: []})()
    monkeypatch.setitem(r._RUNNERS, ("x",), holder)
    free["bytes"] = 119 * mib
    with caplog.at_level("WARNING", logger=r.__name__):
        assert not r._memory_allows_graph(entry, dev, opts)
        assert not r._memory_allows_graph(entry, dev, opts)
    assert other.graph is None and other.graph_failed
    assert fast.STATS["graphs_dropped_memory"] == 2
    said = [m for m in caplog.messages if "without graphs" in m]
    assert len(said) == 1 and "119 MiB" in said[0] and "20 MiB" in said[0]
    # a measured capture replaces the estimate
    monkeypatch.setitem(r._NEED, None, 50 * mib)
    assert r.graph_need_bytes(entry, dev) == 50 * mib
    free["bytes"] = 150 * mib
    assert r._memory_allows_graph(entry, dev, opts)
    with pytest.raises(ValueError, match=">= 0"):
        fast.configure(min_free_mib=-1)


class _Recorder:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


def _guarded():
    rec = _Recorder()
    a, b = torch.ones(2), torch.zeros(2)
    return fast.on_read({"input": [], "middle": [a], "output": [a, b], "sync": rec}), rec


@pytest.mark.parametrize("read", [
    lambda d: d["middle"], lambda d: d.get("output"), lambda d: d.pop("output"), lambda d: list(d.items()),
    lambda d: list(d.values()), lambda d: [d[k] for k in d], lambda d: dict(d), lambda d: {**d},
    lambda d: {}.update(d), lambda d: d.copy(), lambda d: __import__("copy").copy(d),
    lambda d: __import__("copy").deepcopy(d), lambda d: d | {}, lambda d: {} | d, lambda d: repr(d),
    lambda d: d == {}, lambda d: d.setdefault("middle"), lambda d: d.popitem(),
], ids=["getitem", "get", "pop", "items", "values", "iter", "dict", "unpack", "update", "copy", "copy.copy",
        "deepcopy", "or", "ror", "repr", "eq", "setdefault", "popitem"])
def test_overlapped_dict_waits_before_any_read_that_hands_out_tensors(read):
    d, rec = _guarded()
    assert "sync" not in d and rec.calls == 0 and d.pending
    read(d)
    assert rec.calls == 1 and not d.pending
    d.get("middle"), list(d.items())
    assert rec.calls == 1  # once


def test_overlapped_dict_reads_of_empty_slots_and_keys_do_not_wait():
    """What ComfyUI's UNet does before its middle block: `"input" in control` and
    `len(control["input"]) > 0` after every input block (a ControlNet's "input" is empty)."""
    d, rec = _guarded()
    for _ in range(12):
        assert "input" in d and len(d["input"]) == 0
    assert len(d) == 3 and set(d.keys()) == {"input", "middle", "output"} and d.get("missing") is None
    assert rec.calls == 0
    assert d["middle"][0].sum() == 2 and rec.calls == 1  # the first read of a real residual
    assert fast.on_read(None) is None
    plain_dict = {"input": [], "middle": [], "output": []}
    assert fast.on_read(plain_dict) is plain_dict


def test_store_fp8_takes_host_layer_classes_but_not_lora_layers():
    class HostLinear(torch.nn.Linear):  # e.g. comfy.ops' layers: same math, their own casting
        cast_weights = False

    class LoraLinear(torch.nn.Linear):  # extra parameters change the math: left alone
        def __init__(self, *a):
            super().__init__(*a)
            self.up = torch.nn.Parameter(torch.zeros(4, 1))

    net = torch.nn.Sequential(HostLinear(4, 4), LoraLinear(4, 4), torch.nn.Conv2d(4, 4, 3, padding=1))
    fast.store_fp8(net)
    assert [type(m).__name__ for m in net] == ["Fp8Linear", "LoraLinear", "Fp8Conv2d"]


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
            err = rel_err(got, plain(stack, req))
            print(f"graph vs eager, {dtype}, 2 controls, overlap + parallel: {err:.2e}")
            assert err <= SAME_DTYPE_TOL[dtype]


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
                # the residuals differ by <= 2u (SAME_DTYPE_TOL); the fp16 UNet adds them to its
                # skips, and its well-scaled random weights do not amplify that: allowed 4u
                err = ((a - b).norm() / b.norm()).item()
                print(f"UNet output with overlapped graph residuals vs plain, fp16: {err:.2e}")
                assert err <= 4 * U_FP16
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
            assert (out.float() - want[0]).norm() <= 4 * U_FP16 * want[0].norm()


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
        assert rel_err(stack.residuals(req), plain(stack, req)) <= SAME_DTYPE_TOL[torch.float16]
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
            # both paths run the same prepared net (same fp8 payload / same channels_last kernels):
            # graph vs eager in one dtype. (The 1.3e-3 measured "with channels_last" on the H100 is
            # channels_last against contiguous, i.e. other kernels; that is not compared here.)
            err = rel_err(got, want)
            print(f"graph vs eager, fp16, {what}: {err:.2e}")
            assert err <= SAME_DTYPE_TOL[torch.float16]
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
    """Against a true fp32 reference. fp16 measured on the H100: 1.2e-3 to 1.3e-3 (tiny and full
    size); held to 2.6e-3 (twice that). bf16 keeps 3 fewer significand bits, so its rounding error
    is 8x fp16's: measured 0.95e-2 to 1.14e-2 on random weights, i.e. rounding alone (the 8x ratio
    holds), not a bug; it is held to 1.5e-2."""
    print("half vs fp32:", errs)
    assert errs["torch.float16"] <= 2.6e-3, errs
    assert errs["torch.bfloat16"] <= 1.5e-2, errs


@pytest.mark.cuda
@cuda
def test_release_gives_the_graph_memory_back():
    """A full-size SD1.5 ControlNet at 512 px, CFG batch: after `release(stack)` the graph is gone
    and the host's `empty_cache` returns its pool (what ComfyUI's cleanup + /free rely on)."""
    import gc
    import weakref

    stack = _stack(SD15, "cuda", torch.float16, 1)
    reqs = [make_request(SD15, size=64, seed=s, device="cuda") for s in (1, 2, 3)]
    with torch.no_grad():
        stack.residuals(reqs[0])  # eager warm-up (cuDNN/cuBLAS state of the streams)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved()
        for r in reqs[1:]:
            stack.residuals(r)  # capture, replay
    torch.cuda.synchronize()
    runner = next(iter(fast.runner._RUNNERS.values()))
    graph = weakref.ref(next(iter(runner.entries.values())).graph)
    with_graph = torch.cuda.memory_reserved()
    del runner
    assert fast.release(stack) == 1
    gc.collect()
    torch.cuda.empty_cache()
    after = torch.cuda.memory_reserved()
    print(f"reserved MiB: before capture {before / 2**20:.0f}, with graph {with_graph / 2**20:.0f}, "
          f"released {after / 2**20:.0f}; measured need {fast.runner._NEED} B")
    assert graph() is None
    # `before` already held the static buffers, which go too; 8 MiB for the allocator's rounding
    assert with_graph > before and after <= before + 8 * 2**20


@pytest.mark.cuda
@cuda
def test_warm_up_on_the_host_stream_still_captures():
    stack = _stack(TINY_SDXL, "cuda", torch.float16, 2)
    with torch.no_grad(), fast.override(warm_on_side=False):
        for seed in range(1, 5):
            req = make_request(TINY_SDXL, seed=seed, device="cuda")
            assert rel_err(stack.residuals(req), plain(stack, req)) <= SAME_DTYPE_TOL[torch.float16]
    assert fast.STATS["eager"] == 1 and fast.STATS["capture"] == 1 and fast.STATS["replay"] == 3


@pytest.mark.cuda
@cuda
def test_short_memory_keeps_the_controlnet_eager_and_drops_graphs(monkeypatch):
    other = _stack(TINY_SD15, "cuda", torch.float32, 1)
    with torch.no_grad():
        for seed in (1, 2):
            other.residuals(make_request(TINY_SD15, seed=seed, device="cuda"))
    assert fast.STATS["capture"] == 1
    monkeypatch.setattr(fast.runner, "_free_device_bytes", lambda dev: 0)  # the device is full
    stack = _stack(TINY_SD15, "cuda", torch.float32, 1)
    with torch.no_grad():
        for seed in range(1, 5):
            req = make_request(TINY_SD15, seed=seed, device="cuda")
            assert rel_err(stack.residuals(req), plain(stack, req)) <= SAME_DTYPE_TOL[torch.float32]
    assert fast.STATS["capture"] == 1 and fast.STATS["graphs_dropped_memory"] == 1
    entries = [e for r in fast.runner._RUNNERS.values() for e in r.entries.values()]
    assert all(e.graph is None for e in entries)  # the other stack's graph was dropped too


@pytest.mark.cuda
@cuda
def test_overlapped_dict_makes_the_host_wait_at_its_first_read():
    """The ControlNet's side stream is held back ~50 ms; a host that reads the dict like ComfyUI
    (empty "input" slot after each block, then "middle") must still get the finished residuals,
    while a read that bypasses the dict (no wait) sees unfinished ones."""
    stack = _stack(TINY_SD15, "cuda", torch.float16, 1)
    side = fast.runner._side_stream(torch.device("cuda", torch.cuda.current_device()))
    with torch.no_grad(), fast.override(overlap=True):
        for seed in range(1, 5):
            req = make_request(TINY_SD15, seed=seed, device="cuda")
            want = plain(stack, req)
            with torch.cuda.stream(side):
                torch.cuda._sleep(100_000_000)  # the side stream starts late
            d = fast.on_read(stack.residuals(req))
            early = dict.__getitem__(d, "middle")[0].clone()  # no wait: races the side stream
            for _ in range(12):
                assert len(d["input"]) == 0 and d.pending
            got = {"middle": [d["middle"][0].clone()], "output": [t.clone() for t in d["output"]]}
            assert not d.pending
            assert rel_err(got, want) <= SAME_DTYPE_TOL[torch.float16]
            if seed > 2:  # replays: the unfinished buffer cannot hold this call's values yet
                assert not torch.equal(early, got["middle"][0])


ASYNC_ALLOC_SCRIPT = r"""
import torch, sys
from comfyui_controlnet_core.controlnet_core import fast
import test_fast as tf
assert torch.cuda.get_allocator_backend() == "cudaMallocAsync", torch.cuda.get_allocator_backend()
for n, dtype in ((1, torch.float16), (2, torch.float16)):
    fast.release(); fast.STATS.clear()
    stack = tf._stack(tf.TINY_SDXL, "cuda", dtype, n)
    with torch.no_grad():
        for seed in range(1, 6):
            req = tf.make_request(tf.TINY_SDXL, seed=seed, device="cuda")
            err = tf.rel_err(stack.residuals(req), tf.plain(stack, req))
            assert err <= tf.SAME_DTYPE_TOL[dtype], (n, seed, err)
    assert fast.STATS["capture"] == 1 and fast.STATS["replay"] == 4, dict(fast.STATS)
    fast.release(stack)
    torch.cuda.empty_cache()
    print("cudaMallocAsync ok", n, "need", fast.runner._NEED)
"""


@pytest.mark.cuda
@cuda
def test_graphs_under_cuda_malloc_async():
    """ComfyUI starts PyTorch with `backend:cudaMallocAsync` on NVIDIA GPUs (its cuda_malloc.py):
    graphs, replays and release under that allocator, in a fresh process (the allocator is fixed
    at CUDA init)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    done = subprocess.run([sys.executable, "-c", ASYNC_ALLOC_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    print(done.stdout[-2000:], done.stderr[-3000:])
    assert done.returncode == 0
