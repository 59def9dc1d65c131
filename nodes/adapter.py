"""The ComfyUI adapter: the only module of the pack that imports ComfyUI (`comfy.*`, `folder_paths`),
always inside functions, so `import comfyui_controlnet_core` works without ComfyUI.

* `control_class()`     our control object class: `CoreControlMixin` + ComfyUI's `ControlBase`.
* `load_control(name)`  a file from the `controlnet` model folders -> that object (CONTROL_NET):
                        layers built with `comfy.ops` on ComfyUI's offload device and dtype, weights
                        held by a `ModelPatcher`, so ComfyUI loads/offloads them with the UNet,
                        counts their memory and can load them partially (--lowvram).
* `apply_control(...)`  what CNCore_ApplyControlNet does (see its docstring).
* `patch_controlnext_unet(model, name, strength)`  CNCore_LoadControlNeXtUNet: a ControlNeXt's UNet
                        weights as ModelPatcher weight patches on a clone of the MODEL.
* `setup_annotators()`  the network preprocessors' file folders (`models/annotators`, Aux's ckpts,
                        `models/depthanything`) and device host (ComfyUI's model management).
* for the front end (`routes.py`): `model_info(name)` (the loader's label, from the file header),
  `resolve_image_path(...)` (an image in ComfyUI's input/output/temp folders, as /view reads it),
  `remember_input` / `last_input` (the Preprocessor's input of the last run, for the preview), and
  `progress_reporter(total)` (ComfyUI's progress bar for a preprocessor batch).

Interop: our object (any family we load) works in ComfyUI's ControlNetApplyAdvanced (it speaks
`set_cond_hint`, `copy`, `set_previous_controlnet`, ...). A ControlNet or T2I-Adapter loaded by
ComfyUI's ControlNetLoader works in our apply node: with the default options it is applied exactly
as ControlNetApplyAdvanced does; with a mask, another control mode, resize mode or a stack, an
SD1.x/SD2.x/SDXL ControlNet or a T2I-Adapter is converted to ours (its weights are shared, not
copied, where the dtype allows); other families then get a plain error.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from ..controlnet_core import fast
from ..controlnet_core.control import ControlSettings, default_global_pool, with_control_type
from ..controlnet_core.errors import ControlNetError, InputError, LoadError, UnsupportedFamilyError
from ..controlnet_core.hint import to_bchw
from ..controlnet_core.loader import inspect_controlnet, load_controlnet
from .control_object import (
    DEFAULT_CONTROL_TYPE,
    DEFAULT_INTERPOLATION,
    DEFAULT_MODE,
    DEFAULT_RESIZE,
    FAMILY,
    BoundEntry,
    CoreControlMixin,
    NetHandle,
    StackEntry,
    family_of_width,
    normalize_mask,
)

log = logging.getLogger(__name__)
FOLDER = "controlnet"

_CLASS: type | None = None
_converted: "weakref.WeakKeyDictionary[Any, NetHandle]" = weakref.WeakKeyDictionary()
_vae_noted: "weakref.WeakSet[NetHandle]" = weakref.WeakSet()


def control_class() -> type:
    """`CoreControlMixin` on ComfyUI's `comfy.controlnet.ControlBase` (built once, on first use)."""
    global _CLASS
    if _CLASS is None:
        import comfy.controlnet

        _CLASS = type("CNCoreControlNet", (CoreControlMixin, comfy.controlnet.ControlBase), {
            "__module__": __name__,
            "__doc__": "A controlnet_core ControlNet speaking ComfyUI's control protocol.",
            "cncore_vae_encode": staticmethod(vae_encode),
        })
    return _CLASS


def vae_encode(vae: Any, image: torch.Tensor) -> torch.Tensor:
    """A hint image (B, 3, H, W) in [0, 1] through ComfyUI's VAE, as its ControlNet.get_control does
    it mid-sampling: the VAE is loaded for the encode, then the models of the run are loaded back."""
    import comfy.model_management as mm

    loaded = mm.loaded_models(only_currently_used=True)
    latent = vae.encode(image.movedim(1, -1))
    mm.load_models_gpu(loaded)
    return latent


