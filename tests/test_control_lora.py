"""Control-LoRA: detection, loading, the merge against its references, its life cycle, bad input.

References:
* diffusers >= 0.37 with peft: `ControlNetModel.from_unet(unet)` + `load_lora_adapter(sd, prefix=None)`
  on the same random weights, for files whose low-rank layers' biases equal the base model's
  (diffusers ignores bias overrides on the layers it wraps);
* the stated rule built by hand in float64 (`helpers_control_lora.by_the_rule`: low-rank layer
  weight = W + up @ down, what the file stores whole is the file's, the rest the base model's)
  for bias overrides and for everything that needs our reference host (sampling with a LoRA
  patched into the base model).
Fixtures follow shared/notes/control-families.md §2.3 (see helpers_control_lora).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import helpers_control_lora as H
from comfyui_controlnet_core.controlnet_core import loader, sampler
from comfyui_controlnet_core.controlnet_core.config import SD15
from comfyui_controlnet_core.controlnet_core.control import Control, ControlSettings
from comfyui_controlnet_core.controlnet_core.control_lora import ControlLoRA
from comfyui_controlnet_core.controlnet_core.errors import ControlNetError, InputError, LoadError
from comfyui_controlnet_core.controlnet_core.formats import control_lora as fmt
from comfyui_controlnet_core.controlnet_core.model import ControlNet
from comfyui_controlnet_core.controlnet_core.unet import UNet
from comfyui_controlnet_core.nodes.control_object import CoreControlMixin, HostWeights, NetHandle
from helpers_models import TINY_HINT_BLOCKS, _randomize_, make_inputs, make_tiny_config, rel_err, run_diffusers

TOL = 1e-4


def outputs(model, inp) -> list[torch.Tensor]:
    """A model's unscaled residuals through the ControlModel protocol: skips, then the middle."""
    with torch.no_grad():
        out = model.control_outputs(inp.x, inp.t, inp.context, inp.y, model.embed_hint(inp.hint))
    return out["output"] + out["middle"]


def rule_outputs(net: ControlNet, inp) -> list[torch.Tensor]:
    with torch.no_grad():
        down, mid = net(inp.x, inp.hint, inp.t, inp.context, y=inp.y)
    return [*down, mid]


def assert_parity(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(want)
    errs = [rel_err(a, b) for a, b in zip(got, want)]
    worst = max(float((a - b).abs().max()) for a, b in zip(got, want))
    print(f"\n[{what}] worst relative error {max(errs):.2e}, max abs {worst:.2e}")
    assert max(errs) <= TOL, errs


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Per arch: a random diffusers UNet, its encoder copy (from_unet) as the base, a Control-LoRA
    file for it. Built on first use."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    built = {}

    def get(arch: str) -> SimpleNamespace:
        if arch not in built:
            cfg = make_tiny_config(arch)
            unet = H.randomize_(UNet2DConditionModel(**H.unet_config(arch)), 0)
            base = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_HINT_BLOCKS).eval()
            host = H.host_weights_of(base)
            file_sd = H.make_file_sd(cfg, host, rank=4, seed=1)
            path = H.save(file_sd, tmp_path_factory.mktemp("clora") / f"control_lora_rank4_{arch}.safetensors")
            built[arch] = SimpleNamespace(arch=arch, cfg=cfg, unet=unet, host=host, file_sd=file_sd, path=path)
        return built[arch]

    return get


@pytest.fixture(params=["sd15", "sdxl"])
def case(request, cases):
    return cases(request.param)


# ------------------------------------------------------------------------------------------
# detection and loading

