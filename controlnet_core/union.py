"""ControlNet Union / ProMax (xinsir `controlnet-union-sdxl-1.0`): one SDXL ControlNet for many kinds
of hint. A "control type" tells it what a hint is, and several hints of different types can go
through one pass of the network, as it was trained (xinsir's multi-condition training, diffusers'
`ControlNetUnionModel`).

A pass with hints h_i of types k_i (xinsir `ControlNetModel_Union.forward`, diffusers
`ControlNetUnionModel.forward`):

    cond_i  = input_hint_block(h_i)                        (B, 320, h, w), the classic hint encoder
    token_i = mean_hw(cond_i) + task_embedding[k_i]        (B, 320)
    t_i     = transformer_layes(token_i)                   a CLIP-style block over the tokens
    guided  = sum_i cond_i + spatial_ch_projs(t_i)         (the offset broadcast over h, w)
    emb     = time and SDXL embeddings + control_add_embedding(sinusoid(one-hot of the k_i))
    then the classic ControlNet encoder, `guided` added after the stem conv (model.ControlNet.encode).

Control types, xinsir's numbering and ComfyUI's names (`CONTROL_TYPES`): 0 openpose, 1 depth,
2 hed/pidi/scribble/ted, 3 canny/lineart/anime_lineart/mlsd, 4 normal, 5 segment, 6 tile,
7 repaint. The Union file has the first 6, ProMax all 8.

"auto" (no type) is ComfyUI's meaning (`comfy/cldm/cldm.py`): the plain ControlNet hint path
(`guided = input_hint_block(hint)`) plus the type embedding of an all-zero one-hot. diffusers has no
such mode (it ignores the hint when no type is given).

Scales. One type per pass (ComfyUI; diffusers with one type): the outputs are scaled by the
strength, as for any ControlNet. Several types in one pass: each type's strength is diffusers'
per-type `conditioning_scale`: it scales that type's hint features and its token before the token
block and its offset after it, and the outputs are not scaled again (diffusers
`ControlNetUnionModel.forward`, `len(control_type_idx) > 1`).

Batch independence. xinsir and diffusers feed the tokens (B, k, 320) to `nn.MultiheadAttention`
with `batch_first=False`, so attention runs along the *batch* axis, the k tokens acting as its
batch: at batch 1 every token attends only to itself (softmax over one key is 1), for any number
of types; at batch > 1 a sample's output depends on the other samples of the batch (a CFG batch,
a batch of different images). We compute the batch-1 result for every sample: each token attends
only to itself, so the attention is `out_proj(v_proj(x))` token by token (exact, whatever the head
count), and a sample's residuals never depend on the rest of the batch. For the same reason
diffusers' extra token (the mean of the stem conv's output) changes nothing and is not computed.

Repaint (ProMax inpaint/outpaint): xinsir's hint is the image with the masked pixels set to 0
(black; `promax/controlnet_union_test_inpainting.py`, comfyui_controlnet_aux's
`black_pixel_for_xinsir_cn`). Our `inpaint` preprocessor marks them -1 (the v1.1 inpaint
ControlNet's convention), so the repaint type maps every value below 0 to 0: the preprocessor's
output feeds it directly. Other types get the hint as it is (ComfyUI's behaviour).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import nn

from .config import ControlNetConfig
from .errors import InputError, LoadError
from .formats import detect
from .formats.union import split_union, union_shape
from .host import Outputs
from .layers import DEFAULT_OPS, timestep_embedding
from .formats.controlnet import controlnet_config, infer_config
from .formats.source import Source, assign_weights
from .model import ConfigMembers, ControlNet

CONTROL_TYPES = (
    "openpose", "depth", "hed/pidi/scribble/ted", "canny/lineart/anime_lineart/mlsd",
    "normal", "segment", "tile", "repaint",
)
AUTO = "auto"
REPAINT = CONTROL_TYPES.index("repaint")
PROMAX = ("the ProMax file of xinsir/controlnet-union-sdxl-1.0 (diffusion_pytorch_model_promax.safetensors), "
          "which has all 8 types")

Part = tuple[int, torch.Tensor, float]  # (type number, hint features, strength)


def type_index(control_type: str | int) -> int:
    """xinsir's number of a control type: from its full name ("canny/lineart/anime_lineart/mlsd"), one
    of its parts ("lineart"), case-insensitive, or the number itself."""
    if isinstance(control_type, int) and not isinstance(control_type, bool):
        if 0 <= control_type < len(CONTROL_TYPES):
            return control_type
    elif isinstance(control_type, str):
        key = control_type.strip().lower()
        for i, name in enumerate(CONTROL_TYPES):
            if key == name or key in name.split("/"):
                return i
    raise InputError(
        f"unknown control type {control_type!r}; choose 'auto' or one of {', '.join(map(repr, CONTROL_TYPES))}"
    )


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TokenBlock(nn.Module):
    """xinsir's `ResidualAttentionBlock` over the type tokens (B, k, C), each token attending only to
    itself (see the module docstring): attention = out_proj(v), v the last third of in_proj."""

    def __init__(self, width: int, ops: Any, **kw: Any):
        super().__init__()
        self.attn = nn.Module()
        self.attn.in_proj = ops.Linear(width, 3 * width, **kw)  # q, k, v stacked (only v matters)
        self.attn.out_proj = ops.Linear(width, width, **kw)
        self.ln_1 = ops.LayerNorm(width, **kw)
        self.ln_2 = ops.LayerNorm(width, **kw)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", ops.Linear(width, 4 * width, **kw)), ("gelu", QuickGELU()), ("c_proj", ops.Linear(4 * width, width, **kw)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        v = self.attn.in_proj(self.ln_1(x))[..., 2 * width:]
        x = x + self.attn.out_proj(v)
        return x + self.mlp(self.ln_2(x))


class TypeEmbedding(nn.Module):
    """diffusers' `TimestepEmbedding` (`control_add_embedding`): linear_2(silu(linear_1(x)))."""

    def __init__(self, dim_in: int, dim_out: int, ops: Any, **kw: Any):
        super().__init__()
        self.linear_1 = ops.Linear(dim_in, dim_out, **kw)
        self.act = nn.SiLU()
        self.linear_2 = ops.Linear(dim_out, dim_out, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class UnionControlNet(ControlNet):
    """A ControlNet Union / ProMax network. As a `control.ControlModel` it is the "auto" type;
    `select_type(name)` gives the model of one control type (`UnionType`), sharing these weights."""

    family = "ControlNet Union"
    fast_path_net = None  # the CUDA runner (fast/) runs the classic forward only
    fusion_key = None           # "auto" runs alone; the types of one network fuse (UnionType)

    def __init__(self, config: ControlNetConfig, num_types: int = 8, token_layers: int = 1, type_embed_dim: int = 256,
                 ops: Any = None, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__(config, ops=ops, device=device, dtype=dtype)
        ops = DEFAULT_OPS if ops is None else ops
        kw = {"device": device, "dtype": dtype}
        width = config.model_channels  # the tokens are added to the hint features: same width
        self.num_types = num_types
        self.type_embed_dim = type_embed_dim
        self.task_embedding = nn.Parameter(torch.empty(num_types, width, **kw))
        self.transformer_layes = nn.Sequential(*(TokenBlock(width, ops, **kw) for _ in range(token_layers)))
        self.spatial_ch_projs = ops.Linear(width, width, **kw)
        self.control_add_embedding = TypeEmbedding(type_embed_dim * num_types, config.time_embed_dim, ops, **kw)
        if device is None or torch.device(device).type != "meta":
            with torch.no_grad():  # xinsir's initialisation of the new parts
                self.task_embedding.normal_(0.0, width ** 0.5)
                self.spatial_ch_projs.weight.zero_()
                self.spatial_ch_projs.bias.zero_()

    @property
    def control_types(self) -> tuple[str, ...]:
        """The types this file knows (6 for Union, 8 for ProMax)."""
        return CONTROL_TYPES[: self.num_types]

    def select_type(self, control_type: str | int) -> "UnionControlNet | UnionType":
        """The model of one control type ("auto": this network itself)."""
        if isinstance(control_type, str) and control_type.strip().lower() == AUTO:
            return self
        index = type_index(control_type)
        if index >= self.num_types:
            name = getattr(self, "source_name", None)
            which = f"{name!r} is a ControlNet Union" if name else "this ControlNet Union"
            raise InputError(
                f"control type {CONTROL_TYPES[index]!r} is not in this file: {which} with {self.num_types} types "
                f"({', '.join(self.control_types)}); use {PROMAX}, or pick one of its types"
            )
        return UnionType(self, index)

    # ---- the pass --------------------------------------------------------------------------

    def type_embedding(self, types: Sequence[int], device: torch.device) -> torch.Tensor:
        """control_add_embedding of the one-hot of `types` (each 256-wide sinusoid of 0 or 1), (1, emb)."""
        onehot = torch.zeros(self.num_types, device=device)
        onehot[list(types)] = 1.0
        sinusoid = timestep_embedding(onehot, self.type_embed_dim).reshape(1, -1)
        return self.control_add_embedding(sinusoid.to(self.dtype))

    def fuse_hints(self, parts: Sequence[Part]) -> torch.Tensor:
        """`guided` of a pass from (type, hint features, strength) parts (module docstring)."""
        single = len(parts) == 1
        task = self.task_embedding.to(device=parts[0][1].device, dtype=self.dtype)
        conds, tokens = [], []
        for index, cond, strength in parts:
            cond = cond.to(self.dtype)
            token = cond.mean(dim=(2, 3)) + task[index]
            if not single:
                cond, token = cond * strength, token * strength
            conds.append(cond)
            tokens.append(token)
        batch = max(t.shape[0] for t in tokens)
        x = torch.stack([t.expand(batch, -1) for t in tokens], dim=1)  # (B, k, C)
        alpha = self.spatial_ch_projs(self.transformer_layes(x))
        guided = None
        for i, (cond, (_, _, strength)) in enumerate(zip(conds, parts)):
            offset = alpha[:, i, :, None, None]
            o = cond + (offset if single else offset * strength)
            guided = o if guided is None else guided + o
        return guided

    def run(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
            guided: torch.Tensor, types: Sequence[int]) -> Outputs:
        """The encoder with the hint features `guided` and the type embedding of `types` ([]: auto)."""
        self.check_inputs(x, None, context, y)
        down, mid = self._encode_with(x, None, timesteps, context, y, guided, self.type_embedding(types, x.device))
        return {"output": down, "middle": [mid]}

    def run_types(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                  parts: Sequence[Part]) -> Outputs:
        """One pass over one or more (type, hint features, strength) parts."""
        if not parts:
            raise InputError("a Union pass needs at least one hint with a control type")
        return self.run(x, timesteps, context, y, self.fuse_hints(parts), [p[0] for p in parts])

    def control_outputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                        y: torch.Tensor | None, embedding: torch.Tensor) -> Outputs:
        """"auto": the plain hint path and the all-zero type embedding (ComfyUI)."""
        return self.run(x, timesteps, context, y, embedding, [])

    def forward(self, x: torch.Tensor, hint: torch.Tensor | None, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, *, hint_embedding: torch.Tensor | None = None,
                control_type: str | int = AUTO) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Unscaled `(down, mid)` for one hint of `control_type` ("auto" or a type), like
        `ControlNet.forward`. Several types in one pass: `ControlStack` of `select_type` models."""
        if hint_embedding is None and hint is None:
            raise InputError("give the hint image or its precomputed hint_embedding")
        self.check_inputs(x, hint, context, y)
        model = self.select_type(control_type)
        emb = model.embed_hint(hint) if hint_embedding is None else hint_embedding
        out = model.control_outputs(x, timesteps, context, y, emb)  # checks the (cheap) shapes once more
        return out["output"], out["middle"][0]


class UnionType(ConfigMembers):
    """One control type of a loaded Union network: a `control.ControlModel` sharing its weights
    (made by `UnionControlNet.select_type`). Controls whose models share `fusion_key` (the same
    network) can be evaluated in one pass: `fused_outputs`."""

    fast_path_net = None

    def __init__(self, net: UnionControlNet, index: int):
        self.net = net
        self.index = index

    def __repr__(self) -> str:
        return f"UnionType({self.name!r})"

    @property
    def name(self) -> str:
        return CONTROL_TYPES[self.index]

    @property
    def fusion_key(self) -> UnionControlNet:
        return self.net

    # the ControlModel members, from the network
    family = UnionControlNet.family

    @property
    def config(self) -> ControlNetConfig:
        return self.net.config

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        if self.index == REPAINT:  # the inpaint preprocessor's -1 marker -> xinsir's black (module docstring)
            hint = hint.clamp_min(0.0)
        return self.net.embed_hint(hint)

    def control_outputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                        y: torch.Tensor | None, embedding: torch.Tensor) -> Outputs:
        return self.net.run_types(x, timesteps, context, y, [(self.index, embedding, 1.0)])

    def fused_outputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                      parts: Sequence[tuple["UnionType", torch.Tensor, float]]) -> Outputs:
        """One pass over several controls of this network: (model, hint features, strength) each."""
        return self.net.run_types(x, timesteps, context, y, [(m.index, e, s) for m, e, s in parts])


# ------------------------------------------------------------------------------------------
# the family's entry points (`loader.FAMILY_LOADERS`)

def load(source: Source, device: Any, dtype: torch.dtype, ops: Any, config: ControlNetConfig | None) -> UnionControlNet:
    name = source.name
    classic, extra = split_union(source.sd, name)
    shape = union_shape(extra, name)
    cfg = controlnet_config(source, classic, config)
    if shape.width != cfg.model_channels or shape.emb_dim != cfg.time_embed_dim:
        raise LoadError(
            f"{name}: the Union part is {shape.width} wide with a {shape.emb_dim}-wide type embedding, but the "
            f"ControlNet is {cfg.model_channels} wide with a {cfg.time_embed_dim}-wide time embedding; the file "
            "is damaged or not a ControlNet Union"
        )
    model = UnionControlNet(cfg, shape.num_types, shape.token_layers, shape.type_embed_dim, ops=ops, device="meta",
                            dtype=dtype)
    return assign_weights(model, {**classic, **extra}, name, f"a {cfg.arch} ControlNet Union with {shape.num_types} types")


def arch(header: dict[str, torch.Tensor], found: detect.Detected) -> str:
    return infer_config(split_union(header, "header")[0], name="header").arch

