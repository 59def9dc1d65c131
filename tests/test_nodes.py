"""The ComfyUI nodes without ComfyUI: node definitions, the import contract, the model-name guard,
and our control object speaking the host's control protocol.

The control object is ComfyUI's `ControlBase` + `CoreControlMixin` at run time. Here the mixin sits
on `HostBase`, a stand-in written from the protocol as ComfyUI's sampler uses it (attributes set by
`set_cond_hint`, `pre_run` filling `timestep_range` and recursing into the chain, `copy_to`, ...).
Expectations are computed independently: the raw ControlNet called by hand on the input the host
would feed it (x / sqrt(sigma^2 + 1), the host's timestep), the hint resized by hand, times the
strength. The real host is exercised by tests/test_comfyui_integration.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from comfyui_controlnet_core import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_controlnet_core import preprocessors as pp
from comfyui_controlnet_core.controlnet_core.control import MODES
from comfyui_controlnet_core.controlnet_core.errors import InputError, LoadError
from comfyui_controlnet_core.nodes import adapter
from comfyui_controlnet_core.nodes.control_object import CoreControlMixin, NetHandle, merge_residuals
from helpers_models import make_tiny_config, random_controlnet

ROOT = Path(__file__).resolve().parents[1]
IDS = ("CNCore_LoadControlNet", "CNCore_Preprocessor", "CNCore_ApplyControlNet", "CNCore_CombineControls",
       "CNCore_LoadControlNeXtUNet", "CNCore_PoseKeypoints")


# ------------------------------------------------------------------------------------------
# node definitions

def test_the_node_ids_and_display_names():
    assert tuple(NODE_CLASS_MAPPINGS) == IDS
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(IDS)
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "conditioning/controlnet"
        assert callable(getattr(cls, cls.FUNCTION))
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
        assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
        assert NODE_DISPLAY_NAME_MAPPINGS[node_id].endswith("(CNCore)")


@pytest.mark.parametrize("node_id", IDS)
def test_inputs_have_tooltips_and_sane_numeric_ranges(node_id):
    spec = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    for section in spec.values():
        for name, s in section.items():
            opts = s[1]
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if s[0] in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"], name
                assert opts.get("step", 1) > 0
            if isinstance(s[0], list) and s[0]:
                assert opts.get("default", s[0][0]) in s[0]


def test_apply_node_inputs_match_comfyui_apply_advanced_then_extend_it():
    spec = NODE_CLASS_MAPPINGS["CNCore_ApplyControlNet"].INPUT_TYPES()
    assert list(spec["required"]) == [
        "positive", "negative", "control_net", "image", "strength", "start_percent", "end_percent",
        "control_mode", "resize_mode", "interpolation"]
    assert list(spec["optional"]) == ["vae", "mask", "control_stack", "control_type", "union_multi_condition"]
    multi = spec["optional"]["union_multi_condition"]  # off: a stack = the chain of Apply nodes (ComfyUI)
    assert multi[0] == "BOOLEAN" and multi[1]["default"] is False
    req = spec["required"]
    # ComfyUI's ControlNetApplyAdvanced: strength 1.0 in 0..10 step 0.01, start 0 / end 1 step 0.001
    assert req["strength"][0] == "FLOAT" and {k: req["strength"][1][k] for k in ("default", "min", "max", "step")} == {
        "default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}
    assert (req["start_percent"][1]["default"], req["end_percent"][1]["default"]) == (0.0, 1.0)
    assert req["start_percent"][1]["max"] == req["end_percent"][1]["max"] == 1.0
    # defaults reproduce it: uniform weights on both halves, centre crop, nearest-exact
    assert MODES[req["control_mode"][1]["default"]] == ("uniform", "both")
    assert req["resize_mode"][1]["default"] == "crop"
    assert req["interpolation"][1]["default"] == "nearest-exact"
    assert (req["control_net"][0], spec["optional"]["control_stack"][0]) == ("CONTROL_NET", "CONTROL_STACK")
    assert NODE_CLASS_MAPPINGS["CNCore_ApplyControlNet"].RETURN_TYPES == ("CONDITIONING", "CONDITIONING")
    assert NODE_CLASS_MAPPINGS["CNCore_LoadControlNet"].RETURN_TYPES == ("CONTROL_NET",)
    assert NODE_CLASS_MAPPINGS["CNCore_CombineControls"].RETURN_TYPES == ("CONTROL_STACK",)


def test_preprocessor_node_has_one_widget_per_param_in_order():
    spec = NODE_CLASS_MAPPINGS["CNCore_Preprocessor"].INPUT_TYPES()
    names, optional = list(spec["required"]), list(spec["optional"])
    assert names[:4] == ["image", "method", "resolution", "pixel_perfect"]
    # the 0.1.0 parameters are required widgets; those appended since are optional ones, after mask
    # and latent, so API prompts saved without them still validate in ComfyUI
    assert names[4:] + optional[2:] == [p.name for p in pp.PARAMS]
    assert optional[:2] == ["mask", "latent"] and len(names[4:]) == 14
    req = {**spec["required"], **spec["optional"]}
    assert req["method"][0] == pp.list_methods() and "canny" in req["method"][0]
    kinds = {"int": "INT", "float": "FLOAT", "bool": "BOOLEAN"}
    for p in pp.PARAMS:
        kind, opts = req[p.name]
        assert opts["default"] == p.default
        if p.kind == "choice":
            assert kind == list(p.choices)
        else:
            assert kind == kinds[p.kind]
        if p.kind in ("int", "float"):
            assert (opts.get("min"), opts.get("max")) == (p.min, p.max)
        if p.kind == "int":  # no random-seed widget is added by the front end
            assert opts["control_after_generate"] is False


def test_loader_lists_nothing_without_comfyui():
    assert NODE_CLASS_MAPPINGS["CNCore_LoadControlNet"].INPUT_TYPES()["required"]["control_net_name"][0] == []


# ------------------------------------------------------------------------------------------
# import contract

def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT.parent)


def test_import_needs_no_comfyui_and_does_no_heavy_work():
    r = _run_python(
        "import sys, comfyui_controlnet_core as m\n"
        f"assert len(m.NODE_CLASS_MAPPINGS) == {len(IDS)}\n"
        "heavy = [n for n in ('comfy', 'folder_paths', 'cv2', 'diffusers', 'comfy.model_management') if n in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    assert r.returncode == 0, r.stderr


def test_loads_by_path_under_another_name_like_comfyui_does():
    code = (
        "import importlib.util, sys\n"
        f"root = {str(ROOT)!r}\n"
        "spec = importlib.util.spec_from_file_location('comfyui-controlnet-core', root + '/__init__.py',"
        " submodule_search_locations=[root])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)\n"
        "assert sorted(m.NODE_CLASS_MAPPINGS) == sorted(%r)\n" % (list(IDS),)
    )
    r = _run_python(code)
    assert r.returncode == 0, r.stderr


def test_missing_dependency_logs_one_line_and_registers_nothing():
    code = (
        "import sys; sys.modules['torch'] = None  # torch cannot be imported\n"
        "import comfyui_controlnet_core as m\n"
        "assert m.NODE_CLASS_MAPPINGS == {} and m.NODE_DISPLAY_NAME_MAPPINGS == {}\n"
    )
    r = _run_python(code)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "dependency is missing" in lines[0] and "torch" in lines[0]


# ------------------------------------------------------------------------------------------
# model names

@pytest.mark.parametrize("name", ["../secret.safetensors", "sub/../../x.pth", "/etc/passwd", "C:\\models\\x.pth",
                                  "..\\x.safetensors", "", "   ", None])
def test_model_names_outside_the_folders_are_refused(name):
    with pytest.raises(LoadError) as e:
        adapter.resolve_model_path(name)
    msg = str(e.value)
    assert "refusing" in msg or "choose" in msg
    assert "Traceback" not in msg


def test_loader_node_sees_a_file_replaced_under_the_same_name(tmp_path, monkeypatch):
    """ComfyUI reuses the loader's output while IS_CHANGED returns the same value: it must change when
    another ControlNet is written under the same name, and stay put otherwise."""
    import os

    from comfyui_controlnet_core.controlnet_core.loader import save_controlnet

    folder = tmp_path / "controlnet"
    folder.mkdir()
    fake = SimpleNamespace(
        get_full_path=lambda kind, name: str(folder / name) if (folder / name).is_file() else None,
        get_folder_paths=lambda kind: [str(folder)],
    )
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    node = NODE_CLASS_MAPPINGS["CNCore_LoadControlNet"]
    path = folder / "cn.safetensors"
    save_controlnet(random_controlnet(make_tiny_config("sd15"), seed=0), path)
    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    first = node.IS_CHANGED("cn.safetensors")
    assert node.IS_CHANGED("cn.safetensors") == first  # same file: the cached output is reused
    save_controlnet(random_controlnet(make_tiny_config("sdxl"), seed=1), path)  # another net, same name
    os.utime(path, ns=(1_700_000_100_000_000_000, 1_700_000_100_000_000_000))
    assert node.IS_CHANGED("cn.safetensors") != first
    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))  # even with the old time
    assert node.IS_CHANGED("cn.safetensors") != first  # (the size differs)
    # names that do not resolve do not raise here: the load itself answers with its sentence
    assert node.IS_CHANGED("missing.safetensors") == "'missing.safetensors'"
    assert node.IS_CHANGED("../x.pth") == "'../x.pth'"


# ------------------------------------------------------------------------------------------
# the control protocol on a stand-in host

class HostBase:
    """What ComfyUI's ControlBase provides that the mixin relies on (see comfy/controlnet.py)."""

    def __init__(self):
        self.cond_hint_original = None
        self.strength = 1.0
        self.timestep_percent_range = (0.0, 1.0)
        self.timestep_range = None
        self.global_average_pooling = False
        self.previous_controlnet = None
        self.vae = None

    def set_cond_hint(self, cond_hint, strength=1.0, timestep_percent_range=(0.0, 1.0), vae=None, extra_concat=()):
        self.cond_hint_original, self.strength, self.timestep_percent_range = cond_hint, strength, timestep_percent_range
        return self

    def pre_run(self, model, percent_to_timestep_function):
        f = percent_to_timestep_function
        self.timestep_range = (f(self.timestep_percent_range[0]), f(self.timestep_percent_range[1]))
        if self.previous_controlnet is not None:
            self.previous_controlnet.pre_run(model, f)

    def set_previous_controlnet(self, c):
        self.previous_controlnet = c
        return self

    def cleanup(self):
        if self.previous_controlnet is not None:
            self.previous_controlnet.cleanup()
        self.timestep_range = None

    def get_models(self):
        return self.previous_controlnet.get_models() if self.previous_controlnet is not None else []

    def copy_to(self, c):
        c.cond_hint_original, c.strength = self.cond_hint_original, self.strength
        c.timestep_percent_range, c.global_average_pooling = self.timestep_percent_range, self.global_average_pooling
        c.vae = self.vae