def test_detected_from_the_header_and_its_architecture_read_from_shapes(case):
    info = loader.inspect_controlnet(case.path)
    assert (info.family, info.arch, info.supported) == ("Control-LoRA (Stability AI)", case.arch, True)
    model = loader.load_controlnet(case.path)
    assert isinstance(model, ControlLoRA)
    assert model.config == case.cfg  # every field read from the file's shapes (heads by the loader's rule)
    assert model.ranks == [4] and model.family == "Control-LoRA" and model.bound_net is None
    assert model.output_levels() == ControlNet(case.cfg, device="meta").output_levels()  # paper weights, as a ControlNet
    # the low-rank layers are the ones the file stores as .up/.down, nothing else
    assert {k for k in case.file_sd if k.endswith(".up")} == {m + ".up" for m in model._lowrank}


# peft warns that diffusers' config also targets controlnet_cond_embedding.conv_in, which the file
# stores whole (input_hint_block.0): expected, nothing is lost.
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_matches_diffusers_control_lora_loader(case):
    from diffusers import ControlNetModel

    ref = ControlNetModel.from_unet(case.unet, conditioning_embedding_out_channels=TINY_HINT_BLOCKS)
    ref.load_lora_adapter(dict(case.file_sd), prefix=None)
    ref.eval()
    model = loader.load_controlnet(case.path)
    model.bind_host(lambda: case.host)
    inp = make_inputs(case.cfg, batch=2, size=8)
    assert_parity(outputs(model, inp), run_diffusers(ref, inp), f"{case.arch} vs diffusers+peft")


def test_bias_overrides_and_stored_weights_follow_the_rule(case, tmp_path):
    """Biases of low-rank layers that differ from the base model's (diffusers ignores them) and a
    low-rank layer that also stores its weight (then the delta goes onto the file's weight, as in
    ComfyUI): checked against the rule built by hand."""
    file_sd = H.make_file_sd(case.cfg, case.host, rank=4, seed=2, bias_override=True)
    module = "input_blocks.1.0.in_layers.2"
    g = torch.Generator().manual_seed(3)
    file_sd[module + ".weight"] = 0.1 * torch.randn(case.host[module + ".weight"].shape, generator=g)
    assert not torch.equal(file_sd[module + ".bias"], case.host[module + ".bias"])
    model = loader.load_controlnet(H.save(file_sd, tmp_path / "override.safetensors"))
    model.bind_host(lambda: case.host)
    inp = make_inputs(case.cfg, batch=2, size=8)
    assert_parity(outputs(model, inp), rule_outputs(H.by_the_rule(case.cfg, case.host, file_sd), inp),
                  f"{case.arch} bias overrides vs the rule")


def test_merged_copy_respects_the_requested_dtype_and_counts_its_bytes(case):
    model = loader.load_controlnet(case.path, dtype=torch.bfloat16)
    model.bind_host(lambda: case.host)
    net = model.bound_net
    assert type(net) is ControlNet and net.dtype == torch.bfloat16 and net.device == torch.device("cpu")
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in net.parameters())
    rule = H.by_the_rule(case.cfg, case.host, {k: v.to(torch.bfloat16).float() for k, v in case.file_sd.items()})
    got, want = net.state_dict(), rule.state_dict()
    assert max(rel_err(got[k].float(), want[k]) for k in want if want[k].norm() > 0) < 1e-2  # bf16 rounding
    # bound_bytes: every weight the merge allocates; those the file stores whole are shared, not copied
    shared = {k for k, v in got.items()
              if any(v.data_ptr() == p.data_ptr() for p in model.full.values())}
    assert shared == {k for k in case.file_sd if k in got and k[: -len(".weight")] + ".up" not in case.file_sd}
    allocated = sum(v.numel() * v.element_size() for k, v in got.items() if k not in shared)
    assert model.bound_bytes == allocated


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_full_size_sd15_rank128_at_8x8_latent(tmp_path):
    """The real SD1.5 shape (what comfyanonymous' control_lora_rank128_v11p_sd15_* files are):
    base = diffusers' SD1.5-sized ControlNetModel encoder, rank 128, against diffusers + peft."""
    import copy

    from diffusers import ControlNetModel

    base = ControlNetModel(cross_attention_dim=768)  # diffusers' defaults are the SD1.5 ControlNet
    _randomize_(base.named_parameters(), seed=7)
    with torch.no_grad():  # fp16-representable, so the fp16 file's biases equal the base model's exactly
        for p in base.parameters():
            p.copy_(p.half().float())
    base.eval()
    host = H.host_weights_of(base)
    file_sd = H.make_file_sd(SD15, host, rank=128, seed=8)
    params = sum(v.numel() for v in file_sd.values())
    path = H.save(file_sd, tmp_path / "control_lora_rank128_v11p_sd15_test.safetensors", dtype=torch.float16)
    print(f"\n[full size] {params / 1e6:.1f} M parameters in the file ({path.stat().st_size / 2**20:.0f} MiB fp16)")
    model = loader.load_controlnet(path)
    assert model.config == SD15 and model.ranks[0] == 128
    model.bind_host(lambda: host)
    ref = copy.deepcopy(base)
    ref.load_lora_adapter({k: v.to(torch.float16).float() for k, v in file_sd.items()}, prefix=None)
    ref.eval()
    inp = make_inputs(model.config, batch=1, size=8)
    assert_parity(outputs(model, inp), run_diffusers(ref, inp), "full-size SD1.5 rank 128 vs diffusers+peft")


