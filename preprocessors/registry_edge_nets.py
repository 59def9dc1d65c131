"""The soft-edge, scribble and line-art networks (HED, PiDiNet, lineart, lineart_anime, TEED/AnyLine)
as registry methods: names, widgets, files. The networks and their Aux recipes are in
preprocessors/nets/{hed,pidinet,lineart,lineart_anime,teed}.py; nothing here imports torch.

Imported at the end of registry.py, so these methods come after the weight-free ones (appended:
saved workflows name the method, the order is only the menu's).
"""

from __future__ import annotations

from .registry import Method, Weights, _net, register

_ANNOTATORS = "https://huggingface.co/lllyasviel/Annotators"
_MISTOLINE = "https://huggingface.co/TheMistoAI/MistoLine (folder Anyline)"
_TEED = "https://huggingface.co/bdsqlsz/qinglong_controlnet-lllite (folder Annotators)"

HED = Weights(("ControlNetHED.pth",), _ANNOTATORS)
PIDINET = Weights(("table5_pidinet.pth",), _ANNOTATORS)
LINEART = Weights(("sk_model.pth",), _ANNOTATORS)
LINEART_COARSE = Weights(("sk_model2.pth",), _ANNOTATORS)
LINEART_ANIME = Weights(("netG.pth",), _ANNOTATORS)
MTEED = Weights(("MTEED.pth",), _MISTOLINE)
# softedge_teed: AnyLine's MTEED first; TEED's own release (Aux's TEED node default) if that is what you have
TEED = Weights(("MTEED.pth", "7_model.pth"), f"{_MISTOLINE}, or 7_model.pth from {_TEED}")


def _doc(w: Weights) -> str:
    return f"{' or '.join(w.files)} from {w.source}"


def _register(name, fn, params, feeds, doc, weights: Weights, loader: str) -> None:
    # _net(m, "load") is one function per module: the registry caches networks by (loader, file), so
    # a soft-edge method and its scribble variant share one network.
    register(Method(
        name=name, fn=_net(loader, fn), params=tuple(params), feeds=feeds, doc=doc,
        load_weights=_net(loader, "load"), weights=weights, weights_doc=_doc(weights),
    ))


_register(
    "softedge_hed", "softedge_hed", ("safe",),
    "control_v11p_sd15_softedge (SoftEdge_HED), control_sd15_hed, soft-edge / union ControlNets",
    "HED soft edges (lllyasviel's Apache-2.0 ControlNetHED), Aux's HEDPreprocessor: the mean of the five side "
    "outputs through a sigmoid; safe = 2-level quantisation.",
    HED, "hed",
)
_register(
    "scribble_hed", "scribble_hed", ("safe",),
    "control_v11p_sd15_scribble, control_sd15_scribble",
    "Thick binary strokes from the HED map (Aux's FakeScribblePreprocessor, 'scribble_hed').",
    HED, "hed",
)
_register(
    "softedge_pidinet", "softedge_pidinet", ("safe",),
    "control_v11p_sd15_softedge (SoftEdge_PIDI), soft-edge / union ControlNets",
    "PiDiNet soft edges (table5 model), Aux's PiDiNetPreprocessor; safe = 2-level quantisation.",
    PIDINET, "pidinet",
)
_register(
    "scribble_pidinet", "scribble_pidinet", ("safe",),
    "control_v11p_sd15_scribble, xinsir scribble / union ControlNets",
    "Thick binary strokes from the PiDiNet map (Aux's Scribble_PiDiNet_Preprocessor, which draws them twice).",
    PIDINET, "pidinet",
)
_register(
    "lineart_realistic", "lineart_net", (),
    "control_v11p_sd15_lineart, line-art / union ControlNets",
    "Realistic line art (Aux's LineArtPreprocessor, coarse off): the sk_model generator, white lines on black.",
    LINEART, "lineart",
)
_register(
    "lineart_coarse", "lineart_net", (),
    "control_v11p_sd15_lineart (Lineart_Coarse)",
    "Coarse line art (Aux's LineArtPreprocessor, coarse on): the sk_model2 generator, white lines on black.",
    LINEART_COARSE, "lineart",
)
_register(
    "lineart_anime", "lineart_anime", (),
    "control_v11p_sd15s2_lineart_anime",
    "Anime line art (Aux's AnimeLineArtPreprocessor): the netG pix2pix U-Net at a multiple of 256 px, white "
    "lines on black.",
    LINEART_ANIME, "lineart_anime",
)
_register(
    "softedge_teed", "softedge_teed", ("safe_steps",),
    "SDXL soft-edge ControlNets (e.g. controlnet-sd-xl-1.0-softedge-dexined), soft-edge / union ControlNets",
    "TEED soft edges (Aux's TEEDPreprocessor), quantised to safe_steps levels.",
    TEED, "teed",
)
_register(
    "anyline", "anyline", (),
    "MistoLine (TheMistoAI/MistoLine), line-art / soft-edge ControlNets",
    "AnyLine (Aux's AnyLineArtPreprocessor_aux with its defaults): MTEED soft edges screen-blended with the "
    "larger standard line-art strokes. Aux's node works at resolution 1280 by default.",
    MTEED, "teed",
)
