"""ControlNet-LLLite (kohya, SDXL) against kohya's own math, written out here independently.

Fixtures are written in kohya's key layout (sd-scripts `networks/control_net_lllite.py`: one module
per patched projection, `lllite_unet_<ldm path>` + `conditioning1.{0,2,4}`, `down.0`, `mid.0`,
`up.0`) with random weights, `up` included (kohya zero-initialises it: a fresh file would test
nothing). The reference is `LLLiteModule.forward` as kohya writes it:

    cx = conditioning1(image in [-1, 1]) -> (B, h*w, e)     convs: k4 s4, then by depth k2 s2 /
                                                            k4 s4 / k4 s4 + k2 s2, ReLU between
    cx = cx.repeat(2, 1, 1) if x has twice cx's batch       (inference with CFG)
    out = org(x + up(mid(cat([cx, down(x)], -1))) * multiplier)

applied here with F.conv2d / F.linear on the file's tensors (no code of ours), module by module,
and end to end by wrapping the reference UNet's projections exactly as kohya's `apply_to` does
(`org_module.forward = lllite.forward`) against our attention-input hook.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from comfyui_controlnet_core.controlnet_core import loader
from comfyui_controlnet_core.controlnet_core.control import Control, ControlSettings, ControlStack
from comfyui_controlnet_core.controlnet_core.errors import InputError, LoadError, UnsupportedFamilyError
from comfyui_controlnet_core.controlnet_core.host import ATTENTION, AttnSite, StepRequest
from comfyui_controlnet_core.controlnet_core.unet import UNet
from helpers_models import _randomize_, make_tiny_config, random_controlnet, rel_err

# A tiny SDXL-shaped UNet: SDXL's block numbering (attention in input 4, 5 at level 1, 7, 8 at
# level 2, and the middle), widths 128 and 192, 1 / 2 / 2 transformer blocks, SDXL's text width.
CFG = dataclasses.replace(make_tiny_config("sdxl"), channel_mult=(1, 2, 3), context_dim=2048)
TINY_BLOCKS = {"input_blocks_4": (1, 128), "input_blocks_5": (1, 128), "input_blocks_7": (2, 192),
               "input_blocks_8": (2, 192), "middle_block": (2, 192)}
SDXL_BLOCKS = {"input_blocks_4": (2, 640), "input_blocks_5": (2, 640), "input_blocks_7": (10, 1280),
               "input_blocks_8": (10, 1280), "middle_block": (10, 1280)}
DEPTH = {"input_blocks_1": 1, "input_blocks_4": 2, "input_blocks_5": 2, "input_blocks_7": 3, "input_blocks_8": 3,
         "middle_block": 3}  # kohya's rule for SDXL block numbers
PROJECTIONS = (("attn1", "q"), ("attn1", "k"), ("attn1", "v"), ("attn2", "q"))


def everything(p: float) -> float:
    return 1e9 if p <= 0 else (0.0 if p >= 1 else 10.0 * (1.0 - p))


# ------------------------------------------------------------------------------------------
# fixtures in kohya's layout

def module_names(blocks: dict) -> list[tuple[str, str, int]]:
    """(module name, block, depth) for every module, kohya's naming."""
    out = []
    for blk, (n, _) in blocks.items():
        for i in range(n):
            for attn, proj in PROJECTIONS:
                out.append((f"lllite_unet_{blk}_1_transformer_blocks_{i}_{attn}_to_{proj}", blk, DEPTH[blk]))
    return out