class StandInControl(CoreControlMixin, HostBase):
    pass


class Sampling:
    """An eps model's sampling: input scaled by 1/sqrt(sigma^2+1); any monotonic sigma->timestep."""

    def percent_to_sigma(self, p):  # a float32 value, as ComfyUI's (it compares with float32 sigmas)
        return 1e9 if p <= 0 else 0.0 if p >= 1 else float(torch.tensor(14.6 * (1 - p) ** 2, dtype=torch.float32))

    def calculate_input(self, sigma, x):
        return x / (sigma.reshape(-1, 1, 1, 1) ** 2 + 1).sqrt()

    def timestep(self, sigma):
        return sigma * 60.0


CFG = make_tiny_config("sd15")
CTX = CFG.context_dim


def fake_model(context_dim=CTX, adm=None):
    return SimpleNamespace(model_sampling=Sampling(),
                           model_config=SimpleNamespace(unet_config={"context_dim": context_dim, "adm_in_channels": adm}))


@pytest.fixture(scope="module")
def handle():
    return NetHandle(random_controlnet(CFG, seed=3), patcher=object(), name="tiny_canny.safetensors")


@pytest.fixture(scope="module")
def handle2():
    return NetHandle(random_controlnet(CFG, seed=4), patcher=object(), name="tiny_tile.safetensors")


