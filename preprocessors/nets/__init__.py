"""The network annotators (Depth Anything, HED, PiDiNet, lineart, M-LSD, NormalBAE, ...): one module
per annotator (the torch network and its pre/post-processing), built from weight files the user
already has. Nothing here downloads; nothing here imports ComfyUI (the adapter passes in the folders
to search and the device host).

* `files.py`: `find_weights` (where the files are found, by name), `read_state_dict` (safe reading
  and the files' quirks), `load_into` (a state dict into a module, with a sentence on mismatch).
* `host.py`: `Net` (what a method gets as `model=`) and the device host seam.
* `common.py`: Aux's shared image recipes (resize with pad, HWC3, uint8 conversions).

How a network method registers (see preprocessors/registry.py):

    register(Method("my_net", fn, params, feeds, doc,
                    load_weights=my_net.load,            # Path -> nn.Module
                    weights=Weights(("my_net.pth",), "https://huggingface.co/owner/repo"),
                    weights_doc="my_net.pth from https://huggingface.co/owner/repo"))

with `fn(frame, model: Net, **params)`: `dev = model.device()`, then run `model.module` on `dev`
under `torch.inference_mode()`.
"""

from .files import find_weights, load_into, read_state_dict, search_roots, set_roots_provider
from .host import Net, set_host

__all__ = ["Net", "find_weights", "load_into", "read_state_dict", "search_roots", "set_host", "set_roots_provider"]
