"""The ComfyUI nodes (V1 node API). Node ids are a public API: never rename them, and only
append widgets (saved workflows store widget values by position)."""

from __future__ import annotations

from typing import Any

import torch

from ..controlnet_core.control import MAX_STRENGTH, MODES
from ..controlnet_core.hint import INTERPOLATIONS, RESIZE_MODES
from ..controlnet_core.flux_controlnet import FLUX_UNION_MODES
from ..controlnet_core.union import AUTO, CONTROL_TYPES
from . import adapter
from .control_object import DEFAULT_CONTROL_TYPE, DEFAULT_INTERPOLATION, DEFAULT_MODE, DEFAULT_RESIZE

CATEGORY = "conditioning/controlnet"
CONTROL_NET = "CONTROL_NET"
CONTROL_STACK = "CONTROL_STACK"

TIP_STRENGTH = "How strongly the ControlNet steers the image; 0 turns it off, 1 is the usual strength."
TIP_START = "Fraction of the sampling (in the model's time, as ComfyUI) at which the control starts acting."
TIP_END = "Fraction of the sampling at which the control stops acting."
TIP_IMAGE = "The hint image (e.g. from the ControlNet Preprocessor); resized to the generated image."
TIP_MASK = (
    "Optional region: the control acts only where the mask is white (softly in between). "
    "Same size (or aspect ratio) as the generated image."
)


TIP_CONTROL_TYPE = (
    "ControlNet Union / ProMax only: what the hint image is (ComfyUI's SetUnionControlNetType names). 'auto' = no "
    "type (ComfyUI's plain hint path). tile and repaint need ProMax. Flux Union / Union-Pro: its own modes canny, "
    "tile, depth, blur, pose, gray, low quality (Union-Pro-2.0 has none). Leave 'auto' for other ControlNets."
)
TIP_MULTI_CONDITION = (
    "ControlNet Union / ProMax only. Off (default): each control type of a stack gets its own pass and the results "
    "add up, the image ComfyUI's SetUnionControlNetType + Apply chain gives. On: the types of one Union file in this "
    "stack (same control mode and mask) run as ONE multi-condition pass, as xinsir's multi-control inference and "
    "diffusers do: another image (strength then weights each type inside the network), and one network pass instead "
    "of one per type (faster)."
)


def _control_type() -> tuple:
    # the SDXL Union's names first (saved workflows keep their values), then the Flux Union modes
    # that are not already there (depth and tile are both: each network reads a name its own way)
    flux = [m for m in FLUX_UNION_MODES if m not in CONTROL_TYPES]
    return ([AUTO, *CONTROL_TYPES, *flux], {"default": DEFAULT_CONTROL_TYPE, "tooltip": TIP_CONTROL_TYPE})


def _strength() -> tuple:
    return ("FLOAT", {"default": 1.0, "min": 0.0, "max": MAX_STRENGTH, "step": 0.01, "tooltip": TIP_STRENGTH})


