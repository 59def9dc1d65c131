"""The architecture descriptions: a ControlNet's (and of the UNet it was copied from), and a
T2I-Adapter's (`AdapterConfig`, below). Other families read theirs from their files' shapes.

One frozen dataclass fully describes a network; `model.ControlNet(config)` builds it. The presets
are the public SD1.x / SD2.x / SDXL shapes; tests build the same architectures at tiny widths with
`dataclasses.replace(SD15, model_channels=32, ...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHS = ("sd15", "sd21", "sdxl")


@dataclass(frozen=True)
class ControlNetConfig:
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Transformer blocks per SpatialTransformer at each level (0: that level has no attention).
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    context_dim: int = 768
    # Attention heads: a fixed count (SD1.x: 8) unless head_dim is set (SD2.x/SDXL: 64-dim heads).
    num_heads: int = 8
    head_dim: int | None = None
    # SD2.x/SDXL project into and out of the transformer with Linear layers, SD1.x with 1x1 convs.
    use_linear_projection: bool = False
    # SDXL's pooled-text + size conditioning vector `y` (2816 wide); None for SD1.x/SD2.x.
    adm_in_channels: int | None = None
    in_channels: int = 4
    hint_channels: int = 3
    norm_groups: int = 32
    # Hint encoder: 3->16->16->32->32->96->96->256->model_channels, stride 2 entering each of the
    # last three widths (8x down in all, 512 px -> 64 latent cells).
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"transformer_depth has {len(self.transformer_depth)} levels but channel_mult has "
                f"{len(self.channel_mult)}; give one depth per level"
            )
        for mult in self.channel_mult:
            if (self.model_channels * mult) % self.norm_groups:
                raise ValueError(
                    f"width {self.model_channels * mult} is not divisible by {self.norm_groups} "
                    "GroupNorm groups"
                )

    @property
    def arch(self) -> str:
        """The family name users know: 'sdxl' has `y`, 'sd21' linear projections, else 'sd15'."""
        if self.adm_in_channels is not None:
            return "sdxl"
        return "sd21" if self.use_linear_projection else "sd15"

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def num_outputs(self) -> int:
        """Residuals handed to the UNet: one per encoder block (incl. the stem conv) + middle."""
        levels = len(self.channel_mult)
        return 1 + levels * self.num_res_blocks + (levels - 1) + 1

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, width of a head) for a transformer of `channels` width."""
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        return self.num_heads, channels // self.num_heads


SD15 = ControlNetConfig()

SD21 = ControlNetConfig(context_dim=1024, head_dim=64, use_linear_projection=True)

SDXL = ControlNetConfig(
    channel_mult=(1, 2, 4),
    transformer_depth=(0, 2, 10),
    transformer_depth_middle=10,
    context_dim=2048,
    head_dim=64,
    use_linear_projection=True,
    adm_in_channels=2816,
)

PRESETS: dict[str, ControlNetConfig] = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}


# ------------------------------------------------------------------------------------------------
# T2I-Adapter (t2i_adapter.py)

KINDS = ("full", "full_xl", "light")
LEVELS = 4  # every released adapter has four feature levels

@dataclass(frozen=True)
class AdapterConfig:
    """Everything that tells one T2I-Adapter architecture from another.

    kind:           "full" (SD1.x), "full_xl" (SDXL) or "light" (SD1.x);
    in_channels:    the hint channels the network reads: 3 (RGB) or 1 (gray, the mean of RGB);
    channels:       feature width per level (= the UNet block width it is added to);
    num_res_blocks: ResBlocks per level (full, full_xl: 2; light: 4).
    """

    kind: str = "full"
    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.kind not in KINDS:
            raise ValueError(f"unknown T2I-Adapter kind {self.kind!r}; use one of {KINDS}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"a T2I-Adapter reads 1 (gray) or 3 (RGB) hint channels, not {self.in_channels}")
        c = self.channels
        if len(c) != LEVELS or min(c) <= 0 or self.num_res_blocks < 1:
            raise ValueError(f"a T2I-Adapter has {LEVELS} levels of positive width and >= 1 ResBlock each; got {c}")
        if any(w % c[0] for w in c):
            raise ValueError(f"level widths {c} are not multiples of the first; they fit no UNet")
        if self.kind == "light" and any(w % 4 for w in c):
            raise ValueError(f"a light adapter works at a quarter of each width; {c} are not multiples of 4")
        if self.kind != "full" and c[3] != c[2]:
            raise ValueError(f"the last two levels of a {self.kind} adapter share one width; got {c}")

    @property
    def xl(self) -> bool:
        return self.kind == "full_xl"

    @property
    def unshuffle(self) -> int:
        """The pixel-unshuffle factor: hint pixels per side of one input cell."""
        return 16 if self.xl else 8

    @property
    def pooled_levels(self) -> tuple[int, ...]:
        """Levels that start with a 2x average pool."""
        return (2,) if self.xl else (1, 2, 3)

    @property
    def arch(self) -> str:
        return "sdxl" if self.xl else "sd15"

    @property
    def host_layout(self) -> tuple:
        """The UNet it fits, as (model_channels, channel_mult, num_res_blocks). SDXL's UNet has three
        levels: the adapter's last two features both have the deepest width (block 8 and middle)."""
        c = self.channels
        widths = c[:3] if self.xl else c
        return (c[0], tuple(w // c[0] for w in widths), 2)