def is_core_control(obj: Any) -> bool:
    return getattr(obj, "cncore", False) is True and isinstance(getattr(obj, "handle", None), NetHandle)


class NetHolder(nn.Module):
    """What the ModelPatcher manages: it writes `device` and friends onto its module, which our
    ControlNet exposes as read-only properties, so the net sits inside this plain holder."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def get_dtype(self) -> torch.dtype:  # what the weights are stored in (ComfyUI's model dtype)
        return getattr(self.net, "storage_dtype", self.net.dtype)


# ------------------------------------------------------------------------------------------
# model files

def controlnet_names() -> list[str]:
    """Files in ComfyUI's `controlnet` folders (and extra model paths); [] without ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return []
    return folder_paths.get_filename_list(FOLDER)


def _escapes(name: str) -> bool:
    """An absolute name, a drive letter or a '..' part: a name that could leave its folder."""
    parts = re.split(r"[\\/]+", name)
    return os.path.isabs(name) or name.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:", name)) or ".." in parts


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def check_model_name(name: Any) -> None:
    """LoadError for an empty name or one that could leave the model folders (absolute, '..')."""
    if not isinstance(name, str) or not name.strip():
        raise LoadError("choose a ControlNet file from the list (the name is empty)")
    if _escapes(name):
        raise LoadError(
            f"refusing to load {name!r}: only files inside ComfyUI's controlnet model folders can be loaded; "
            "give a name from the list (no absolute paths, no '..')"
        )


def resolve_model_path(name: Any) -> str:
    """The full path of a file listed in the `controlnet` folders; anything else is refused."""
    check_model_name(name)
    import folder_paths

    path = folder_paths.get_full_path(FOLDER, name)
    roots = [os.path.abspath(r) for r in folder_paths.get_folder_paths(FOLDER)]
    if path is None:
        raise LoadError(
            f"the ControlNet {name!r} was not found in the controlnet model folders ({', '.join(roots)}); put "
            "the file there and press Refresh (R) in ComfyUI"
        )
    full = os.path.abspath(path)
    if not any(_inside(full, r) for r in roots):
        raise LoadError(f"refusing to load {name!r}: it resolves outside the controlnet model folders")
    return full


def file_signature(name: Any) -> str:
    """The name, size and modification time of a model file (for ComfyUI's `IS_CHANGED`): it changes
    when the file is replaced under the same name. A name that does not resolve gets just the name;
    the load itself then says what is wrong."""
    try:
        st = os.stat(resolve_model_path(name))
    except (ControlNetError, OSError, ImportError):
        return repr(name)
    return f"{name}|{st.st_size}|{st.st_mtime_ns}"


def model_info(name: Any) -> dict:
    """What the loader node shows under the file name, from the file header only (no weights read).

    Raises LoadError for a name outside the controlnet folders, a missing file, or a file that is no
    control model at all (the loader's own sentence).
    """
    path = resolve_model_path(name)
    info = inspect_controlnet(path)
    arch = FAMILY.get(info.arch, info.arch) if info.arch else None
    # detect's display names carry the layout in brackets ("ControlNet (v1.1 layout)"); the label
    # names the layout once, as its own part
    family = re.sub(r"\s*\([^)]*\blayout\)$", "", info.family)
    hint = re.search(r"\s*\(([^)]*\bhint)\)$", family)  # DiT families: "(pixel hint)" / "(latent hint)"
    if hint is not None:
        family = family[: hint.start()]
    label = " · ".join(part for part in (family, arch, info.layout, hint and hint.group(1)) if part)
    if not info.supported:
        label += " · not run by this pack"
    return {"name": name, "family": family, "arch": info.arch, "arch_label": arch, "layout": info.layout,
            "supported": info.supported, "size_bytes": info.size_bytes, "label": label}


# ------------------------------------------------------------------------------------------
# annotator networks (preprocessors/nets): where their files are, where they run