def _percent(default: float, tip: str) -> tuple:
    return ("FLOAT", {"default": default, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": tip})


class LoadControlNet:
    """Load a ControlNet (SD1.x, SD2.x, SDXL; original, v1.1 and diffusers single-file formats)."""

    DESCRIPTION = "Loads a ControlNet from ComfyUI's controlnet model folders for the CNCore runtime."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"control_net_name": (adapter.controlnet_names(), {
            "tooltip": "A file in ComfyUI's models/controlnet folder (or an extra model path)."})}}

    RETURN_TYPES = (CONTROL_NET,)
    RETURN_NAMES = ("control_net",)
    OUTPUT_TOOLTIPS = ("The ControlNet; works with both CNCore's and ComfyUI's Apply ControlNet nodes.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, control_net_name: str) -> tuple[Any]:
        return (adapter.load_control(control_net_name),)

    @classmethod
    def IS_CHANGED(cls, control_net_name: str) -> str:
        # ComfyUI reuses a node's output while its inputs are the same; the file's size and modification
        # time make a file replaced under the same name load anew on the next prompt.
        return adapter.file_signature(control_net_name)


# How many of preprocessors.PARAMS the 0.1.0 Preprocessor node had (low_threshold .. seed): required widgets.
RELEASED_PARAMS = 14


def _param_widget(p: Any) -> tuple:
    opts: dict[str, Any] = {"default": p.default}
    if p.tooltip:
        opts["tooltip"] = p.tooltip
    if p.kind == "choice":
        return (list(p.choices), opts)
    if p.kind == "bool":
        return ("BOOLEAN", opts)
    for key in ("min", "max", "step"):
        value = getattr(p, key)
        if value is not None:
            opts[key] = int(value) if p.kind == "int" else float(value)
    if p.kind == "int":
        opts["control_after_generate"] = False  # a seed here is a setting, not a per-run random number
        return ("INT", opts)
    return ("FLOAT", opts)


class Preprocessor:
    """Image -> hint image with one of the pack's weight-free preprocessors."""

    DESCRIPTION = "Makes a ControlNet hint (edges, lines, tiles, ...) from an image; no downloads."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        from .. import preprocessors as pp

        required: dict[str, Any] = {
            "image": ("IMAGE", {"tooltip": "The image(s) to make hints from."}),
            "method": (pp.list_methods(), {
                "default": pp.list_methods()[0],
                "tooltip": "The kind of hint; pick the one your ControlNet was trained on.",
                # For the web extension (web/preprocessor.js): the widgets each method reads, so it
                # shows only those. An extra option key; ComfyUI passes it through /object_info.
                "cncore_inputs": {m: list(pp.method_inputs(m)) for m in pp.list_methods()},
                "cncore_needs_mask": [m for m in pp.list_methods() if pp.get_method(m).needs_mask],
            }),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 16384, "step": 8,
                                   "tooltip": "Short side (pixels) the method works at; the hint comes back at the "
                                              "input size."}),
            "pixel_perfect": ("BOOLEAN", {"default": False,
                                          "tooltip": "Pick the resolution from the generated image's size (connect "
                                                     "the latent) instead of the resolution widget."}),
        }
        optional: dict[str, Any] = {
            "mask": ("MASK", {"tooltip": "For the inpaint method: the area to repaint."}),
            "latent": ("LATENT", {"tooltip": "The latent you generate (for pixel_perfect)."}),
        }
        for i, p in enumerate(pp.PARAMS):
            # Parameters appended after 0.1.0 are optional inputs: an API prompt saved before they
            # existed lacks them, and ComfyUI refuses a prompt without a required input (the method
            # then gets the parameter's default). In the UI they are widgets after the released ones.
            (required if i < RELEASED_PARAMS else optional)[p.name] = _param_widget(p)
        return {"required": required, "optional": optional}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("hint",)
    OUTPUT_TOOLTIPS = ("The hint image, the size of the input image.",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @classmethod
    def IS_CHANGED(cls, method: Any = None, **params: Any) -> str:
        # A network method's weights file replaced (or added) under the same name makes the node run
        # anew: its path, size and time are part of the key. Weight-free methods: inputs alone.
        from .. import preprocessors as pp

        try:
            if pp.get_method(method).load_weights is None:
                return ""
            adapter.setup_annotators()
            path = pp.weights_file(method, params)
            st = path.stat()
        except (pp.PreprocessorError, OSError):
            return "missing"  # the run itself says what is wrong
        return f"{path}|{st.st_size}|{st.st_mtime_ns}"

    def run(self, image: torch.Tensor, method: str, resolution: int, pixel_perfect: bool,
            mask: torch.Tensor | None = None, latent: dict | None = None, **params: Any) -> tuple | dict:
        hint, weights = _make_hints(image, method, resolution, pixel_perfect, mask, latent, params)
        if weights is None:
            return (hint,)
        # The UI part shows under the node which weights file made the hint (web/preprocessor.js).
        return {"ui": {"cncore_weights": [str(weights)]}, "result": (hint,)}


def _make_hints(image: torch.Tensor, method: str, resolution: int, pixel_perfect: bool, mask: torch.Tensor | None,
                latent: dict | None, params: dict[str, Any], data_out: list | None = None):
    """The Preprocessor's work, shared with Pose Keypoints: (hint IMAGE, weights file or None)."""
    from .. import preprocessors as pp

    target = None
    if latent is not None:
        samples = latent["samples"]
        target = (8 * int(samples.shape[-2]), 8 * int(samples.shape[-1]))
    elif pixel_perfect and not getattr(pp.get_method(method), "native_size", False):
        raise pp.PreprocessorError(
            "pixel_perfect needs the size of the image you generate: connect your latent (e.g. from Empty "
            "Latent Image) to the preprocessor's latent input, or turn pixel_perfect off"
        )
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise pp.PreprocessorError("image must be a ComfyUI IMAGE batch (batch, height, width, channels)")
    frames = image.detach().cpu().float().numpy()
    mask_np = None if mask is None else mask.detach().cpu().float().numpy()
    adapter.remember_input(frames, mask_np, target)  # for the front end's preview of later edits
    weights = None
    if pp.get_method(method).load_weights is not None:  # a network: found by name, said which file
        adapter.setup_annotators()
        weights = pp.weights_file(method, params)
    out = pp.run(
        method, frames, resolution=resolution, pixel_perfect=pixel_perfect, target_hw=target, mask=mask_np,
        progress=adapter.progress_reporter(image.shape[0]) if image.shape[0] > 1 else None,
        weights_path=weights, data_out=data_out, **params,
    )
    return torch.from_numpy(out).to(image.device), weights


POSE_KEYPOINT = "POSE_KEYPOINT"  # Aux's type name: pose editors and savers take it


class PoseKeypoints:
    """A pose method (dwpose, ...) with the keypoints as data beside the picture.

    Why a node of its own and not a second output of the Preprocessor: the Preprocessor's outputs are
    the same for every method, and a keypoint output would be empty for all but the pose methods;
    this node shows only the pose methods and their widgets. Both make the same picture."""

    DESCRIPTION = (
        "Finds people's body, hand and face keypoints (DWPose or OpenPose), draws them as the pose ControlNets expect and "
        "also outputs them as OpenPose JSON (POSE_KEYPOINT) for pose editors; no downloads."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        from .. import preprocessors as pp

        methods = [m for m in pp.list_methods() if pp.get_method(m).returns_data]
        used = {name for m in methods for name in pp.get_method(m).params}
        required: dict[str, Any] = {
            "image": ("IMAGE", {"tooltip": "The image(s) to find people in."}),
            "method": (methods, {"default": methods[0], "tooltip": "dwpose: YOLOX person boxes + RTMPose "
                                                                   "whole-body keypoints (best); openpose: CMU's "
                                                                   "body, hand and face networks."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 16384, "step": 8,
                                   "tooltip": "Short side (pixels) the picture is drawn at before it is resized "
                                              "to the input size (as Aux's detect resolution)."}),
            "pixel_perfect": ("BOOLEAN", {"default": False,
                                          "tooltip": "Pick the resolution from the generated image's size (connect "
                                                     "the latent) instead of the resolution widget."}),
        }
        for p in pp.PARAMS:
            if p.name in used:
                required[p.name] = _param_widget(p)
        return {"required": required,
                "optional": {"latent": ("LATENT", {"tooltip": "The latent you generate (for pixel_perfect)."})}}

    RETURN_TYPES = ("IMAGE", POSE_KEYPOINT)
    RETURN_NAMES = ("hint", "pose_keypoint")
    OUTPUT_TOOLTIPS = (
        "The pose picture, the size of the input image.",
        "One OpenPose JSON dict per frame: people (pose/face/hand keypoints, x y c in input pixels), canvas size.",
    )
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, image: torch.Tensor, method: str, resolution: int, pixel_perfect: bool,
            latent: dict | None = None, **params: Any) -> dict:
        import json

        data: list = []
        hint, weights = _make_hints(image, method, resolution, pixel_perfect, None, latent, params, data)
        # openpose_json: the UI key Aux's pose nodes send (pose editors read it); cncore_weights: the file
        return {"ui": {"openpose_json": [json.dumps(data, indent=4)], "cncore_weights": [str(weights)]},
                "result": (hint, data)}


class ApplyControlNet:
    """Apply a ControlNet (and optionally a stack of more) to positive and negative conditioning."""

    DESCRIPTION = (
        "Like ComfyUI's Apply ControlNet (its defaults give the same image), plus control modes, resize "
        "modes, a region mask and a stack of more controls evaluated in one pass."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "Positive conditioning (from a text encode node)."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative conditioning; shares the control with positive."}),
                "control_net": (CONTROL_NET, {"tooltip": "A ControlNet from either Load ControlNet node."}),
                "image": ("IMAGE", {"tooltip": TIP_IMAGE}),
                "strength": _strength(),
                "start_percent": _percent(0.0, TIP_START),
                "end_percent": _percent(1.0, TIP_END),
                "control_mode": (list(MODES), {
                    "default": DEFAULT_MODE,
                    "tooltip": "balanced: as ComfyUI; 'prompt is more important': weaker on shallow layers "
                               "(0.825^k); 'controlnet is more important' / 'guess mode': the same weights, and "
                               "the control acts on the positive half only; 'cfg resolution weighting (paper)': "
                               "the ControlNet paper's weights 64/h (1, 2, 4, 8 from the finest block down), on the "
                               "positive half only."}),
                "resize_mode": (list(RESIZE_MODES), {
                    "default": DEFAULT_RESIZE,
                    "tooltip": "How the hint fits the generated image when their shapes differ: crop (ComfyUI's "
                               "centre crop), stretch, or pad with black."}),
                "interpolation": (list(INTERPOLATIONS), {
                    "default": DEFAULT_INTERPOLATION,
                    "tooltip": "Resampling of the hint; nearest-exact is ComfyUI's."}),
            },
            "optional": {
                "vae": ("VAE", {"tooltip": "Only for ControlNets that need one (some ComfyUI-loaded families); "
                                           "unused by SD1.x/SD2.x/SDXL ControlNets."}),
                "mask": ("MASK", {"tooltip": TIP_MASK}),
                "control_stack": (CONTROL_STACK, {
                    "tooltip": "More controls from Combine ControlNets (CNCore), applied together with this one; "
                               "the modes above apply to all of them."}),
                "control_type": _control_type(),
                "union_multi_condition": ("BOOLEAN", {"default": False, "tooltip": TIP_MULTI_CONDITION}),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("Positive conditioning with the control.", "Negative conditioning with the control.")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, positive, negative, control_net, image, strength, start_percent, end_percent,
              control_mode=DEFAULT_MODE, resize_mode=DEFAULT_RESIZE, interpolation=DEFAULT_INTERPOLATION,
              vae=None, mask=None, control_stack=None, control_type=DEFAULT_CONTROL_TYPE, union_multi_condition=False):
        return adapter.apply_control(
            positive, negative, control_net, image, strength, start_percent, end_percent,
            control_mode=control_mode, resize_mode=resize_mode, interpolation=interpolation,
            vae=vae, mask=mask, control_stack=control_stack, control_type=control_type,
            union_multi_condition=union_multi_condition,
        )


class CombineControls:
    """Gather controls into a CONTROL_STACK: chain Combine nodes (stack -> control_stack) for 2..N
    controls, and end in Apply ControlNet (CNCore). Same result as chaining Apply nodes, in one pass."""

    DESCRIPTION = (
        "Adds a ControlNet + hint (+ strength, schedule, mask) to a stack. Chain several, then connect the "
        "stack to Apply ControlNet (CNCore); all controls run in one call and their effects add up."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "control_net": (CONTROL_NET, {"tooltip": "A ControlNet from either Load ControlNet node."}),
                "image": ("IMAGE", {"tooltip": TIP_IMAGE}),
                "strength": _strength(),
                "start_percent": _percent(0.0, TIP_START),
                "end_percent": _percent(1.0, TIP_END),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": TIP_MASK}),
                "control_stack": (CONTROL_STACK, {"tooltip": "Controls gathered so far (from another Combine node)."}),
                "control_type": _control_type(),
            },
        }

    RETURN_TYPES = (CONTROL_STACK,)
    RETURN_NAMES = ("control_stack",)
    OUTPUT_TOOLTIPS = ("The controls so far; connect to Apply ControlNet (CNCore) or another Combine node.",)
    FUNCTION = "combine"
    CATEGORY = CATEGORY

    def combine(self, control_net, image, strength, start_percent, end_percent, mask=None, control_stack=None,
                control_type=DEFAULT_CONTROL_TYPE):
        entry = adapter.stack_entry(control_net, image, strength, start_percent, end_percent, mask, control_type)
        return (tuple(control_stack or ()) + (entry,),)