# ------------------------------------------------------------------------------------------
# life cycle: merged once per base model, rebuilt when it changes

def test_merged_once_then_each_step_is_a_plain_controlnet_forward(case, monkeypatch):
    real = ControlNet.forward
    model = loader.load_controlnet(case.path)
    model.bind_host(lambda: case.host)
    net = model.bound_net
    model.bind_host(lambda: dict(case.host))  # same weights: the copy is kept
    assert model.bound_net is net

    def no_recompute(*a, **k):
        raise AssertionError("a low-rank delta was recomputed during a step")

    monkeypatch.setattr(fmt.LowRank, "delta", no_recompute)
    calls = []
    monkeypatch.setattr(ControlNet, "forward", lambda self, *a, **k: calls.append(self) or real(self, *a, **k))
    inp = make_inputs(case.cfg, batch=2, size=8)
    outputs(model, inp)
    assert calls == [net]  # one forward of the merged ControlNet per step, nothing else



def test_rebuilt_when_the_base_model_changes_and_freed_on_unbind(case):
    model = loader.load_controlnet(case.path)
    host = {k: v.clone() for k, v in case.host.items()}
    model.bind_host(lambda: host)
    first = model.bound_net
    inp = make_inputs(case.cfg, batch=2, size=8)
    key = next(k for k in host if k.endswith("attn2.to_k.weight"))
    g = torch.Generator().manual_seed(4)
    host[key].add_(0.05 * torch.randn(host[key].shape, generator=g))  # a LoRA patched in place
    model.bind_host(lambda: host)
    assert model.bound_net is not first
    assert_parity(outputs(model, inp), rule_outputs(H.by_the_rule(case.cfg, host, case.file_sd), inp),
                  "after an in-place patch")
    second = model.bound_net
    host = dict(host)
    host[key] = host[key] + 0.05  # a LoRA set as a new tensor (ComfyUI's set_attr_param)
    model.bind_host(lambda: host)
    assert model.bound_net is not second
    assert_parity(outputs(model, inp), rule_outputs(H.by_the_rule(case.cfg, host, case.file_sd), inp),
                  "after a replaced tensor")
    model.unbind_host()
    assert model.bound_net is None
    with pytest.raises(ControlNetError, match=r"control_lora_rank4_.*not been built from a base model"):
        outputs(model, inp)