def hint_image(batch=1, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, h, w, 3, generator=g)  # ComfyUI IMAGE layout


def conditioning(width=CTX, n=1):
    return [[torch.randn(1, 5, width), {"pooled_output": None}] for _ in range(n)]


def make_control(h, image=None, strength=1.0, start=0.0, end=1.0, prev=None):
    c = StandInControl(h).copy()
    c.set_cond_hint((hint_image() if image is None else image).movedim(-1, 1), strength, (start, end))
    return c.set_previous_controlnet(prev)


def step_inputs(batch=2, size=16, sigma=3.0, seed=5):
    # 16x16 latents: the middle block then sees 2x2 cells; at 1x1 its GroupNorm amplifies rounding noise
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.full((batch,), sigma)
    cond = {"c_crossattn": torch.randn(batch, 5, CTX, generator=g)}
    return x, t, cond


def expected(h, image_bhwc, x, t, cond, strength):
    """The raw net called by hand: ComfyUI's inputs, the hint resized with plain nearest-exact."""
    s = Sampling()
    hint = F.interpolate(image_bhwc.movedim(-1, 1), size=(8 * x.shape[2], 8 * x.shape[3]), mode="nearest-exact")
    with torch.no_grad():
        down, mid = h.net(s.calculate_input(t, x), hint.expand(x.shape[0], -1, -1, -1), s.timestep(t),
                          cond["c_crossattn"])
    return [r * strength for r in down], mid * strength