class LoadControlNeXtUNet:
    """Apply the UNet half of a ControlNeXt (its fine-tuned attention out-projections) to a MODEL."""

    DESCRIPTION = (
        "ControlNeXt ships two files: the module (load it with Load ControlNet (CNCore), apply it with Apply "
        "ControlNet (CNCore)) and unet.safetensors, the base UNet's fine-tuned attention outputs. This node applies "
        "the second to the MODEL as ComfyUI weight patches: they unpatch cleanly, stack with LoRAs and work with "
        "--lowvram."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SDXL or SD1.5 model the ControlNeXt was made for."}),
            "weights_name": (adapter.controlnet_names(), {
                "tooltip": "The ControlNeXt's unet.safetensors, in ComfyUI's models/controlnet folder."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": MAX_STRENGTH, "step": 0.01,
                                   "tooltip": "How much of the weight change to apply; 1 is the authors' model, 0 "
                                              "leaves the model as it is."}),
        }}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the ControlNeXt's UNet weights (the input model is not changed).",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model: Any, weights_name: str, strength: float) -> tuple[Any]:
        return (adapter.patch_controlnext_unet(model, weights_name, strength),)

    @classmethod
    def IS_CHANGED(cls, weights_name: str = "", **_: Any) -> str:
        # ComfyUI passes only widget values here (not the linked MODEL): the file's signature makes a
        # file replaced under the same name load anew; other inputs are in ComfyUI's own cache key
        return adapter.file_signature(weights_name)


NODE_CLASS_MAPPINGS = {
    "CNCore_LoadControlNet": LoadControlNet,
    "CNCore_Preprocessor": Preprocessor,
    "CNCore_ApplyControlNet": ApplyControlNet,
    "CNCore_CombineControls": CombineControls,
    "CNCore_LoadControlNeXtUNet": LoadControlNeXtUNet,
    "CNCore_PoseKeypoints": PoseKeypoints,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CNCore_LoadControlNet": "Load ControlNet (CNCore)",
    "CNCore_Preprocessor": "ControlNet Preprocessor (CNCore)",
    "CNCore_ApplyControlNet": "Apply ControlNet (CNCore)",
    "CNCore_CombineControls": "Combine ControlNets (CNCore)",
    "CNCore_LoadControlNeXtUNet": "Load ControlNeXt UNet Weights (CNCore)",
    "CNCore_PoseKeypoints": "Pose Keypoints (CNCore)",
}