def lllite_state_dict(blocks: dict = TINY_BLOCKS, e: int = 8, m: int = 16, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights, shapes from kohya's `LLLiteModule.__init__` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def put(key, *shape):
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        scale = 1 / math.sqrt(fan_in) if len(shape) > 1 else 0.1
        sd[key] = (torch.randn(shape, generator=g) * scale).to(dtype)

    for name, blk, depth in module_names(blocks):
        in_dim = blocks[blk][1]
        convs = {1: [(e // 2, 3, 4), (e, e // 2, 2)], 2: [(e // 2, 3, 4), (e, e // 2, 4)],
                 3: [(e // 2, 3, 4), (e // 2, e // 2, 4), (e, e // 2, 2)]}[depth]
        for j, (co, ci, k) in enumerate(convs):
            put(f"{name}.conditioning1.{2 * j}.weight", co, ci, k, k)
            put(f"{name}.conditioning1.{2 * j}.bias", co)
        for part, (o, i) in {"down": (m, in_dim), "mid": (m, m + e), "up": (in_dim, m)}.items():
            put(f"{name}.{part}.0.weight", o, i)
            put(f"{name}.{part}.0.bias", o)
    return sd


# ------------------------------------------------------------------------------------------
# the reference: kohya's LLLiteModule, on the raw tensors

def ref_cond_emb(sd: dict, name: str, image: torch.Tensor) -> torch.Tensor:
    """conditioning1 on an image already in [-1, 1]: (B, h*w, e)."""
    w = lambda k: sd[f"{name}.conditioning1.{k}.weight"].float()  # noqa: E731
    b = lambda k: sd[f"{name}.conditioning1.{k}.bias"].float()  # noqa: E731
    x = F.conv2d(image, w(0), b(0), stride=4)
    if f"{name}.conditioning1.4.weight" in sd:  # depth 3
        x = F.conv2d(F.relu(x), w(2), b(2), stride=4)
        x = F.conv2d(F.relu(x), w(4), b(4), stride=2)
    else:  # depth 2 (k4 s4) or 1 (k2 s2)
        x = F.conv2d(F.relu(x), w(2), b(2), stride=sd[f"{name}.conditioning1.2.weight"].shape[-1])
    n, c, h, ww = x.shape
    return x.view(n, c, h * ww).permute(0, 2, 1)


def ref_term(sd: dict, name: str, x: torch.Tensor, cx: torch.Tensor, multiplier: float) -> torch.Tensor:
    """kohya's cx before `org(x + cx)`."""
    if x.shape[0] // 2 == cx.shape[0]:  # inference: cond + uncond
        cx = cx.repeat(2, 1, 1)
    p = lambda part: (sd[f"{name}.{part}.0.weight"].float(), sd[f"{name}.{part}.0.bias"].float())  # noqa: E731
    cx = torch.cat([cx, F.relu(F.linear(x, *p("down")))], dim=2)
    cx = F.relu(F.linear(cx, *p("mid")))
    return F.linear(cx, *p("up")) * multiplier


def pad_to(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Our odd-size rule, written out: repeat the last row/column up to a multiple of the stride."""
    ph, pw = -image.shape[-2] % multiple, -image.shape[-1] % multiple
    if ph:
        image = torch.cat([image, image[..., -1:, :].expand(*image.shape[:-2], ph, image.shape[-1])], dim=-2)
    if pw:
        image = torch.cat([image, image[..., :, -1:].expand(*image.shape[:-1], pw)], dim=-1)
    return image


def ref_embeddings(sd: dict, blocks: dict, hint01: torch.Tensor) -> dict[str, torch.Tensor]:
    image = hint01 * 2 - 1
    return {name: ref_cond_emb(sd, name, pad_to(image, 8 * 2 ** (depth - 1))) for name, _, depth in module_names(blocks)}


@contextmanager
def kohya_applied(unet: UNet, lllites: list[tuple[dict, dict, float]]):
    """kohya's `apply_to` on our UNet: each patched Linear's forward becomes `org(x + cx)`. Several
    LLLites are applied one after the other, the first listed acting first (innermost org last)."""
    wrapped = []
    try:
        for sd, embs, mult in reversed(lllites):  # the last applied wraps outermost, so it acts first
            for name in embs:
                path = name[len("lllite_unet_"):]
                blk, rest = path.split("_1_transformer_blocks_")
                idx, attn, _, proj = rest.split("_")
                block = unet.middle_block if blk == "middle_block" else unet.input_blocks[int(blk.split("_")[-1])]
                lin = getattr(getattr(block[1].transformer_blocks[int(idx)], attn), f"to_{proj}")
                org = lin.forward

                def forward(x, org=org, sd=sd, name=name, cx=embs[name], mult=mult):
                    return org(x + ref_term(sd, name, x, cx, mult))

                lin.forward = forward
                wrapped.append(lin)
        yield
    finally:
        for lin in wrapped:
            lin.__dict__.pop("forward", None)


def tiny_unet(seed: int = 0) -> UNet:
    unet = UNet(CFG)
    _randomize_(unet.named_parameters(), seed)
    return unet.eval()


def request(batch_rows=((0, 1)), size=(8, 8), seed=1, sigma=5.0) -> StepRequest:
    g = torch.Generator().manual_seed(seed)
    b = len(batch_rows)
    return StepRequest(torch.randn(b, 4, *size, generator=g), torch.full((b,), sigma), torch.full((b,), 400.0),
                       torch.randn(b, 5, CFG.context_dim, generator=g), torch.randn(b, 2816, generator=g), batch_rows)


def hint_for(size, batch=1, seed=2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 8 * size[0], 8 * size[1], generator=g)


@pytest.fixture(scope="module")
def tiny_sd():
    return lllite_state_dict()


@pytest.fixture(scope="module")
def tiny(tiny_sd):
    return loader.load_controlnet(tiny_sd, name="tiny_lllite.safetensors")


# ------------------------------------------------------------------------------------------
# loading: detection, shapes, the full-size layout

def test_full_size_file_loads_and_every_module_matches_kohya(tmp_path):
    """The public layout (e = 32, m = 64, 136 modules; 46 MB in fp16) from a .safetensors file."""
    sd = lllite_state_dict(SDXL_BLOCKS, e=32, m=64, seed=5, dtype=torch.float16)
    assert sum(t.numel() for t in sd.values()) == 22_969_600  # kohya's count for this config
    path = tmp_path / "controllllite_v01032064e_sdxl_canny.safetensors"
    safetensors.torch.save_file(sd, path)
    # the byte count of the file kohya's own classes write for this config (`ControlNetLLLite(unet, 32,
    # 64).save_weights(path, torch.float16, None)`, measured for the control-families note, 4.1): the
    # header (every key name and shape) has the same length
    assert path.stat().st_size == 46_172_168
    info = loader.inspect_controlnet(path)
    assert (info.family, info.arch, info.supported) == ("ControlNet-LLLite", "sdxl", True)
    net = loader.load_controlnet(path)
    assert net.family == "ControlNet-LLLite" and len(net.specs) == 136 and net.dtype == torch.float32
    assert {(s.cond_emb_dim, s.mlp_dim) for s in net.specs} == {(32, 64)}
    assert {s.site.block: (s.depth, s.in_dim) for s in net.specs} == {
        ("input", 4): (2, 640), ("input", 5): (2, 640), ("input", 7): (3, 1280), ("input", 8): (3, 1280),
        ("middle", 0): (3, 1280)}
    assert net.host_layout == (320, (1, 2, 4), 2)  # SDXL's, as an SDXL ControlNet reports it

    latent = (4, 6)  # grids: 2x3 tokens at level 1, 1x2 at level 2
    hint = hint_for(latent)
    embs = net.embed_hint(hint)
    outs = dict(net.control_outputs(None, None, None, None, embs)[ATTENTION])
    ref = ref_embeddings(sd, SDXL_BLOCKS, hint)
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    for s in net.specs:
        grid = (2, 3) if s.level == 1 else (1, 2)
        x = torch.randn(2, grid[0] * grid[1], s.in_dim, generator=g)  # a CFG batch, one hint
        org = torch.nn.Linear(s.in_dim, 8)
        want = org(x + ref_term(sd, s.name, x, ref[s.name], 1.0))
        got = org(x + outs[s.site](x, grid))
        worst = max(worst, rel_err(got, want))
    assert worst <= 1e-4, worst


def test_widths_and_depths_are_read_per_module_as_kohya_loaders_do(tiny):
    assert len(tiny.specs) == 32
    assert {(s.cond_emb_dim, s.mlp_dim) for s in tiny.specs} == {(8, 16)}
    assert [s.site for s in tiny.specs[:5]] == [
        AttnSite(("input", 4), 0, "attn1", "k"), AttnSite(("input", 4), 0, "attn1", "q"),
        AttnSite(("input", 4), 0, "attn1", "v"), AttnSite(("input", 4), 0, "attn2", "q"),
        AttnSite(("input", 5), 0, "attn1", "k")]
    assert tiny.output_levels() == [1, 1, 2, 2, 2]  # one weighted output per patched block
    assert tiny.host_layout == (64, (1, 2, 3), 2) == (CFG.model_channels, CFG.channel_mult, CFG.num_res_blocks)
    # depth 1 (k2 s2 after the first conv) is told from the kernel, as kohya's loaders do
    one = loader.load_controlnet(lllite_state_dict({"input_blocks_1": (1, 64)}), name="level0.safetensors")
    assert {(s.depth, s.level, s.in_dim) for s in one.specs} == {(1, 0, 64)}
    # a module whose depth does not fit its block (kohya gives output block 7 depth 1)
    sd = lllite_state_dict({"input_blocks_4": (1, 128)})
    sd = {k.replace("input_blocks_4", "output_blocks_7"): v for k, v in sd.items()}
    with pytest.raises(LoadError, match="grid of UNet level 1.*output block 7 is at level 0"):
        loader.load_controlnet(sd, name="moved.safetensors")


@pytest.mark.parametrize("change, pattern", [
    (lambda sd: {**sd, "lllite_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2.down.0.weight": torch.zeros(16, 128)},
     "ff_net_2.*not the input of an attention projection"),
    (lambda sd: {**sd, "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.down.0.weight": torch.zeros(16, 128)},
     "text side of cross-attention"),
    (lambda sd: {k: v for k, v in sd.items() if not k.endswith("input_blocks_5_1_transformer_blocks_0_attn1_to_v.mid.0.weight")},
     "input_blocks_5_1_transformer_blocks_0_attn1_to_v.mid.0.weight is missing|1 weights are missing"),
    (lambda sd: {**sd, "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.mid.0.weight": torch.zeros(16, 99)},
     "has shape \\(16, 99\\)"),
])
def test_damaged_or_unsupported_files_are_refused_in_a_sentence(tiny_sd, change, pattern):
    with pytest.raises(LoadError, match=pattern):
        loader.load_controlnet(change(dict(tiny_sd)), name="x.safetensors")


def test_anima_dit_lllite_is_named_not_misread():
    sd = {"lllite_conditioning1.conv1.weight": torch.zeros(1), "lllite_dit_blocks_0_attn_q.down.weight": torch.zeros(1)}
    with pytest.raises(UnsupportedFamilyError, match="Anima ControlNet-LLLite"):
        loader.load_controlnet(sd, name="anima.safetensors")


# ------------------------------------------------------------------------------------------
# end to end on the reference UNet against kohya's wrapped projections

@pytest.mark.parametrize("size", [(8, 8), (9, 11)], ids=["even", "odd"])
def test_unet_with_lllite_equals_kohyas_wrapped_projections(tiny, tiny_sd, size):
    """CFG batch, one hint (cx repeated), strength = kohya's multiplier. Odd latent sizes: the grid at
    level l is ceil(h / 2**l); the hint is padded by repeating its edge (pad_to above)."""
    unet = tiny_unet()
    hint = hint_for(size)
    c = Control(tiny, hint, ControlSettings(strength=0.7))
    c.pre_run(everything, unet.state_dict)
    r = request(size=size)
    with torch.no_grad():
        got = unet(r.x, r.timesteps, r.context, r.y, control=c.residuals(r))
        plain = unet(r.x, r.timesteps, r.context, r.y)
        with kohya_applied(unet, [(tiny_sd, ref_embeddings(tiny_sd, TINY_BLOCKS, hint), 0.7)]):
            want = unet(r.x, r.timesteps, r.context, r.y)
    assert rel_err(got, want) <= 1e-4, rel_err(got, want)
    assert rel_err(plain, want) > 1e-2  # the control does something
    with torch.no_grad():
        assert torch.equal(unet(r.x, r.timesteps, r.context, r.y), plain)  # nothing stays patched


def test_odd_size_rule_keeps_each_token_on_its_own_pixels(tiny):
    """Padding, not stretching: tokens whose pixels lie inside the smaller hint embed exactly as in
    the larger image it was cut from."""
    big = hint_for((16, 16))
    small = big[..., : 8 * 9, : 8 * 11]
    for s, e_big, e_small in zip(tiny.specs, tiny.embed_hint(big), tiny.embed_hint(small)):
        grid = (math.ceil(9 / 2 ** s.level), math.ceil(11 / 2 ** s.level))
        assert tuple(e_small.shape[-2:]) == grid
        stride = 8 * 2 ** s.level  # pixels per token
        inside = (72 // stride, 88 // stride)  # tokens whose pixels all lie in the 72x88 hint
        torch.testing.assert_close(e_small[..., : inside[0], : inside[1]], e_big[..., : inside[0], : inside[1]])


def test_strength_start_end_and_cond_only(tiny, tiny_sd):
    unet = tiny_unet()
    hint = hint_for((8, 8))
    r = request()
    with torch.no_grad():
        plain = unet(r.x, r.timesteps, r.context, r.y)
        both = Control(tiny, hint, ControlSettings(strength=1.0))
        both.pre_run(everything)
        full = unet(r.x, r.timesteps, r.context, r.y, control=both.residuals(r))
        late = Control(tiny, hint, ControlSettings(start_percent=0.6))  # active from sigma 4.0 down
        late.pre_run(everything)
        assert late.residuals(r) is None  # sigma 5: not yet; the host gets no patch at all
        assert late.residuals(request(sigma=4.0)) is not None
        zero = Control(tiny, hint, ControlSettings(strength=0.0))
        zero.pre_run(everything)
        assert zero.residuals(r) is None
        cond_only = Control(tiny, hint, ControlSettings(apply_to="cond-only"))
        cond_only.pre_run(everything)
        out = unet(r.x, r.timesteps, r.context, r.y, control=cond_only.residuals(r))
    torch.testing.assert_close(out[0], full[0], rtol=1e-5, atol=1e-6)  # the cond row as with both
    torch.testing.assert_close(out[1], plain[1], rtol=1e-5, atol=1e-6)  # the uncond row untouched
    assert not torch.allclose(out[0], plain[0], atol=1e-3)


def test_weights_are_one_per_patched_block_and_masks_follow_the_token_grid(tiny, tiny_sd):
    hint = hint_for((8, 8))
    ref = ref_embeddings(tiny_sd, TINY_BLOCKS, hint)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # the left half of the image
    weights = (1.0, 0.5, 0.25, 2.0, 3.0)  # input 4, 5, 7, 8, middle
    c = Control(tiny, hint, ControlSettings(strength=0.5, weights=weights), mask=mask)
    c.pre_run(everything)
    r = request()
    patches = c.residuals(r)[ATTENTION]
    block_w = dict(zip([("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0)], weights))
    g = torch.Generator().manual_seed(4)
    for s in tiny.specs:
        grid = (4, 4) if s.level == 1 else (2, 2)
        x = torch.randn(2, grid[0] * grid[1], s.in_dim, generator=g)
        # the left half of a 4x4 / 2x2 grid, tokens in row-major order (the UNet's flatten)
        tokens = torch.tensor([[1.0 if j % grid[1] < grid[1] // 2 else 0.0] for j in range(grid[0] * grid[1])])
        want = ref_term(tiny_sd, s.name, x, ref[s.name], 0.5 * block_w[s.site.block]) * tokens
        (fn,) = patches[s.site]
        torch.testing.assert_close(fn(x, grid), want, rtol=1e-5, atol=1e-6)
    soft = Control(tiny, hint, ControlSettings(weights="soft")).weights
    assert soft == [0.825 ** (4 - i) for i in range(5)]
    assert Control(tiny, hint, ControlSettings(weights="paper")).weights == [2.0, 2.0, 4.0, 4.0, 4.0]
    with pytest.raises(InputError, match="3 weights given.*ControlNet-LLLite: one per UNet block"):
        Control(tiny, hint, ControlSettings(weights=(1.0, 1.0, 1.0)))


def test_a_stack_of_lllite_and_controlnet_and_of_two_lllites(tiny, tiny_sd):
    """One stack: the ControlNet's residuals and the LLLite's attention patches in the same call;
    two LLLites on one site compose, the first in the stack acting first."""
    unet = tiny_unet()
    cn = random_controlnet(CFG, seed=7)
    other_sd = lllite_state_dict(seed=9)
    other = loader.load_controlnet(other_sd, name="other.safetensors")
    hint = hint_for((8, 8))
    r = request()
    a, b, d = Control(tiny, hint, ControlSettings(strength=0.8)), Control(cn, hint), Control(other, hint)
    with torch.no_grad():
        stack = ControlStack([b, a])
        stack.pre_run(everything, unet.state_dict)
        got = unet(r.x, r.timesteps, r.context, r.y, control=stack.residuals(r))
        with kohya_applied(unet, [(tiny_sd, ref_embeddings(tiny_sd, TINY_BLOCKS, hint), 0.8)]):
            want = unet(r.x, r.timesteps, r.context, r.y, control=b.residuals(r))
        assert rel_err(got, want) <= 1e-4
        two = ControlStack([a, d])
        two.pre_run(everything)
        got = unet(r.x, r.timesteps, r.context, r.y, control=two.residuals(r))
        embs = [(tiny_sd, ref_embeddings(tiny_sd, TINY_BLOCKS, hint), 0.8),
                (other_sd, ref_embeddings(other_sd, TINY_BLOCKS, hint), 1.0)]
        with kohya_applied(unet, embs):
            want = unet(r.x, r.timesteps, r.context, r.y)
    assert rel_err(got, want) <= 1e-4


# ------------------------------------------------------------------------------------------
# bad hosts and stacks

def test_an_lllite_for_another_unet_or_an_sd15_host_is_refused_before_the_first_step(tiny):
    wide = loader.load_controlnet(lllite_state_dict({**TINY_BLOCKS, "input_blocks_4": (1, 256)}), name="wide.safetensors")
    c = Control(wide, hint_for((8, 8)))
    unet = tiny_unet()
    with pytest.raises(InputError, match="attention in input block 4 is 256 wide, but the model being sampled has 128"):
        c.pre_run(everything, unet.state_dict)
    deep = loader.load_controlnet(lllite_state_dict({**TINY_BLOCKS, "middle_block": (3, 192)}), name="deep.safetensors")
    with pytest.raises(InputError, match="no transformer block 2 in the middle block"):
        Control(deep, hint_for((8, 8))).pre_run(everything, unet.state_dict)
    sd15 = UNet(make_tiny_config("sd15"))
    with pytest.raises(InputError, match="ControlNet-LLLite .* 128 wide, but the model being sampled has 64"):
        Control(tiny, hint_for((8, 8))).pre_run(everything, sd15.state_dict)
    # a host that calls the patch anyway gets a sentence, not a matmul error
    c = Control(tiny, hint_for((8, 8)))
    c.pre_run(everything)
    (fn,) = c.residuals(request())[ATTENTION][AttnSite(("input", 4), 0, "attn1", "q")]
    with pytest.raises(InputError, match="expects an attention input 128 wide, the UNet's is 64"):
        fn(torch.zeros(2, 16, 64), (4, 4))
    with pytest.raises(InputError, match="4x4 tokens but the UNet's block has 3x5"):
        fn(torch.zeros(2, 15, 128), (3, 5))
    # and our UNet refuses sites it does not have
    with pytest.raises(InputError, match="output block 0, transformer block 5"):
        unet(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 5, 2048), torch.zeros(1, 2816),
             control={"input": [], "middle": [], "output": [], ATTENTION: {AttnSite(("output", 0), 5, "attn1", "q"): []}})


def test_stacking_with_a_controlnet_for_another_base_model_is_refused(tiny):
    sd15 = random_controlnet(make_tiny_config("sd15"))
    with pytest.raises(InputError, match="different architectures.*ControlNet-LLLite"):
        ControlStack([Control(tiny, hint_for((8, 8))), Control(sd15, hint_for((8, 8)))])


# ------------------------------------------------------------------------------------------
# ComfyUI's protocol, on test_nodes' stand-in host (the real one: tests/test_comfyui_lllite.py)

def comfy_control(handle, strength=0.6, start=0.0, end=1.0, entries=()):
    from test_nodes import StandInControl

    c = StandInControl(handle).copy()
    c.set_cond_hint(hint_for((8, 8)), strength, (start, end))
    c.cncore_entries = list(entries)
    return c


def comfy_step():
    g = torch.Generator().manual_seed(6)
    cond = {"c_crossattn": torch.randn(2, 5, 2048, generator=g), "y": torch.randn(2, 2816, generator=g)}
    return torch.randn(2, 4, 8, 8, generator=g), torch.full((2,), 3.0), cond


def test_comfyui_attention_patches_are_registered_for_one_call_and_match_kohya(tiny, tiny_sd):
    from comfyui_controlnet_core.nodes.control_object import NetHandle
    from test_nodes import Sampling, fake_model

    handle = NetHandle(tiny, patcher=object(), name="tiny_lllite.safetensors")
    c = comfy_control(handle)
    c.pre_run(fake_model(2048, 2816), Sampling().percent_to_sigma)
    x, t, cond = comfy_step()
    other = object()  # another pack's patch, already in the options ComfyUI built for this call
    shared = {"attn1_patch": [other]}
    opts = {"cond_or_uncond": [0, 1], "patches": shared}
    assert c.get_control(x, t, cond, 2, opts) is None  # no residuals: only patches
    assert shared == {"attn1_patch": [other]} and opts["patches"] is not shared  # shared dicts untouched
    a1, a2 = opts["patches"]["attn1_patch"], opts["patches"]["attn2_patch"]
    assert a1[0] is other and len(a1) == 2 and len(a2) == 1

    # ComfyUI's BasicTransformerBlock: attn1_patch(n, n, n, extra), attn2_patch(n, context, context, extra)
    ref = ref_embeddings(tiny_sd, TINY_BLOCKS, hint_for((8, 8)))
    n = torch.randn(2, 16, 128)
    extra = {"block": ("input", 4), "block_index": 0, "activations_shape": [2, 128, 4, 4], "cond_or_uncond": [0, 1]}
    pre = "lllite_unet_input_blocks_4_1_transformer_blocks_0_"
    for proj, got in zip("qkv", a1[1](n, n, n, extra)):
        torch.testing.assert_close(got, n + ref_term(tiny_sd, pre + f"attn1_to_{proj}", n, ref[pre + f"attn1_to_{proj}"], 0.6))
    ctx = torch.randn(2, 5, 2048)
    q, k, v = a2[0](n, ctx, ctx, extra)
    assert k is ctx and v is ctx
    torch.testing.assert_close(q, n + ref_term(tiny_sd, pre + "attn2_to_q", n, ref[pre + "attn2_to_q"], 0.6))
    assert all(o is n for o in a1[1](n, n, n, {**extra, "block": ("output", 3)}))  # not patched there
    assert all(o is n for o in a1[1](n, n, n, {"block_index": 0}))  # outside a UNet block

    # outside start/end nothing is registered
    late = comfy_control(handle, start=0.9)
    late.pre_run(fake_model(2048, 2816), Sampling().percent_to_sigma)
    opts = {"cond_or_uncond": [0, 1]}
    assert late.get_control(x, t, cond, 2, opts) is None and "patches" not in opts


def test_comfyui_lllite_with_a_controlnet_in_one_stack(tiny):
    """The stack's ControlNet gets SDXL's `y` although the main control (the LLLite) reads none."""
    from comfyui_controlnet_core.nodes.control_object import BoundEntry, NetHandle
    from test_nodes import Sampling, fake_model

    cn = NetHandle(random_controlnet(CFG, seed=7), patcher=object(), name="tiny_xl_cn.safetensors")
    both = comfy_control(NetHandle(tiny, object(), "tiny_lllite.safetensors"),
                         entries=[BoundEntry(cn, hint_for((8, 8)), 0.5, 0.0, 1.0, None)])
    alone = comfy_control(cn, strength=0.5)
    for c in (both, alone):
        c.pre_run(fake_model(2048, 2816), Sampling().percent_to_sigma)
    x, t, cond = comfy_step()
    opts = {"cond_or_uncond": [0, 1]}
    got = both.get_control(x, t, cond, 2, opts)
    want = alone.get_control(x, t, cond, 2, {"cond_or_uncond": [0, 1]})
    assert len(got["output"]) == 9 and all(torch.equal(a, b) for a, b in zip(got["output"], want["output"]))
    assert torch.equal(got["middle"][0], want["middle"][0])
    assert len(opts["patches"]["attn1_patch"]) == 1


def test_comfyui_refuses_lllite_on_sd15_and_finds_the_grid_without_activations_shape(tiny):
    from comfyui_controlnet_core.nodes import adapter
    from comfyui_controlnet_core.nodes.control_object import NetHandle, token_grid
    from test_nodes import Sampling, conditioning, fake_model

    handle = NetHandle(tiny, object(), "tiny_lllite.safetensors")
    with pytest.raises(InputError, match="ControlNet-LLLite 'tiny_lllite.safetensors' is made for SDXL models, but the "
                                         "checkpoint being sampled is SD1.x"):
        comfy_control(handle).pre_run(fake_model(768, None), Sampling().percent_to_sigma)
    with pytest.raises(InputError, match="made for SDXL models.*conditioning comes from SD1.x"):
        adapter.check_conditioning([handle], conditioning(768), conditioning(768))
    # older hosts without activations_shape: halve the latent (rounding up) until the count fits
    assert token_grid({"original_shape": [2, 4, 9, 11]}, 30) == (5, 6)
    assert token_grid({"original_shape": [2, 4, 9, 11]}, 9) == (3, 3)
    assert token_grid({"activations_shape": [2, 128, 4, 6], "original_shape": [2, 4, 8, 12]}, 24) == (4, 6)


def test_the_shipped_workflow_loads_an_lllite_for_an_sdxl_checkpoint():
    import test_workflows as tw

    ui, api = tw.load_pair(tw.WORKFLOWS / "ControlNet-LLLite - Canny (SDXL).json")
    by_type = {n["class_type"]: n["inputs"] for n in api.values()}
    assert by_type["CNCore_LoadControlNet"]["control_net_name"].startswith("controllllite_")
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == "sd_xl_base_1.0.safetensors"
    assert (by_type["EmptyLatentImage"]["width"], by_type["EmptyLatentImage"]["height"]) == (1024, 1024)
    apply = by_type["CNCore_ApplyControlNet"]
    assert apply["image"][0] in {k for k, n in api.items() if n["class_type"] == "CNCore_Preprocessor"}