def test_get_control_returns_the_nets_residuals_scaled_in_fresh_lists(handle):
    image = hint_image(h=48, w=48)
    c = make_control(handle, image=image, strength=0.6)
    c.pre_run(fake_model(), Sampling().percent_to_sigma)
    x, t, cond = step_inputs()
    out = c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})
    down, mid = expected(handle, image, x, t, cond, 0.6)
    assert out["input"] == [] and len(out["output"]) == len(down) == CFG.num_outputs - 1
    torch.testing.assert_close(out["middle"][0], mid, rtol=1e-4, atol=1e-5)
    for a, b in zip(out["output"], down):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    out["output"].pop()
    out["middle"].pop()  # the UNet consumes the lists ...
    again = c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})
    assert len(again["output"]) == CFG.num_outputs - 1 and len(again["middle"]) == 1  # ... the next call is whole
    assert again["output"] is not out["output"]


def test_start_end_gate_on_the_hosts_sigmas_and_pass_the_chain_through(handle, handle2):
    s = Sampling()
    first = make_control(handle2, strength=0.5)
    late = make_control(handle, start=0.5, end=1.0, prev=first)
    late.pre_run(fake_model(), s.percent_to_sigma)
    assert first.timestep_range is not None  # the host's pre_run recursed into the chain
    x, _, cond = step_inputs()
    early_t = torch.full((2,), s.percent_to_sigma(0.25))  # before start: only the chain acts
    only_first = late.get_control(x, early_t, cond, 2, {"cond_or_uncond": [0, 1]})
    direct = first.get_control(x, early_t, cond, 2, {"cond_or_uncond": [0, 1]})
    for a, b in zip(only_first["output"], direct["output"]):
        torch.testing.assert_close(a, b)
    at_start = torch.full((2,), s.percent_to_sigma(0.5))  # both ends inclusive
    both = late.get_control(x, at_start, cond, 2, {"cond_or_uncond": [0, 1]})
    d1, m1 = expected(handle, hint_image(), x, at_start, cond, 1.0)
    d2, m2 = expected(handle2, hint_image(), x, at_start, cond, 0.5)
    torch.testing.assert_close(both["middle"][0], m1 + m2, rtol=1e-4, atol=1e-5)
    alone = make_control(handle, start=0.5, end=0.9)
    alone.pre_run(fake_model(), s.percent_to_sigma)
    assert alone.get_control(x, early_t, cond, 2, {"cond_or_uncond": [0, 1]}) is None
    assert alone.get_control(x, torch.full((2,), s.percent_to_sigma(0.95)), cond, 2, {}) is None


def test_cond_only_mode_leaves_the_negative_half_untouched(handle):
    c = make_control(handle)
    c.cncore_mode = "controlnet is more important"
    c.pre_run(fake_model(), Sampling().percent_to_sigma)
    x, t, cond = step_inputs()
    out = c.get_control(x, t, cond, 2, {"cond_or_uncond": [1, 0]})  # uncond first, then cond
    for r in [*out["output"], *out["middle"]]:
        assert torch.count_nonzero(r[0]) == 0 and torch.count_nonzero(r[1]) > 0


def test_mask_limits_the_control_to_its_region_and_wrong_shapes_are_refused(handle):
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # left half
    c = make_control(handle)
    c.cncore_mask = mask
    c.pre_run(fake_model(), Sampling().percent_to_sigma)
    x, t, cond = step_inputs(size=8)
    out = c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})
    first = out["output"][0]  # full latent resolution (8x8)
    assert torch.count_nonzero(first[..., 4:]) == 0 and torch.count_nonzero(first[..., :4]) > 0
    c.cncore_mask = torch.ones(1, 64, 16)  # 4:1 mask for a square image
    c.pre_run(fake_model(), Sampling().percent_to_sigma)
    with pytest.raises(InputError, match="mask is 16x64 pixels but the image being generated is 64x64"):
        c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})


def test_hint_batches_that_fit_no_rule_are_refused_in_a_sentence(handle):
    c = make_control(handle, image=hint_image(batch=3))
    c.pre_run(fake_model(), Sampling().percent_to_sigma)
    x, t, cond = step_inputs(batch=4)  # cond + uncond chunks of 2 latents
    with pytest.raises(InputError, match="3 hint images for 2 latents"):
        c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})


def test_pre_run_refuses_a_controlnet_of_another_family(handle):
    c = make_control(handle)
    with pytest.raises(InputError) as e:
        c.pre_run(fake_model(context_dim=2048, adm=2816), Sampling().percent_to_sigma)
    assert "SD1.x" in str(e.value) and "SDXL" in str(e.value) and "tiny_canny" in str(e.value)


def test_a_failed_run_without_cleanup_does_not_leak_into_the_next(handle):
    s = Sampling()
    c = make_control(handle, start=0.0, end=0.5)
    c.pre_run(fake_model(), s.percent_to_sigma)
    x, t, cond = step_inputs()
    c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})  # the run "fails" here: no cleanup()
    c.timestep_percent_range = (0.0, 1.0)  # the next run, with other settings
    c.pre_run(fake_model(), lambda p: 2 * s.percent_to_sigma(p))
    low = torch.full((2,), 0.01)
    assert c.get_control(x, low, cond, 2, {"cond_or_uncond": [0, 1]}) is not None
    c.cleanup()
    with pytest.raises(Exception, match="pre_run"):
        c.get_control(x, low, cond, 2, {})


