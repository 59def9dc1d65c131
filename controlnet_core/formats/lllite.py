"""kohya's ControlNet-LLLite file layout (sd-scripts `networks/control_net_lllite.py`).

One module per patched layer of the SDXL UNet, named `lllite_unet_` + the layer's LDM path with
`.` -> `_`; e.g. `lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` patches the input of
`input_blocks.4.1.transformer_blocks.0.attn1.to_q`. Each module holds

    conditioning1.0   Conv2d(3, e/2, 4, stride 4)           the hint embedding; then by depth:
    conditioning1.2   depth 1: Conv2d(e/2, e, 2, s2)        (8 px per token: the latent's grid)
                      depth 2: Conv2d(e/2, e, 4, s4)        (16 px: the grid after one downsample)
                      depth 3: Conv2d(e/2, e/2, 4, s4) and
    conditioning1.4            Conv2d(e/2, e, 2, s2)        (32 px: after two)
    down.0  Linear(in, m)   mid.0  Linear(m + e, m)   up.0  Linear(m, in)

with ReLU after every conditioning conv but the last and after down/mid (hence the even indices).
The public files use e = 32 (`cond_emb_dim`) and m = 64 (`network_dim`); kohya's default training
flags patch `to_q/to_k/to_v` of attn1 and `to_q` of attn2 in input blocks 4, 5, 7, 8 and the middle
block: 136 modules. As kohya's own loaders do, depth, e, m and the in-width are read per module from
shapes: depth 3 if `conditioning1.4` exists, else 2 if the second conv's kernel is 4, else 1;
e = 2 x `conditioning1.0` out-channels; m and in from `down.0.weight`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from ..errors import LoadError
from ..host import AttnSite

PREFIX = "lllite_unet_"
_NAME = re.compile(
    r"^lllite_unet_(?:(input|output)_blocks_(\d+)|(middle)_block)_1_transformer_blocks_(\d+)_(attn[12])_to_([qkv])$"
)


@dataclass(frozen=True)
class ModuleSpec:
    """One LLLite module as read from the file's shapes."""

    name: str          # the file's module name (key prefix without the trailing dot)
    site: AttnSite
    depth: int         # 1..3: conditioning convs and the grid they reach (level depth - 1)
    cond_emb_dim: int  # e
    mlp_dim: int       # m
    in_dim: int        # width of the projection input it patches

    @property
    def level(self) -> int:
        """The UNet resolution level of its grid: 0 = the latent's, +1 per downsample."""
        return self.depth - 1


def site_of(name: str, file: str) -> AttnSite:
    """The attention-input site a module name patches; anything else is refused in a sentence."""
    m = _NAME.match(name)
    if m is None:
        raise LoadError(
            f"{file}: the LLLite module {name!r} patches a layer that is not the input of an attention projection "
            "(to_q/to_k/to_v of attn1, to_q of attn2 in a transformer block); only LLLite files trained with "
            "kohya's default attention-only settings are supported"
        )
    kind, number, middle, index, attn, proj = m.groups()
    block = ("middle", 0) if middle else (kind, int(number))
    if attn == "attn2" and proj != "q":
        raise LoadError(
            f"{file}: the LLLite module {name!r} patches the text side of cross-attention (attn2 to_{proj}), "
            "which has no image grid to condition; the file is damaged or not a kohya ControlNet-LLLite"
        )
    return AttnSite(block, int(index), attn, proj)


def kohya_depth(block: tuple[str, int]) -> int:
    """The depth kohya gives a module in an SDXL UNet block (sd-scripts `create_modules`)."""
    kind, i = block
    if kind == "input":
        return 1 if i <= 2 else 2 if i <= 5 else 3
    if kind == "middle":
        return 3
    return 3 if i <= 2 else 2 if i <= 5 else 1


def _shape(shapes: Mapping[str, tuple], key: str, file: str) -> tuple:
    if key not in shapes:
        raise LoadError(f"{file}: the weight {key} is missing; the LLLite file is incomplete or damaged")
    return tuple(shapes[key])


def read_modules(shapes: Mapping[str, tuple], file: str) -> list[ModuleSpec]:
    """Every module of a file (keys -> shapes), in the order the UNet meets them."""
    names = sorted({k.split(".", 1)[0] for k in shapes})
    if not names or not all(n.startswith(PREFIX) for n in names):
        other = next((n for n in names if not n.startswith(PREFIX)), "")
        raise LoadError(
            f"{file}: holds {other!r}, which is no kohya ControlNet-LLLite module (names start with {PREFIX!r}); "
            "the file is another LLLite variant (e.g. Anima's DiT LLLite) or damaged"
        )
    specs = []
    for name in names:
        site = site_of(name, file)
        c0 = _shape(shapes, f"{name}.conditioning1.0.weight", file)
        c2 = _shape(shapes, f"{name}.conditioning1.2.weight", file)
        down = _shape(shapes, f"{name}.down.0.weight", file)
        if len(down) != 2:
            raise LoadError(
                f"{file}: the LLLite module {name} has a {len(down)}-D down weight; only Linear (attention) modules "
                "are supported"
            )
        depth = 3 if f"{name}.conditioning1.4.weight" in shapes else 2 if c2[-1] == 4 else 1
        spec = ModuleSpec(name, site, depth, int(c0[0]) * 2, int(down[0]), int(down[1]))
        if depth != kohya_depth(site.block):
            raise LoadError(
                f"{file}: the LLLite module {name} embeds the hint to the grid of UNet level {spec.level}, but "
                f"{site.block[0]} block {site.block[1]} is at level {kohya_depth(site.block) - 1} of an SDXL UNet; "
                "the file does not fit the SDXL UNet"
            )
        specs.append(spec)
    order = {"input": 0, "middle": 1, "output": 2}
    specs.sort(key=lambda s: (order[s.site.block[0]], s.site.block[1], s.site.index, s.site.attn, s.site.proj))
    return specs