def test_binds_in_inference_mode_as_comfyui_runs_every_prompt(case):
    """ComfyUI executes prompts under torch.inference_mode(): its weights are inference tensors."""
    with torch.inference_mode():
        host = {k: v.clone() for k, v in case.host.items()}
        model = loader.load_controlnet(case.path)
        model.bind_host(lambda: host)
        net = model.bound_net
        model.bind_host(lambda: host)
        assert model.bound_net is net
        host = {k: v + 0.01 for k, v in host.items()}
        model.bind_host(lambda: host)
        assert model.bound_net is not net
        inp = make_inputs(case.cfg, batch=2, size=8)
        assert_parity(outputs(model, inp), rule_outputs(H.by_the_rule(case.cfg, host, case.file_sd), inp),
                      "inference mode")


def test_reference_sampler_merges_the_base_model_with_its_lora_applied():
    """sampler.sample hands `unet.state_dict` to pre_run: a LoRA patched into the UNet's weights is
    part of what gets merged, and a second LoRA between runs is picked up."""
    cfg = make_tiny_config("sd15")
    unet = UNet(cfg)
    _randomize_(unet.named_parameters(), seed=11)
    unet.eval()
    encoder = lambda: {k: v.clone() for k, v in unet.state_dict().items() if k.startswith(H.ENCODER)}  # noqa: E731
    file_sd = H.make_file_sd(cfg, encoder(), rank=4, seed=12)
    model = loader.load_controlnet(dict(file_sd), name="clora.safetensors")
    g = torch.Generator().manual_seed(13)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    ctx, unctx = torch.randn(1, 5, cfg.context_dim, generator=g), torch.randn(1, 5, cfg.context_dim, generator=g)
    hint = torch.rand(1, 64, 64, 3, generator=g)
    settings = ControlSettings(strength=0.8)

    def run(net):
        return sampler.sample(unet, noise, ctx, unctx, steps=2, cfg=5.0, control=Control(net, hint, settings))

    def patch_lora(seed):  # W += B @ A on every attention projection, in place (ComfyUI's inplace update)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if name.startswith(H.ENCODER) and ".attn" in name and p.ndim == 2:
                    p += 0.3 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g) / p.shape[1]

    before = encoder()
    patch_lora(14)
    assert rel_err(run(model), run(H.by_the_rule(cfg, encoder(), file_sd))) <= TOL
    # the LoRA is in the merged weights (so the comparison above could fail)
    stale, got = H.by_the_rule(cfg, before, file_sd).state_dict(), model.bound_net.state_dict()
    assert max(rel_err(got[k], stale[k]) for k in got if ".attn" in k) > 1e-2
    patch_lora(15)
    assert rel_err(run(model), run(H.by_the_rule(cfg, encoder(), file_sd))) <= TOL


# ------------------------------------------------------------------------------------------
# bad input

def test_sd15_control_lora_on_an_sdxl_model_is_refused_before_the_first_step(cases):
    case = cases("sd15")
    xl = UNet(make_tiny_config("sdxl")).eval()
    steps = []
    xl.register_forward_pre_hook(lambda *a: steps.append(1))
    model = loader.load_controlnet(case.path)
    cfg = xl.config
    with pytest.raises(InputError) as e:
        sampler.sample(xl, torch.randn(1, 4, 8, 8), torch.randn(1, 5, cfg.context_dim), steps=2,
                       control=Control(model, torch.rand(1, 64, 64, 3)), y=torch.randn(1, 2816))
    msg = str(e.value)
    assert case.path.name in msg and "SD1.x" in msg and "SDXL" in msg and "load a Control-LoRA made for" in msg
    assert steps == []  # refused at pre_run, before the UNet ran


def test_sdxl_control_lora_on_an_sd15_model_is_refused(cases):
    case = cases("sdxl")
    sd15 = UNet(make_tiny_config("sd15"))
    model = loader.load_controlnet(case.path)
    with pytest.raises(InputError, match=r"made for SDXL models .*but the model being sampled is SD1.x"):
        model.bind_host(sd15.state_dict)