ANNOTATORS = "annotators"
DEPTHANYTHING = "depthanything"  # ComfyUI-DepthAnythingV2's folder (kijai's safetensors)
_annotators_ready = False


def annotator_roots() -> list[str]:
    """The folders the network preprocessors search for weight files, in order: ComfyUI's
    `annotators` folders (models/annotators and `extra_model_paths.yaml` key `annotators`), Aux's
    ckpts tree (comfyui_controlnet_aux in a custom_nodes folder), models/depthanything."""
    import folder_paths

    from ..preprocessors.nets.files import aux_ckpts_roots

    roots = list(folder_paths.get_folder_paths(ANNOTATORS))
    try:
        custom = folder_paths.get_folder_paths("custom_nodes")
    except KeyError:
        custom = []
    roots += [str(p) for p in aux_ckpts_roots(custom)]
    roots.append(os.path.join(folder_paths.models_dir, DEPTHANYTHING))
    if DEPTHANYTHING in folder_paths.folder_names_and_paths:
        roots += folder_paths.get_folder_paths(DEPTHANYTHING)
    return roots


class AnnotatorHost:
    """Annotator networks under ComfyUI's model management: each in a ModelPatcher (load device =
    ComfyUI's torch device, offload device = its offload device), loaded by `load_models_gpu` before
    each use, so it takes the GPU when there is one, is counted and offloaded with the other models,
    and /free unloads it."""

    def adopt(self, net: Any) -> None:
        import comfy.model_management as mm
        import comfy.model_patcher

        offload = mm.unet_offload_device()
        net.module.to(offload)
        net.handle = comfy.model_patcher.ModelPatcher(net.module, load_device=mm.get_torch_device(),
                                                      offload_device=offload)

    def device(self, net: Any) -> torch.device:
        import comfy.model_management as mm

        mm.load_models_gpu([net.handle])
        return torch.device(net.handle.load_device)


def setup_annotators() -> None:
    """Register the `annotators` model folder with ComfyUI and give the network preprocessors their
    file search folders and device host. Idempotent; without ComfyUI, nothing happens."""
    global _annotators_ready
    if _annotators_ready:
        return
    try:
        import folder_paths
    except ImportError:
        return
    from ..preprocessors.nets import files, host

    folder_paths.add_model_folder_path(ANNOTATORS, os.path.join(folder_paths.models_dir, ANNOTATORS))
    files.set_roots_provider(annotator_roots)
    try:
        import comfy.model_management  # noqa: F401
    except ImportError:  # folder_paths without the rest of ComfyUI (tools, tests): the CPU runs them
        pass
    else:
        host.set_host(AnnotatorHost())
    _annotators_ready = True


# ------------------------------------------------------------------------------------------
# images for the preview (ComfyUI's input / output / temp folders only)

IMAGE_FOLDERS = ("input", "output", "temp")


def resolve_image_path(filename: Any, subfolder: Any = "", folder_type: Any = "input") -> str:
    """The full path of an image as ComfyUI's /view names it (file name, subfolder, folder type).

    Only files inside ComfyUI's input, output or temp folder are returned; symbolic links are
    followed before that check, so a link pointing elsewhere is refused too.
    """
    if folder_type not in IMAGE_FOLDERS:
        raise InputError(f"the image folder type must be one of {', '.join(IMAGE_FOLDERS)}; got {folder_type!r}")
    if not isinstance(filename, str) or not filename.strip():
        raise InputError("choose an image (the file name is empty)")
    subfolder = subfolder or ""
    if not isinstance(subfolder, str):
        raise InputError(f"the image subfolder must be text; got {subfolder!r}")
    for part in (filename, subfolder):
        if _escapes(part):
            raise InputError(
                f"refusing to read {part!r}: only images inside ComfyUI's {folder_type} folder can be previewed "
                "(no absolute paths, no '..')"
            )
    import folder_paths

    root = os.path.realpath(folder_paths.get_directory_by_type(folder_type))
    full = os.path.realpath(os.path.join(root, subfolder, filename))
    if not _inside(full, root):
        raise InputError(f"refusing to read {filename!r}: it resolves outside ComfyUI's {folder_type} folder")
    if not os.path.isfile(full):
        shown = f"{subfolder}/{filename}" if subfolder else filename
        raise FileNotFoundError(
            f"the image {shown!r} is not in ComfyUI's {folder_type} folder; upload it again in the Load Image node"
        )
    return full


