"""A tiny text encoder for the demo models: a fixed vocabulary, learned word + position embeddings
and one transformer layer, producing a (B, 16, 64) context like a (very) small CLIP.

    enc = TextEncoder()
    ctx = enc(enc.tokenize(["a red circle and a blue square", ""]))   # (2, 16, 64)

The vocabulary covers the training captions (`data.py`, `drawn.py`): colours, shapes, "a", "and",
"on", background words. Unknown words map to `<unk>`; the empty prompt is all `<pad>`, a fixed
sequence (the "unconditional" prompt for classifier-free guidance). It is trained jointly with the
base model and frozen afterwards.

The vocabulary only grows at its end (`house`, `rectangle`, `scribble` came with the drawn data),
and an encoder file stores the words it was trained with: an older file loads with its shorter
vocabulary, and words it never learned map to `<unk>` for it (`TextEncoder.vocab`,
`TextEncoder.unknown_words`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..formats.files import read_safetensors, write_safetensors

SHAPE_COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "orange", "purple")
BACKGROUND_COLOURS = ("black", "white", "gray")
SHAPES = ("circle", "square", "triangle", "star", "line", "house", "rectangle", "scribble")
FUNCTION_WORDS = ("a", "and", "on", "background", "gradient")
PAD, UNK = "<pad>", "<unk>"
# New words are appended (never inserted), so an older encoder's vocabulary is a prefix of this one.
VOCAB: tuple[str, ...] = (PAD, UNK, *FUNCTION_WORDS, *SHAPE_COLOURS, *BACKGROUND_COLOURS, *SHAPES)
ALIASES = {"grey": "gray", "an": "a", "circles": "circle", "squares": "square", "triangles": "triangle",
           "stars": "star", "lines": "line", "violet": "purple", "pink": "magenta", "box": "square",
           "houses": "house", "rectangles": "rectangle", "bar": "rectangle", "bars": "rectangle",
           "scribbles": "scribble", "stroke": "line", "strokes": "line"}
MAX_TOKENS = 16
CONTEXT_DIM = 64


def words(prompt: str) -> list[str]:
    """Lower-cased words of a prompt, aliases resolved."""
    return [ALIASES.get(w, w) for w in re.findall(r"[a-z]+", prompt.lower())]


def unknown_words(prompt: str, vocab: Sequence[str] = VOCAB) -> list[str]:
    return [w for w in words(prompt) if w not in vocab]


_INDEX = {w: i for i, w in enumerate(VOCAB)}


def tokenize(prompts: Sequence[str] | str, max_tokens: int = MAX_TOKENS, vocab_size: int = len(VOCAB)) -> torch.Tensor:
    """(B, max_tokens) int64 token ids; longer prompts are cut, shorter ones padded with `<pad>` (0).
    Words at or beyond `vocab_size` (an older, shorter vocabulary) become `<unk>`."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = torch.zeros(len(prompts), max_tokens, dtype=torch.long)
    for row, p in enumerate(prompts):
        toks = [i if i < vocab_size else _INDEX[UNK] for i in (_INDEX.get(w, _INDEX[UNK]) for w in words(p))][:max_tokens]
        if toks:
            ids[row, : len(toks)] = torch.tensor(toks)
    return ids


class TextEncoder(nn.Module):
    META_KEY = "controlnet_core.text_encoder"

    def __init__(self, dim: int = CONTEXT_DIM, max_tokens: int = MAX_TOKENS, heads: int = 4, layers: int = 1,
                 vocab_size: int = len(VOCAB)):
        super().__init__()
        self.dim, self.max_tokens, self.heads, self.layers = dim, max_tokens, heads, layers
        self.vocab: tuple[str, ...] = VOCAB[:vocab_size]  # the words this encoder was trained with
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.zeros(max_tokens, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim * 4, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.final_norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_embedding.weight, std=0.5)
        nn.init.normal_(self.position_embedding, std=0.1)

    def config(self) -> dict:
        return {"dim": self.dim, "max_tokens": self.max_tokens, "heads": self.heads, "layers": self.layers}

    def tokenize(self, prompts: Sequence[str] | str) -> torch.Tensor:
        return tokenize(prompts, self.max_tokens, len(self.vocab))

    def unknown_words(self, prompt: str) -> list[str]:
        """The prompt's words this encoder reads as `<unk>`."""
        return unknown_words(prompt, self.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> context (B, L, dim)."""
        h = self.token_embedding(tokens) + self.position_embedding[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.final_norm(h)

    def encode(self, prompts: Sequence[str] | str) -> torch.Tensor:
        """Prompts -> context on this module's device."""
        return self(self.tokenize(prompts).to(self.position_embedding.device))

    def save(self, path: str, dtype: torch.dtype | None = None) -> None:
        sd = {k: (v.to(dtype) if dtype is not None else v) for k, v in self.state_dict().items()}
        write_safetensors(sd, path, {"format": "pt", self.META_KEY: json.dumps({**self.config(), "vocab": list(self.vocab)})})

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> "TextEncoder":
        sd, meta = read_safetensors(Path(path), cast=lambda t: t.float())
        meta = json.loads(meta[cls.META_KEY])
        vocab = tuple(meta.pop("vocab"))
        if vocab != VOCAB[: len(vocab)]:
            raise ValueError(f"{path}: the text encoder was trained with another vocabulary (its words are not "
                             f"the start of this version's {len(VOCAB)} words); use the text encoder of the same release")
        enc = cls(**meta, vocab_size=len(vocab))
        enc.load_state_dict(sd)
        return enc.to(device).eval()