def test_cleanup_and_the_next_pre_run_release_the_fast_paths_graphs(handle):
    """The fast path's per-run state (runner: graphs, static buffers) goes at cleanup, so
    ComfyUI's unloading and /free get its memory back; after a failed run (no cleanup) the next
    pre_run drops it. The eager body stands in for the CUDA runner here (allow_cpu)."""
    from comfyui_controlnet_core.controlnet_core import fast

    fast.release()
    runners = fast.runner._RUNNERS
    s = Sampling()
    c = make_control(handle)
    x, t, cond = step_inputs()
    with fast.override(allow_cpu=True):
        c.pre_run(fake_model(), s.percent_to_sigma)
        c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})
        assert len(runners) == 1
        c.cleanup()
        assert runners == {}
        c.pre_run(fake_model(), s.percent_to_sigma)
        c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})  # this run "fails": no cleanup
        first = next(iter(runners.values()))
        c.pre_run(fake_model(), s.percent_to_sigma)
        assert first not in runners.values()
        c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})
        assert len(runners) == 1
    c.cleanup()
    assert runners == {}


def test_an_overlapped_dict_reaches_the_host_with_its_wait_on_read(handle, monkeypatch):
    """With overlap on (CUDA), the stack's dict carries "sync", which ComfyUI never calls: the
    control object hands ComfyUI a dict that waits at its first real read instead, unread (no
    chain to merge with). The stack's answer is faked here: overlap needs CUDA streams."""
    from comfyui_controlnet_core.controlnet_core import fast

    calls = []
    c = make_control(handle)
    c.pre_run(fake_model(), Sampling().percent_to_sigma)
    monkeypatch.setattr(c._cncore_stack, "residuals", lambda request: {
        "input": [], "middle": [torch.ones(1)], "output": [torch.ones(1)], "sync": lambda: calls.append(1)})
    x, t, cond = step_inputs()
    out = c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})
    assert isinstance(out, fast.SyncOnRead) and "sync" not in out and calls == []
    assert out["input"] == [] and calls == []
    assert out["middle"][0].item() == 1.0 and calls == [1]
    # chained under another control, the merge reads it, and so waits first
    calls.clear()
    top = make_control(handle, prev=c)
    top.pre_run(fake_model(), Sampling().percent_to_sigma)
    monkeypatch.setattr(c._cncore_stack, "residuals", lambda request: {
        "input": [], "middle": [torch.ones(1)], "output": [torch.ones(1)], "sync": lambda: calls.append(1)})
    merged = top.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})
    assert calls == [1] and not isinstance(merged, fast.SyncOnRead)


def test_copies_share_the_network_not_the_run_state(handle):
    a = make_control(handle)
    b = a.copy()
    assert b.handle is a.handle and b is not a
    a.pre_run(fake_model(), Sampling().percent_to_sigma)
    assert b._cncore_stack is None


def test_get_models_lists_each_patcher_once_with_the_chain(handle, handle2):
    first = make_control(handle2)
    top = make_control(handle, prev=first)
    top.cncore_entries = [adapter._bind(adapter.stack_entry(first, hint_image(), 1.0, 0.0, 1.0))]
    models = top.get_models()
    assert models.count(handle.patcher) == 1 and models.count(handle2.patcher) == 1


def test_merge_sums_index_wise_with_holes():
    a, b = torch.ones(1), 2 * torch.ones(1)
    out = merge_residuals({"input": [None, a], "middle": [a], "output": [a]}, {"input": [b], "middle": [b], "output": [b, b]})
    assert out["input"][0] is b and out["input"][1] is a
    assert out["middle"][0].item() == 3.0 and [t.item() for t in out["output"]] == [3.0, 2.0]
    assert merge_residuals(None, None) is None
    own = {"input": [], "middle": [a], "output": [a]}
    assert merge_residuals(own, None) is own and merge_residuals(None, own) is own  # fresh already: kept as is


# ------------------------------------------------------------------------------------------
# apply and combine (node functions)

def apply_node(*args, **kw):
    return NODE_CLASS_MAPPINGS["CNCore_ApplyControlNet"]().apply(*args, **kw)


def combine_node(*args, **kw):
    return NODE_CLASS_MAPPINGS["CNCore_CombineControls"]().combine(*args, **kw)[0]