# The Preprocessor's last input per node, for previews of images that come from other nodes than
# Load Image. One small frame each (at most LAST_INPUT_SIDE px on its long side), a few nodes.
LAST_INPUT_SIDE = 1024
LAST_INPUT_NODES = 16
_last_inputs: "OrderedDict[str, dict]" = OrderedDict()
_last_lock = threading.Lock()


def _executing_node_id() -> str | None:
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:  # not inside ComfyUI (or one without execution contexts)
        return None
    context = get_executing_context()
    return None if context is None else str(context.node_id)


def remember_input(image: Any, mask: Any = None, target_hw: tuple[int, int] | None = None) -> None:
    """Keep the first frame (and mask, and target size) the running Preprocessor node got."""
    node_id = _executing_node_id()
    if node_id is None:
        return
    from ..preprocessors.image import fit_long_side, resize, to_uint8

    frame = image[0].detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else image[0]
    size = fit_long_side(*frame.shape[:2], LAST_INPUT_SIDE)
    frame = resize(frame[None], *size)[0]  # never grows: area shrink or the frame as it is
    m = None
    if mask is not None:
        m = mask.detach().cpu().float().numpy() if isinstance(mask, torch.Tensor) else mask
        m = m.reshape((-1,) + m.shape[-2:])[0]
        m = _shrink(m, size)
    entry = {"image": to_uint8(frame.clip(0, 1)), "mask": m, "target_hw": target_hw}
    with _last_lock:
        _last_inputs[node_id] = entry
        _last_inputs.move_to_end(node_id)
        while len(_last_inputs) > LAST_INPUT_NODES:
            _last_inputs.popitem(last=False)


def _shrink(a: Any, size: tuple[int, int]) -> Any:
    # Not preprocessors.image.resize: a mask of another size than its image may be grown here, and
    # this stays INTER_AREA then, where resize would switch to bicubic.
    if a.shape[:2] == size:
        return a
    from ..preprocessors._cv import cv2

    out = cv2().resize(a, (size[1], size[0]), interpolation=cv2().INTER_AREA)
    return out.reshape(size + a.shape[2:])  # OpenCV drops a single channel axis


def last_input(node_id: Any) -> dict | None:
    """What `remember_input` kept for that node id (image uint8 HxWxC, mask or None, target_hw)."""
    with _last_lock:
        return _last_inputs.get(str(node_id))


def progress_reporter(total: int) -> Callable[[int, int], None] | None:
    """`progress(done, total)` driving ComfyUI's progress bar on the running node; None outside ComfyUI."""
    try:
        import comfy.utils
    except ImportError:
        return None
    bar = comfy.utils.ProgressBar(total)
    return lambda done, _total: bar.update_absolute(done, _total)


def _dtype_and_devices(weight_dtype: torch.dtype | None = None) -> tuple[torch.dtype, torch.dtype, Any, Any, bool]:
    """(storage dtype, compute dtype, load device, offload device, fp8 storage), chosen as ComfyUI's
    own ControlNet loader chooses them (`comfy/controlnet.py`, `load_controlnet_state_dict`): the
    weights are stored in `unet_dtype(model_params=-1, weight_dtype=<the file's>)` (the
    `--fp16-unet` / `--bf16-unet` / ... flags; fp32 on a CPU by default) and computed in
    `unet_manual_cast(storage, device)` where the device cannot compute in that dtype (a CPU with
    `--fp16-unet`, a GPU without fast fp16/bf16), through `comfy.ops.manual_cast`; so the net holds
    what ComfyUI's loader holds for the same file, not a copy widened to the compute dtype.

    ComfyUI's `--fp8_e4m3fn-unet` (and the like) asks for fp8 weight storage: the net is then loaded
    in the compute dtype and its weights stored as e4m3 with a per-tensor scale
    (`fast.prepare(fp8=True)`), about half the memory of fp16, as ComfyUI's own loader does with
    that flag."""
    import comfy.model_management as mm

    load_device = mm.get_torch_device()
    storage = mm.unet_dtype(model_params=-1, supported_dtypes=[torch.float16, torch.bfloat16, torch.float32],
                            weight_dtype=weight_dtype)
    fp8 = storage in _FP8_DTYPES
    compute = mm.unet_manual_cast(storage, load_device) or storage
    if fp8:
        compute = torch.float16 if compute in _FP8_DTYPES else compute  # a device that computes in fp8 itself
        if weight_dtype == storage:  # an fp8 file kept as it is, widened per layer (as ComfyUI's loader does)
            return storage, compute, load_device, mm.unet_offload_device(), False
        storage = compute  # fp8 storage asked for by a flag: our per-tensor-scaled payload, from compute weights
    return storage, compute, load_device, mm.unet_offload_device(), fp8 and fast.fp8_supported()