def test_a_base_model_of_another_layout_is_refused_in_a_sentence(case):
    cfg = dataclasses.replace(case.cfg, channel_mult=case.cfg.channel_mult[:-1] + (4,))  # same text width
    other = UNet(cfg)
    model = loader.load_controlnet(case.path)
    with pytest.raises(InputError, match=r"another UNet layout than the model being sampled \(.* is \("):
        model.bind_host(other.state_dict)
    with pytest.raises(InputError, match="passed none"):
        model.bind_host(None)


def test_truncated_file_is_named(case, tmp_path):
    data = case.path.read_bytes()
    bad = tmp_path / "control_lora_truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="control_lora_truncated.safetensors"):
        loader.load_controlnet(bad)


@pytest.mark.parametrize("damage, pattern", [
    ("wrong_rank", r"up \(.*\) and down \(.*\), which do not multiply"),
    ("lonely_up", r"has its \.up but not its \.down"),
    ("wrong_out", r"ranks or shapes fit no base-model layer"),
    ("unknown_layer", r"fit no part of a ControlNet"),
    ("no_lowrank", r"holds no low-rank"),
])
def test_files_whose_layers_fit_no_base_model_layer_are_refused(case, tmp_path, damage, pattern):
    sd = dict(case.file_sd)
    m = "input_blocks.1.0.in_layers.2"
    if damage == "wrong_rank":
        sd[m + ".down"] = sd[m + ".down"][:3]
    elif damage == "lonely_up":
        del sd[m + ".down"]
    elif damage == "wrong_out":
        sd[m + ".up"] = torch.cat([sd[m + ".up"], sd[m + ".up"][:1]])
        sd[m + ".bias"] = torch.cat([sd[m + ".bias"], sd[m + ".bias"][:1]])
    elif damage == "unknown_layer":
        sd["input_blocks.1.0.extra.weight"] = torch.zeros(2, 2)
    else:
        sd = {k: v for k, v in sd.items() if not k.endswith((".up", ".down"))}
    path = H.save(sd, tmp_path / f"control_lora_{damage}.safetensors")
    with pytest.raises(LoadError, match=pattern) as e:
        loader.load_controlnet(path)
    assert path.name in str(e.value)


# ------------------------------------------------------------------------------------------
# the ComfyUI side (without ComfyUI): host weights as the layers compute with them, memory, cleanup

def test_host_weights_apply_lowvram_patches_and_fp8_scales_like_the_layer_forward():
    """A module ComfyUI left partially loaded computes `f(weight)` for each of its weight_function
    (comfy/ops.py cast_bias_weight); a scaled-fp8 module multiplies by scale_weight (convert_weight)."""
    unet = torch.nn.Module()
    unet.a = torch.nn.Linear(3, 2)
    unet.b = torch.nn.Linear(3, 2)
    unet.c = torch.nn.Linear(3, 2)
    unet.b.weight_function = [lambda w: w.mul_(2.0), lambda w: w + 1.0]  # in place, as LoRA patches may be
    unet.b.bias_function = [lambda b: b - 1.0]
    unet.c.convert_weight = lambda w, inplace=False, **k: w * 0.5
    before = unet.b.weight.detach().clone()
    hw = HostWeights(unet)
    assert set(hw) == set(unet.state_dict()) and len(hw) == 6
    assert hw["a.weight"].data_ptr() == unet.a.weight.data_ptr()  # untouched weights are not copied
    torch.testing.assert_close(hw["b.weight"], before * 2 + 1)
    torch.testing.assert_close(hw["b.bias"], unet.b.bias.detach() - 1)
    torch.testing.assert_close(hw["c.weight"], unet.c.weight.detach() * 0.5)
    assert torch.equal(unet.b.weight.detach(), before)  # the host's own weight is left alone