def test_apply_shares_one_object_between_positive_and_negative(handle):
    net = StandInControl(handle)
    pos, neg = conditioning(n=2), conditioning()
    p2, n2 = apply_node(pos, neg, net, hint_image(), 0.8, 0.1, 0.9)
    controls = {id(d["control"]) for _, d in p2 + n2}
    assert len(controls) == 1
    c = p2[0][1]["control"]
    assert c is not net and c.handle is handle  # a copy, never the loader's object
    assert (c.strength, c.timestep_percent_range) == (0.8, (0.1, 0.9))
    assert all(d["control_apply_to_uncond"] is False for _, d in p2 + n2)
    assert "control" not in pos[0][1]  # inputs are not modified
    # a second apply chains onto the first, still one object for both halves
    p3, n3 = apply_node(p2, n2, net, hint_image(), 1.0, 0.0, 1.0)
    assert len({id(d["control"]) for _, d in p3 + n3}) == 1
    assert p3[0][1]["control"].previous_controlnet is c


def test_apply_with_strength_zero_returns_the_conditioning_unchanged(handle):
    pos, neg = conditioning(), conditioning()
    assert apply_node(pos, neg, StandInControl(handle), hint_image(), 0.0, 0.0, 1.0) == (pos, neg)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(positive_width=2048), "made for SD1.x models .* conditioning comes from SDXL"),
    (dict(strength=11.0), "strength 11 is out of range"),
    (dict(start=0.8, end=0.2), "start_percent 0.8 is after end_percent 0.2"),
    (dict(image=torch.rand(1, 64, 64, 2)), r"the hint image has 2 channels .* takes grey \(1\), RGB \(3\) or RGBA "
                                           r"\(4, its alpha is dropped\) images: connect an image from Load Image"),
    (dict(image=torch.rand(64, 64, 3)), "IMAGE batch"),
    (dict(mask=torch.rand(1, 1, 8, 8, 2)), "mask must be"),
    (dict(mask=torch.full((1, 8, 8), 2.0)), "values from 0 to 1"),
    (dict(control_mode="louder"), "unknown control mode"),
    (dict(resize_mode="zoom"), "unknown resize mode"),
])
def test_apply_refuses_bad_input_with_a_sentence(handle, kwargs, pattern):
    width = kwargs.pop("positive_width", CTX)
    args = dict(strength=1.0, start=0.0, end=1.0, image=hint_image())
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(InputError, match=pattern):
        apply_node(conditioning(width), conditioning(width), StandInControl(handle), args["image"], args["strength"],
                   args["start"], args["end"], **kwargs)


@pytest.mark.parametrize("channels", [1, 4])
def test_apply_and_combine_take_grey_and_rgba_images_as_the_preprocessors_do(handle, handle2, channels):
    """Grey is copied to R, G and B; RGBA drops its alpha (the colour as stored, however transparent)."""
    s = Sampling()
    rgb = hint_image(seed=6)
    if channels == 1:
        rgb = rgb[..., :1].expand(-1, -1, -1, 3)
        image = rgb[..., :1].clone()
    else:
        image = torch.cat([rgb, torch.rand(1, 64, 64, 1)], dim=-1)  # a varying alpha must not matter
    runs = []
    for img in (image, rgb):
        stack = combine_node(StandInControl(handle2), img, 0.6, 0.0, 1.0)
        p, _ = apply_node(conditioning(), conditioning(), StandInControl(handle), img, 0.8, 0.0, 1.0,
                          control_mode="prompt is more important", control_stack=stack)
        c = p[0][1]["control"]
        c.pre_run(fake_model(), s.percent_to_sigma)
        x, t, cond = step_inputs(size=8)
        runs.append(c.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]}))
    for a, b in zip(runs[0]["output"] + runs[0]["middle"], runs[1]["output"] + runs[1]["middle"]):
        assert torch.equal(a, b)
    # a ComfyUI-loaded ControlNet (default options) gets the same 3-channel hint
    net = ForeignControl()
    apply_node(conditioning(), conditioning(), net, image, 1.0, 0.0, 1.0)
    assert net.calls[0].args[0] == torch.Size([1, 3, 64, 64])


class ForeignControl:
    """A control object of another origin (ComfyUI's own loader): duck-typed, default options."""

    def __init__(self):
        self.calls = []

    def copy(self):
        c = ForeignControl()
        self.calls.append(c)
        return c

    def set_cond_hint(self, hint, strength, percent_range, vae=None):
        self.args = (hint.shape, strength, percent_range, vae)
        return self

    def set_previous_controlnet(self, prev):
        self.prev = prev
        return self


def test_a_foreign_controlnet_with_default_options_is_applied_as_comfyui_does():
    net = ForeignControl()
    vae = object()
    p2, n2 = apply_node(conditioning(), conditioning(), net, hint_image(h=40, w=56), 0.7, 0.2, 0.8, vae=vae)
    c = p2[0][1]["control"]
    assert c is n2[0][1]["control"] and net.calls == [c]
    assert c.args == (torch.Size([1, 3, 40, 56]), 0.7, (0.2, 0.8), vae) and c.prev is None