def _ops_for(storage: torch.dtype, compute: torch.dtype) -> Any:
    """ComfyUI's layers for weights stored in `storage` and computed in `compute` (both skip the random
    initialisation and follow ComfyUI's partial loading): `manual_cast` casts each weight to the input's
    dtype as the layer runs (comfy.ops.pick_operations' rule)."""
    import comfy.ops

    return comfy.ops.disable_weight_init if storage == compute else comfy.ops.manual_cast


def _file_weight_dtype(path: str) -> torch.dtype | None:
    """The dtype most of the file's numbers are stored in, from its header (ComfyUI's `weight_dtype`)."""
    try:
        return inspect_controlnet(path).weight_dtype
    except Exception:  # the load itself says what is wrong with the file
        return None


_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu") if hasattr(torch, n))


def _make_handle(net: nn.Module, name: str, load_device: Any, offload_device: Any) -> NetHandle:
    import comfy.model_patcher
    from comfy.patcher_extension import CallbacksMP

    patcher = comfy.model_patcher.ModelPatcher(NetHolder(net), load_device=load_device, offload_device=offload_device)
    # ComfyUI unloading the net (memory pressure, /free) also drops the fast path's graphs for it,
    # even those of a run that failed before its cleanup
    patcher.add_callback(CallbacksMP.ON_DETACH, lambda *_: fast.release(net))
    return NetHandle(net, patcher, name)


def load_control(name: str) -> Any:
    """Load `name` from the controlnet folders as our CONTROL_NET object."""
    path = resolve_model_path(name)
    storage, compute, load_device, offload_device, fp8 = _dtype_and_devices(_file_weight_dtype(path))
    try:
        net = load_controlnet(path, device=offload_device, dtype=storage, ops=_ops_for(storage, compute), name=name,
                              compute_dtype=compute)
        if fp8 and getattr(net, "fast_path_net", None) is net:  # a plain ControlNet (fp8 storage is the runner's)
            fast.prepare(net, fp8=True)
        elif fp8 and getattr(net, "host", None) is not None:
            # DiT nets are big (a Flux Union: 3.3 B parameters): --fp8_e4m3fn-unet stores a bf16/fp16
            # file as fp8 (per-tensor scale), each layer upcasting its weight to the compute dtype as it
            # runs. An fp8 file needs nothing here: it is already stored as it is (storage dtype e4m3,
            # manual-cast layers, _dtype_and_devices), its values kept exactly
            fast.prepare(net, fp8=True)
    except UnsupportedFamilyError as e:
        raise UnsupportedFamilyError(f"{e}. ComfyUI's own 'Load ControlNet Model' node may load it") from None
    except ControlNetError:
        raise
    except Exception as e:  # a damaged or truncated file: say so in one sentence
        raise LoadError(
            f"{name}: the file could not be read ({type(e).__name__}: {e}); it is damaged or incomplete, "
            "download it again"
        ) from None
    control = control_class()(_make_handle(net, name, load_device, offload_device))
    control.global_average_pooling = default_global_pool(name)
    # an inpaint net (AliMama: latent + mask) is one for ComfyUI's ControlNetInpaintingAliMamaApply,
    # which reads this flag to pass the (inverted) mask and black out the masked pixels
    control.concat_mask = getattr(net, "mask_channels", 0) > 0
    log.info("CNCore: loaded %s: %s for %s (%s layout, weights %s, computed in %s)", name, net.family,
             FAMILY.get(net.arch, net.arch), getattr(net, "source_format", "?"),
             str(net.storage_dtype).removeprefix("torch."), str(net.dtype).removeprefix("torch."))
    return control