def test_each_base_weight_is_read_once_per_bind(case):
    """A host may compute weights when they are read (HostWeights for --lowvram modules): one read each."""
    from collections import Counter
    from collections.abc import Mapping

    reads = Counter()

    class Counting(Mapping):
        def __getitem__(self, k):
            reads[k] += 1
            return case.host[k]

        def __iter__(self):
            return iter(case.host)

        def __len__(self):
            return len(case.host)

    model = loader.load_controlnet(case.path)
    model.bind_host(Counting)
    assert reads and max(reads.values()) == 1


def test_control_object_counts_the_merged_copy_binds_at_pre_run_and_frees_it_at_cleanup(case):
    from test_nodes import HostBase, Sampling, hint_image

    class Host(HostBase):  # + ComfyUI ControlBase's memory hook: the chain's needs
        def inference_memory_requirements(self, dtype):
            prev = self.previous_controlnet
            return 0 if prev is None else prev.inference_memory_requirements(dtype)

    class StandIn(CoreControlMixin, Host):
        pass

    model = loader.load_controlnet(case.path)
    handle = NetHandle(model, patcher=object(), name=case.path.name)
    c = StandIn(handle).copy()
    c.set_cond_hint(hint_image().movedim(-1, 1), 1.0, (0.0, 1.0))
    assert c.inference_memory_requirements(torch.float16) == model.bound_bytes > 0
    host_unet = SimpleNamespace(state_dict=lambda: case.host, named_modules=lambda: iter(()))
    adm = case.cfg.adm_in_channels
    fake = SimpleNamespace(model_sampling=Sampling(), diffusion_model=host_unet, model_config=SimpleNamespace(
        unet_config={"context_dim": case.cfg.context_dim, "adm_in_channels": adm}))
    c.pre_run(fake, Sampling().percent_to_sigma)
    assert model.bound_net is not None
    c.cleanup()
    assert model.bound_net is None


def test_fast_path_runs_the_merged_controlnet_and_follows_a_new_merge(case):
    """The fast path's body (forced onto the CPU, as in tests/test_fast.py) runs a Control-LoRA as the
    plain path does, and a new merge (the base model changed) drops what it kept for the old one: its
    graphs replay the old net's weight addresses."""
    import test_fast as tf
    from comfyui_controlnet_core.controlnet_core import fast
    from comfyui_controlnet_core.controlnet_core.control import ControlStack

    fast.release()
    fast.STATS.clear()
    model = loader.load_controlnet(case.path)
    stack = ControlStack([Control(model, tf.hint())])
    assert fast.runner.stack_residuals(stack, tf.make_request(case.cfg)) is NotImplemented  # nothing merged yet
    host = {k: v.clone() for k, v in case.host.items()}
    key = next(k for k in host if k.endswith("attn2.to_k.weight"))
    with torch.no_grad():
        for round_ in range(2):
            stack.pre_run(tf.everything, lambda: host)
            for seed in (1, 2):
                req = tf.make_request(case.cfg, seed=seed)
                got, want = tf.fast_run(stack, req, allow_cpu=True), tf.plain(stack, req)
                assert tf.rel_err(got, want) <= 1e-5, (round_, seed)
            host[key] = host[key] + 0.05  # a LoRA set on the base model between two runs
    assert fast.STATS["eager"] == 4 and not fast.STATS.get("fallback")
    fast.release()


# ------------------------------------------------------------------------------------------
# the example workflow

