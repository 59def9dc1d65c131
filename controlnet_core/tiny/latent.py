"""The demo models' latent space: a tiny convolutional autoencoder with SD's 8x geometry.

SD works on a latent 8x smaller than the image (a 512 px image -> 4 x 64 x 64 through its VAE) and
its ControlNets take the hint at *image* resolution, 8x the latent. The demo models keep exactly
that geometry:

    image (B, 3, 128, 128) in [-1, 1]  --encode-->  latent (B, 4, 16, 16)  --decode-->  image

`TinyAutoencoder` is three stride-2 conv stages down and three nearest-upsample + conv stages up
(~0.8 M parameters), trained first (`train.py autoencoder`) on the procedural shapes with an L1 +
MSE reconstruction loss; the latent is bounded by tanh, and noise is added to it while training so
the decoder tolerates the small errors a diffusion model makes. `scale` (SD's "scaling factor")
brings the latents to unit standard deviation for the diffusion schedule. The Canny hint is the
128 x 128 edge image in [0, 1]: 8x the latent, as for SD's ControlNets.

Why not a parameter-free pixel-unshuffle (192 channels per latent cell)? Epsilon prediction has to
output the full 192-channel noise through the UNet's 64-channel stem and output convs, which cannot
carry it: the base model's loss was 0.77 after 275 steps, falling slowly toward its floor 1 - 64/192, and a
sampler would keep the noise the model cannot predict.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..formats.files import read_safetensors, write_safetensors

FACTOR = 8
IMAGE_CHANNELS = 3
LATENT_CHANNELS = 4
META_KEY = "controlnet_core.autoencoder"


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)


class TinyAutoencoder(nn.Module):
    def __init__(self, latent_channels: int = LATENT_CHANNELS, widths: tuple[int, ...] = (32, 64, 128), scale: float = 1.0):
        super().__init__()
        self.latent_channels, self.widths = latent_channels, tuple(widths)
        self.register_buffer("scale", torch.tensor(float(scale)))
        enc: list[nn.Module] = []
        c = IMAGE_CHANNELS
        for w in widths:  # each stage: conv, then a stride-2 conv (2x down)
            enc += [_conv(c, w), nn.SiLU(), _conv(w, w, 2), nn.SiLU()]
            c = w
        enc += [_conv(c, c), nn.SiLU(), nn.Conv2d(c, latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [_conv(latent_channels, c), nn.SiLU(), _conv(c, c), nn.SiLU()]
        for w in reversed(widths):  # each stage: 2x nearest up, two convs
            dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), _conv(c, w), nn.SiLU(), _conv(w, w), nn.SiLU()]
            c = w
        dec += [_conv(c, IMAGE_CHANNELS)]
        self.decoder = nn.Sequential(*dec)

    @property
    def factor(self) -> int:
        return 2 ** len(self.widths)

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        """Unscaled latent in (-1, 1)."""
        return torch.tanh(self.encoder(images))

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1], H and W multiples of 8 -> (B, C, H/8, W/8) at ~unit std."""
        if images.ndim != 4 or images.shape[1] != IMAGE_CHANNELS or images.shape[2] % self.factor or images.shape[3] % self.factor:
            raise ValueError(f"encode takes (batch, 3, H, W) with H, W multiples of {self.factor}; got {tuple(images.shape)}")
        return self.encode_raw(images) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, 8h, 8w) in about [-1, 1]; the inverse of `encode` (up to training error)."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"decode takes (batch, {self.latent_channels}, h, w); got {tuple(latents.shape)}")
        return self.decode_raw(latents / self.scale)

    def config(self) -> dict:
        return {"latent_channels": self.latent_channels, "widths": list(self.widths), "scale": float(self.scale)}

    def save(self, path: str, dtype: torch.dtype | None = None) -> None:
        sd = {k: (v.to(dtype) if dtype is not None else v) for k, v in self.state_dict().items() if k != "scale"}
        write_safetensors(sd, path, {"format": "pt", META_KEY: json.dumps(self.config())})

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> "TinyAutoencoder":
        sd, meta = read_safetensors(Path(path), cast=lambda t: t.float())
        meta = json.loads(meta[META_KEY])
        ae = cls(meta["latent_channels"], tuple(meta["widths"]), meta["scale"])
        ae.load_state_dict(sd, strict=False)
        missing = set(ae.state_dict()) - set(sd) - {"scale"}
        if missing:
            raise ValueError(f"{path}: the autoencoder file lacks {sorted(missing)[:3]}")
        return ae.to(device).eval()


def from_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB -> float (B, 3, H, W) in [-1, 1]."""
    t = torch.as_tensor(images)
    return t.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) RGB (clipped)."""
    t = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return t.permute(0, 2, 3, 1).cpu().numpy()


def hint_from_uint8(hints: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) edge images -> float (B, 3, H, W) in [0, 1] (the ControlNet hint convention)."""
    return torch.as_tensor(hints).permute(0, 3, 1, 2).float().div(255.0)