def test_combined_controls_equal_chained_controls(handle, handle2):
    s = Sampling()
    img1, img2 = hint_image(seed=1), hint_image(seed=2)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:, :] = 1.0
    pos, neg = conditioning(), conditioning()
    net1, net2 = StandInControl(handle), StandInControl(handle2)

    stack = combine_node(net1, img1, 0.7, 0.0, 0.6, mask=mask)
    assert len(stack) == 1
    p_stack, _ = apply_node(pos, neg, net2, img2, 0.9, 0.2, 1.0, control_stack=stack)
    p_a, n_a = apply_node(pos, neg, net1, img1, 0.7, 0.0, 0.6, mask=mask)
    p_chain, _ = apply_node(p_a, n_a, net2, img2, 0.9, 0.2, 1.0)
    stacked, chained = p_stack[0][1]["control"], p_chain[0][1]["control"]
    assert stacked.previous_controlnet is None and len(stacked.cncore_entries) == 1
    for c in (stacked, chained):
        c.pre_run(fake_model(), s.percent_to_sigma)
    x, _, cond = step_inputs(size=8)
    for p in (0.1, 0.4, 0.8):  # only the first, both, only the second
        t = torch.full((2,), s.percent_to_sigma(p))
        a = stacked.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})
        b = chained.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})
        for ra, rb in zip(a["output"] + a["middle"], b["output"] + b["middle"]):
            torch.testing.assert_close(ra, rb, rtol=1e-5, atol=1e-6)


def test_combine_chains_entries_oldest_first_and_checks_its_inputs(handle, handle2):
    net1, net2 = StandInControl(handle), StandInControl(handle2)
    s1 = combine_node(net1, hint_image(), 1.0, 0.0, 1.0)
    s2 = combine_node(net2, hint_image(), 0.5, 0.0, 1.0, control_stack=s1)
    assert [e.control_net for e in s2] == [net1, net2] and len(s1) == 1
    with pytest.raises(InputError, match="out of range"):
        combine_node(net1, hint_image(), 12.0, 0.0, 1.0)
    with pytest.raises(InputError, match="hint must be an image batch"):
        combine_node(net1, torch.rand(64, 64, 3), 1.0, 0.0, 1.0)
    with pytest.raises(InputError, match="connect a ControlNet"):
        combine_node(None, hint_image(), 1.0, 0.0, 1.0)


def test_stacking_controlnets_of_different_families_is_refused(handle):
    xl = NetHandle(random_controlnet(make_tiny_config("sdxl"), seed=1), object(), "tiny_xl.safetensors")
    stack = combine_node(StandInControl(xl), hint_image(), 1.0, 0.0, 1.0)
    with pytest.raises(InputError, match="different architectures"):
        apply_node(conditioning(), conditioning(), StandInControl(handle), hint_image(), 1.0, 0.0, 1.0,
                   control_stack=stack)


# ------------------------------------------------------------------------------------------
# preprocessor node

def crafted_image(batch=2, h=40, w=52) -> torch.Tensor:
    """A ComfyUI IMAGE whose pixels are whole grey levels: dark ground, a bright square, a mid bar."""
    img = torch.full((batch, h, w, 3), 30 / 255)
    img[:, 8:24, 10:26] = 220 / 255
    img[:, 28:34, 4:48] = torch.tensor([200, 120, 40]) / 255
    if batch > 1:
        img[1] = img[1].flip(1)  # the frames differ
    return img


def test_preprocessor_node_output_is_opencv_canny_of_the_image():
    import cv2
    import numpy as np

    node = NODE_CLASS_MAPPINGS["CNCore_Preprocessor"]()
    params = {p.name: p.default for p in pp.PARAMS} | {"low_threshold": 50, "high_threshold": 150}
    image = crafted_image()
    (hint,) = node.run(image, "canny", 40, False, **params)  # resolution = the short side: no resampling
    assert hint.shape == (2, 40, 52, 3) and hint.dtype == torch.float32 and hint.device == image.device
    for i in range(2):
        u8 = (image[i].numpy() * 255).round().astype(np.uint8)
        edges = cv2.Canny(cv2.cvtColor(u8, cv2.COLOR_RGB2GRAY), 50, 150)  # white (255) on black
        assert edges.any() and (edges == 0).any()
        want = torch.from_numpy(edges).float().div(255)[..., None].expand(-1, -1, 3)
        assert torch.equal(hint[i], want)
    # pixel-wise methods: invert is 1 - x, threshold is BT.601 luma >= t, at the input size whatever
    # the resolution widget says
    (inv,) = node.run(image, "invert", 512, False, **params)
    assert torch.equal(inv, 1 - image)
    (thr,) = node.run(image, "threshold", 512, False, **(params | {"threshold": 0.5}))
    luma = 0.299 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2]
    assert torch.equal(thr, (luma >= 0.5).float()[..., None].expand(-1, -1, -1, 3))