def test_example_workflow_loads_a_control_lora_in_a_clean_layout():
    import test_workflows as tw

    ui, api = tw.load_pair(tw.WORKFLOWS / "Control-LoRA - Canny (SD1.5).json")
    (loader_node,) = [n for n in api.values() if n["class_type"] == "CNCore_LoadControlNet"]
    assert loader_node["inputs"]["control_net_name"].startswith("control_lora_rank128_v11p_sd15_")
    (apply,) = [n for n in api.values() if n["class_type"] == "CNCore_ApplyControlNet"]
    assert isinstance(apply["inputs"]["control_net"], list)
    # no two node rectangles (title bar of ~30 px included) intersect; the saved view shows them all
    rects = [(n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in ui["nodes"]]
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    ds = ui["extra"]["ds"]
    (ox, oy), scale = ds["offset"], ds["scale"]
    assert scale >= 0.6
    for x0, y0, x1, y1 in rects:
        assert 0 <= (x0 + ox) * scale and (x1 + ox) * scale <= 1600 and 0 <= (y0 + oy) * scale and (y1 + oy) * scale <= 1000


# ------------------------------------------------------------------------------------------
# with ComfyUI's own ModelPatcher (COMFYUI_PATH): a --lowvram partial load

LOWVRAM_SCRIPT = r'''
import copy, importlib.util, json, sys
import torch
comfy_path, pack = sys.argv[1:3]
sys.path.insert(0, comfy_path)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_patcher, comfy.ops
spec = importlib.util.spec_from_file_location("cncore", pack + "/__init__.py", submodule_search_locations=[pack])
module = importlib.util.module_from_spec(spec)
sys.modules["cncore"] = module
spec.loader.exec_module(module)
from cncore.nodes.control_object import HostWeights

ops, cpu = comfy.ops.disable_weight_init, torch.device("cpu")
net = torch.nn.Module()
net.a, net.b = ops.Linear(8, 6), ops.Conv2d(4, 5, 3)
net.c = comfy.ops.scaled_fp8_ops(override_dtype=torch.float8_e4m3fn).Linear(8, 6, bias=False)  # scaled fp8
torch.manual_seed(0)
with torch.no_grad():
    for p in [net.a.weight, net.a.bias, net.b.weight, net.b.bias]:
        p.normal_()
    net.c.weight.copy_(torch.randn(6, 8).to(torch.float8_e4m3fn))
    net.c.scale_weight.fill_(0.37)
diffs = {k: torch.randn(v.shape) for k, v in net.state_dict().items() if not k.startswith("c.scale")}

def patched():
    p = comfy.model_patcher.ModelPatcher(copy.deepcopy(net), load_device=cpu, offload_device=cpu)
    p.add_patches({k: (d,) for k, d in diffs.items()}, 0.5)  # a "diff" patch, as a merged LoRA's
    return p

with torch.inference_mode():  # as ComfyUI runs every prompt
    full = patched()
    full.patch_model(device_to=cpu)  # loaded completely: patches merged into the weights
    low = patched()
    low.load(device_to=cpu, lowvram_model_memory=1)  # nothing fits: every module patched on the fly
    report = {"lowvram_modules": sum(len(getattr(m, "weight_function", [])) > 0 for m in low.model.modules())}
    want, bare, hw = full.model.state_dict(), low.model.state_dict(), HostWeights(low.model)
    want["c.weight"] = want["c.weight"].float() * 0.37  # what the fully loaded fp8 layer computes with
    report["host_weights_err"] = max(float((hw[k] - want[k]).abs().max()) for k in diffs)
    report["state_dict_err"] = min(float((bare[k].float() - want[k]).abs().max()) for k in diffs)
print(json.dumps(report))
'''


@pytest.mark.comfyui
@pytest.mark.skipif(not __import__("os").environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH is not set")
def test_host_weights_of_a_lowvram_partially_loaded_model_include_its_patches(tmp_path):
    """ComfyUI's ModelPatcher, partially loaded: state_dict() lacks the patches (and the fp8 scale),
    HostWeights has them, equal to what the fully loaded model holds."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "lowvram.py"
    script.write_text(LOWVRAM_SCRIPT)
    out = subprocess.run(
        [os.environ.get("COMFYUI_PYTHON", sys.executable), str(script), os.environ["COMFYUI_PATH"],
         str(Path(__file__).resolve().parents[1])], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n[lowvram] {report}")
    assert report["lowvram_modules"] == 3
    assert report["state_dict_err"] > 0.1  # the bare state dict misses every patch (what ComfyUI's ControlLora reads)
    assert report["host_weights_err"] < 1e-6