def _comfyui_network(control_net: Any) -> tuple[nn.Module, torch.dtype | None, Any] | None:
    """The network inside a control object from ComfyUI's own loader, when it is of a family we run
    (an SD1.x/SD2.x/SDXL ControlNet, a T2I-Adapter): (module, compute dtype or None, load device)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.t2i_adapter.adapter as t2i

    if isinstance(control_net, comfy.controlnet.ControlNet):
        model = getattr(control_net, "control_model", None)
        if type(model) is comfy.cldm.cldm.ControlNet and getattr(model, "task_embedding", None) is None:
            return model, getattr(control_net, "manual_cast_dtype", None), control_net.load_device
    elif isinstance(control_net, comfy.controlnet.T2IAdapter):
        model = getattr(control_net, "t2i_model", None)
        if type(model) in (t2i.Adapter, t2i.Adapter_light):  # not Stable Cascade's, also loaded as one
            # ComfyUI runs it in the sampling dtype: so do we
            return model, _dtype_and_devices()[1], getattr(control_net, "device", None)
    return None


def _handle_for(control_net: Any) -> NetHandle:
    """Our network behind a CONTROL_NET: ours directly; a ComfyUI-loaded ControlNet or T2I-Adapter
    converted (its weights shared where the dtype allows, not copied), once per network."""
    if is_core_control(control_net):
        return control_net.handle
    found = _comfyui_network(control_net)
    if found is None:
        raise InputError(
            f"this ControlNet ({type(control_net).__name__}) was loaded by another node and only the default "
            "options work with it (control mode 'balanced', resize 'crop', interpolation 'nearest-exact', no "
            "mask, no stack, control_type 'auto'); load it with 'Load ControlNet (CNCore)' to use them"
        )
    model, compute, load_device = found
    if model in _converted:
        return _converted[model]
    state = {k: v.detach() for k, v in model.state_dict().items()}
    storage = next(iter(state.values())).dtype  # kept as ComfyUI keeps them: shared, not copied
    compute = compute or storage
    device = next(iter(state.values())).device
    try:
        net = load_controlnet(state, device=device, dtype=storage, ops=_ops_for(storage, compute),
                              name="from ComfyUI's Load ControlNet node", compute_dtype=compute)
    except ControlNetError as e:
        raise InputError(
            f"this ControlNet from ComfyUI's loader cannot take the CNCore options ({e}); use the default options "
            "or load it with 'Load ControlNet (CNCore)'"
        ) from None
    import comfy.model_management as mm

    handle = _make_handle(net, net.source_name, load_device or mm.get_torch_device(), mm.unet_offload_device())
    _converted[model] = handle
    return handle


# ------------------------------------------------------------------------------------------
# apply

def _conditioning_width(conditioning: Any) -> list[int]:
    widths = []
    for item in conditioning or []:
        try:
            t, d = item[0], item[1]
        except (TypeError, IndexError, KeyError):
            raise InputError("positive and negative must be CONDITIONING (from a text encode node)") from None
        t = d.get("crossattn_controlnet", t) if isinstance(d, dict) else t
        if isinstance(t, torch.Tensor) and t.ndim == 3:
            widths.append(int(t.shape[-1]))
    return widths


def check_conditioning(handles: list[NetHandle], positive: Any, negative: Any) -> None:
    """An SDXL ControlNet on SD1.5 text conditioning (and the like) is refused at apply time."""
    widths = set(_conditioning_width(positive)) | set(_conditioning_width(negative))
    for h in handles:
        for wdt in sorted(widths):
            if not h.fits(wdt, None, check_adm=False):
                want = getattr(h.net, "context_dim", None)
                made_for = f"{h.family} models" + (f" (text width {want})" if want is not None else "")
                raise InputError(
                    f"the {h.kind} {h.name!r} is made for {made_for}, but the conditioning comes from "
                    f"{family_of_width(wdt)} (text width {wdt}); use a {h.kind} made for your checkpoint"
                )


def _bind(entry: StackEntry) -> BoundEntry:
    if not isinstance(entry, StackEntry):
        raise InputError("control_stack must come from a Combine ControlNets (CNCore) node")
    handle = _handle_for(entry.control_net)
    control_type = entry.control_type
    if is_core_control(entry.control_net):  # 'auto' takes e.g. the one ComfyUI's SetUnionControlNetType set
        control_type = entry.control_net.cncore_type(control_type)
    return BoundEntry(handle, to_bchw(entry.image, handle.net.hint_channels),
                      float(entry.strength), float(entry.start_percent), float(entry.end_percent),
                      normalize_mask(entry.mask), bool(getattr(entry.control_net, "global_average_pooling", False)),
                      control_type)


def apply_control(
    positive: Any, negative: Any, control_net: Any, image: torch.Tensor, strength: float, start_percent: float,
    end_percent: float, control_mode: str = DEFAULT_MODE, resize_mode: str = DEFAULT_RESIZE,
    interpolation: str = DEFAULT_INTERPOLATION, vae: Any = None, mask: Any = None, control_stack: Any = None,
    control_type: str = DEFAULT_CONTROL_TYPE, union_multi_condition: bool = False,
) -> tuple[Any, Any]:
    """Attach the control (and a stack) to every conditioning of positive and negative.

    As ComfyUI's ControlNetApplyAdvanced: strength 0 (and no stack) returns the inputs unchanged;
    each distinct previous control gets one new control object, shared by positive and negative (so
    they are batched together); `control_apply_to_uncond` is False. `union_multi_condition`: the
    types of one Union file in this node's stack run as one multi-condition pass (ControlStack's
    `fuse`) instead of one pass per type summed (ComfyUI's chain, the default).
    """
    if control_net is None:
        raise InputError("connect a ControlNet (from a Load ControlNet node) to control_net")
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"image must be a ComfyUI IMAGE batch (batch, height, width, channels); got {got}")
    entries = tuple(control_stack or ())
    if strength == 0 and not entries:
        return positive, negative
    mask = normalize_mask(mask)
    ours = is_core_control(control_net)
    plain = (control_mode, resize_mode, interpolation, control_type) == (
        DEFAULT_MODE, DEFAULT_RESIZE, DEFAULT_INTERPOLATION, DEFAULT_CONTROL_TYPE)
    # Grey and RGBA images are taken as the preprocessors take them (grey to RGB, alpha dropped), for
    # ComfyUI's own ControlNets too, which would fail on them (to_bchw; other channel counts: a sentence).
    # An image that already fits is passed on as ComfyUI's own apply node passes it (the same view).
    channels = control_net.handle.net.hint_channels if ours else 3
    hint = image.movedim(-1, 1) if image.shape[-1] == channels else to_bchw(image, channels)

    if not ours and plain and mask is None and not entries:
        def make():  # ComfyUI's own control object, applied as ControlNetApplyAdvanced does
            return control_net.copy().set_cond_hint(hint, strength, (start_percent, end_percent), vae=vae)
    else:
        template = control_net if ours else control_class()(_handle_for(control_net))
        bound = [_bind(e) for e in entries if float(e.strength) != 0]
        handle = template.handle

        def make():
            c = template.copy().set_cond_hint(hint, strength, (start_percent, end_percent), vae=vae)
            c.cncore_mode, c.cncore_resize, c.cncore_interpolation = control_mode, resize_mode, interpolation
            c.cncore_mask = mask
            c.cncore_control_type = control_type
            c.cncore_multi_condition = bool(union_multi_condition)
            c.cncore_entries = list(bound)
            return c

        probe = make()
        probe.cncore_stack()  # validates settings, hints, masks and the stack's architectures now
        check_conditioning(probe.cncore_handles(), positive, negative)
        if vae is not None:
            for h in probe.cncore_handles():
                if getattr(h.net, "hint_space", None) == "pixel" and h not in _vae_noted:
                    _vae_noted.add(h)  # once per loaded net
                    log.info("CNCore: %s takes its hint as pixels; the connected VAE is not used for it", h.name)
        if not ours:
            log.debug("CNCore: using %s through the CNCore runtime", handle.name)

    made: dict[int, Any] = {}
    out = []
    for conditioning in (positive, negative):
        c_out = []
        for t, d in conditioning:
            d = d.copy()
            prev = d.get("control")
            key = id(prev)
            if key not in made:
                made[key] = make().set_previous_controlnet(prev)
            d["control"] = made[key]
            d["control_apply_to_uncond"] = False
            c_out.append([t, d])
        out.append(c_out)
    return out[0], out[1]


def stack_entry(control_net: Any, image: Any, strength: float, start_percent: float, end_percent: float,
                mask: Any = None, control_type: str = DEFAULT_CONTROL_TYPE) -> StackEntry:
    """A validated CONTROL_STACK entry (the checks that need no ComfyUI run here, the rest at apply)."""
    if control_net is None:
        raise InputError("connect a ControlNet (from a Load ControlNet node) to control_net")
    channels = control_net.handle.net.hint_channels if is_core_control(control_net) else 3
    to_bchw(image, channels)
    mask = normalize_mask(mask)
    ControlSettings(strength=strength, start_percent=start_percent, end_percent=end_percent)
    if is_core_control(control_net):  # a type the model does not take is refused here, at the Combine node
        with_control_type(control_net.handle.net, control_net.cncore_type(control_type), control_net.handle.name)
    return StackEntry(control_net, image, float(strength), float(start_percent), float(end_percent), mask,
                      control_type)


def patch_controlnext_unet(model: Any, name: str, strength: float) -> Any:
    """A clone of `model` with a ControlNeXt UNet weights file applied as ComfyUI weight patches
    ("diff": W + strength * dW, for increments and for absolute weights taken as W_file - W_base), so
    ComfyUI patches and unpatches them like a LoRA's: with --lowvram, next to LoRAs (applied in the order
    the nodes run), and a MODEL without the node is untouched."""
    from ..controlnet_core.formats import controlnext as cnx

    if model is None or not hasattr(model, "add_patches"):
        raise InputError("connect a MODEL (from a checkpoint loader) to model")
    path = resolve_model_path(name)
    weights = cnx.read_unet_weights(path, name)
    unet = model.model.diffusion_model
    sd = unet.state_dict()
    base = {}
    for k in weights:  # the unpatched weight where the model is loaded with patches applied
        bk = model.backup.get("diffusion_model." + k) if hasattr(model, "backup") else None
        base[k] = bk.weight if bk is not None else sd.get(k)
    base = {k: v for k, v in base.items() if v is not None}
    _, _, model_name = _model_family(model)
    kind, deltas = cnx.unet_patches(weights, base, name, model_name)
    patched = model.clone()
    added = patched.add_patches({"diffusion_model." + k: ("diff", (d,)) for k, d in deltas.items()}, float(strength))
    log.info("CNCore: ControlNeXt UNet weights %s: %d tensors (%s), strength %g", name, len(added),
             "increments" if kind == "delta" else "replacements, applied as their difference to the model", strength)
    return patched


def _model_family(model: Any) -> tuple:
    from .control_object import model_family

    return model_family(model.model)


__all__ = [
    "NetHolder", "apply_control", "check_conditioning", "check_model_name", "control_class", "controlnet_names",
    "file_signature", "is_core_control", "last_input", "load_control", "model_info", "patch_controlnext_unet",
    "progress_reporter", "remember_input", "resolve_image_path", "resolve_model_path", "setup_annotators",
    "stack_entry",
]