def test_preprocessor_pixel_perfect_takes_the_size_from_the_latent():
    node = NODE_CLASS_MAPPINGS["CNCore_Preprocessor"]()
    defaults = {p.name: p.default for p in pp.PARAMS}
    image = crafted_image(batch=1, h=40, w=40)
    with pytest.raises(pp.PreprocessorError, match="connect your latent"):
        node.run(image, "canny", 64, True, **defaults)
    latent = {"samples": torch.zeros(1, 4, 12, 12)}
    (hint,) = node.run(image, "canny", 64, True, latent=latent, **defaults)
    # by hand: a 12x12 latent is 96x96 px; the 40x40 image covers it at scale 96/40, i.e. it is worked
    # on at a short side of 96 px (the resolution widget's 64 is ignored)
    (want,) = node.run(image, "canny", 96, False, **defaults)
    (ignored,) = node.run(image, "canny", 64, False, **defaults)
    assert torch.equal(hint, want) and not torch.equal(hint, ignored)
    with pytest.raises(pp.PreprocessorError, match="unknown preprocessor"):
        node.run(image, "nope", 64, False, **defaults)


# The saved-workflow contract as released in 0.1.0. The UI stores widget values by position and API
# prompts by name, so these lists may only grow at their end, and released choices never disappear.
# (Written out by hand on purpose: a change to the node specs must not be able to move it.)
RELEASED_INPUTS = {
    "CNCore_LoadControlNet": (["control_net_name"], []),
    "CNCore_Preprocessor": (
        ["image", "method", "resolution", "pixel_perfect", "low_threshold", "high_threshold", "auto_threshold",
         "blur", "threshold", "sigma", "contrast", "thickness", "drawn", "min_length", "detector", "downsample",
         "grid", "seed"],
        ["mask", "latent"]),
    "CNCore_ApplyControlNet": (
        ["positive", "negative", "control_net", "image", "strength", "start_percent", "end_percent",
         "control_mode", "resize_mode", "interpolation"],
        ["vae", "mask", "control_stack"]),
    "CNCore_CombineControls": (["control_net", "image", "strength", "start_percent", "end_percent"],
                               ["mask", "control_stack"]),
}
RELEASED_CHOICES = {
    ("CNCore_Preprocessor", "method"): ["canny", "softedge", "scribble", "lineart", "threshold", "invert",
                                        "grayscale", "tile", "color_grid", "shuffle", "inpaint", "lines"],
    ("CNCore_ApplyControlNet", "control_mode"): ["balanced", "prompt is more important",
                                                 "controlnet is more important", "guess mode"],
    ("CNCore_ApplyControlNet", "resize_mode"): ["stretch", "crop", "pad"],
    ("CNCore_ApplyControlNet", "interpolation"): ["nearest-exact", "bilinear", "bicubic", "area"],
}


@pytest.mark.parametrize("node_id", sorted(RELEASED_INPUTS))
def test_saved_workflows_keep_working_inputs_only_grow_at_the_end(node_id):
    spec = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    required, optional = RELEASED_INPUTS[node_id]
    assert list(spec["required"])[: len(required)] == required
    assert list(spec.get("optional", {}))[: len(optional)] == optional


@pytest.mark.parametrize("node_input", sorted(RELEASED_CHOICES))
def test_released_choices_stay_available(node_input):
    node_id, name = node_input
    choices = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"][name][0]
    assert set(RELEASED_CHOICES[node_input]) <= set(choices)


def test_preprocessor_batch_drives_comfyuis_progress_bar(monkeypatch):
    """A batch reports each frame through comfy.utils.ProgressBar (a stand-in with its interface)."""
    import types

    updates = []

    class ProgressBar:  # comfy/utils.py: ProgressBar(total).update_absolute(value, total)
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            updates.append((value, total))

    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(ProgressBar=ProgressBar)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    node = NODE_CLASS_MAPPINGS["CNCore_Preprocessor"]()
    defaults = {p.name: p.default for p in pp.PARAMS}
    image = hint_image(batch=3, h=24, w=24)
    (hint,) = node.run(image, "canny", 64, False, **defaults)
    assert updates == [(1, 3), (2, 3), (3, 3)]
    ref = pp.run("canny", image.numpy(), resolution=64, **{k: defaults[k] for k in pp.get_method("canny").params})
    torch.testing.assert_close(hint, torch.from_numpy(ref))
    updates.clear()
    node.run(image[:1], "canny", 64, False, **defaults)
    assert updates == []  # one image: no bar
