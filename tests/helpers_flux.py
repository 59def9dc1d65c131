"""Tiny random-weight Flux ControlNets and hosts from diffusers (the oracle), saved in the real layouts.

Widths are tiny (2 heads of 16, rotary axes (4, 6, 6)) but the host has Flux's real block counts,
19 double and 38 single, because the tiling rule is written for them. Every weight is random and
well scaled, the layers diffusers zero-initialises (`controlnet_blocks`, `controlnet_x_embedder`,
the pixel stem's last conv) included, so a residual of zero cannot pass for a right one.
"""

from __future__ import annotations

import math

import torch

HEADS, HEAD_DIM = 2, 16
AXES = (4, 6, 6)
CONTEXT, POOLED = 32, 24


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """weights ~ N(0, 1/fan_in), norm scales ~ 1, biases and embeddings small; in place, eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2 and "mode_embedder" not in name:
                val = torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:]))
            elif "norm" in name:
                val = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            else:
                val = 0.5 * torch.randn(p.shape, generator=g)
            p.copy_(val)
    return module.eval()


def diffusers_controlnet(depth: int, single: int, *, modes: int | None = None, pixel: bool = False,
                         guidance: bool = True, seed: int = 0, heads: int = HEADS, head_dim: int = HEAD_DIM,
                         axes=AXES, context: int = CONTEXT, pooled: int = POOLED):
    from diffusers import FluxControlNetModel

    net = FluxControlNetModel(
        patch_size=2 if pixel else 1, in_channels=64, num_layers=depth, num_single_layers=single,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=context,
        pooled_projection_dim=pooled, guidance_embeds=guidance, axes_dims_rope=list(axes), num_mode=modes,
        conditioning_embedding_channels=16 if pixel else None,
    )
    return randomize_(net, seed)


def diffusers_host(seed: int = 100, depth: int = 19, single: int = 38, guidance: bool = True):
    from diffusers import FluxTransformer2DModel

    host = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=depth, num_single_layers=single, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=CONTEXT, pooled_projection_dim=POOLED,
        guidance_embeds=guidance, axes_dims_rope=list(AXES),
    )
    return randomize_(host, seed)


def pack(latent: torch.Tensor) -> torch.Tensor:
    """diffusers' `_pack_latents`: (B, C, h, w) -> (B, h/2 * w/2, 4C), cells channel-major."""
    b, c, h, w = latent.shape
    x = latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def ids(h: int, w: int, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' 2-D txt_ids (zeros) and img_ids (0, row, column) for an h x w latent."""
    img = torch.zeros(h // 2, w // 2, 3)
    img[..., 1] = torch.arange(h // 2)[:, None]
    img[..., 2] = torch.arange(w // 2)[None, :]
    return torch.zeros(text, 3), img.reshape(-1, 3)


def inputs(batch: int = 2, h: int = 8, w: int = 12, text: int = 5, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, 16, h, w, generator=g),
        "latent_hint": torch.randn(batch, 16, h, w, generator=g),
        "pixel_hint": torch.rand(batch, 3, 8 * h, 8 * w, generator=g),
        "context": torch.randn(batch, text, CONTEXT, generator=g),
        "y": torch.randn(batch, POOLED, generator=g),
        "t": torch.tensor([0.7] * batch),
        "guidance": torch.tensor([3.5] * batch),
    }


def save_state_dict(sd: dict, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
