"""Where annotator weight files are found, and how they are read.

Finding (`find_weights`): by file name only, never downloaded. The folders searched, in order, are
the *roots*: those the host registered with `set_roots_provider` (the ComfyUI adapter: ComfyUI's
`models/annotators` folders incl. `extra_model_paths.yaml` key `annotators`, then Aux's `ckpts/`
tree when comfyui_controlnet_aux sits next to us in custom_nodes, then `models/depthanything`),
then `$AUX_ANNOTATOR_CKPTS_PATH` when set. Each root is searched with its subfolders (Aux keeps
`ckpts/<hf_repo_id>/<file>`); hidden folders (Aux's `.cache` of half-done downloads) are skipped.
The accepted names are in order of preference: the first name found in any root wins.

Reading (`read_state_dict`): the core's safe reader (safetensors, or `torch.load(weights_only=True)`,
a file that needs arbitrary objects refused), then the annotator files' quirks in this one place:
wrappers (`{'state_dict': ...}`, `{'model': ...}`: the core reader's unwrapping), a `module.` prefix
of DataParallel training, and fp16 storage (HED) cast to fp32.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..errors import PreprocessorError

AUX_ENV = "AUX_ANNOTATOR_CKPTS_PATH"
AUX_DIR_NAMES = ("comfyui_controlnet_aux",)
# What a missing-file message names as the folder to put a file in when no host registered one.
DEFAULT_FOLDER = "ComfyUI/models/annotators"

_provider: Callable[[], Sequence[Path]] | None = None
_found: dict[tuple, Path] = {}
_lock = threading.Lock()


def set_roots_provider(provider: Callable[[], Sequence[Path]] | None) -> None:
    """The host's folders to search (called at each search: ComfyUI's folder list can change)."""
    global _provider
    _provider = provider
    _found.clear()


def search_roots() -> list[Path]:
    """The roots `find_weights` searches when given none: the host's, then $AUX_ANNOTATOR_CKPTS_PATH."""
    roots = [Path(r) for r in (_provider() if _provider is not None else ())]
    env = os.environ.get(AUX_ENV, "").strip()
    if env:
        roots.append(Path(env))
    return _unique(roots)


def aux_ckpts_roots(custom_nodes_dirs: Iterable[str | os.PathLike]) -> list[Path]:
    """Aux's `ckpts` folders for the given custom_nodes folders: `<aux>/ckpts`, or the folder its
    `config.yaml` names as `annotator_ckpts_path` (relative to the Aux folder, as Aux reads it)."""
    out = []
    for base in custom_nodes_dirs:
        base = Path(base)
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            if entry.name.lower() not in AUX_DIR_NAMES or not entry.is_dir():
                continue
            ckpts = entry / "ckpts"
            configured = _aux_configured_path(entry / "config.yaml")
            if configured:
                out.append((entry / configured).resolve() if not Path(configured).is_absolute() else Path(configured))
            out.append(ckpts)
    return _unique(out)


def _aux_configured_path(config: Path) -> str | None:
    # One top-level scalar is all we need: no YAML dependency for it.
    try:
        text = config.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    m = re.search(r"^annotator_ckpts_path\s*:\s*(.+?)\s*$", text, re.MULTILINE)
    if not m:
        return None
    value = m.group(1).split(" #")[0].strip().strip("'\"")
    return value or None


def _unique(paths: Iterable[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            out.append(Path(p))
    return out


def _walk(root: Path, names: set[str]) -> dict[str, Path]:
    """The first file of each wanted name under root (root itself first, then subfolders in sorted
    order; symlinked files count, symlinked folders are not followed)."""
    hits: dict[str, Path] = {}
    for name in names:
        direct = root / name
        if direct.is_file():
            hits[name] = direct
    if len(hits) == len(names):
        return hits
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: None):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f in names and f not in hits and os.path.isfile(os.path.join(dirpath, f)):
                hits[f] = Path(dirpath, f)
        if len(hits) == len(names):
            break
    return hits


def find_weights(file_names: Sequence[str], *, source: str, roots: Sequence[Path] | None = None) -> Path:
    """The path of the first of `file_names` (preferred first) found under the roots (default:
    `search_roots()`), subfolders included. None found: a PreprocessorError naming the file(s), the
    public repository they come from (`source`) and the folder to put them in."""
    names = [str(n) for n in file_names]
    if not names:
        raise PreprocessorError("no weights file name given (a bug of the method's registration)")
    roots = _unique(Path(r) for r in (search_roots() if roots is None else roots))
    key = (tuple(names), tuple(str(r) for r in roots))
    with _lock:
        cached = _found.get(key)
    if cached is not None and cached.is_file():
        return cached
    hits_by_root = [_walk(r, set(names)) for r in roots if r.is_dir()]
    for name in names:
        for hits in hits_by_root:
            if name in hits:
                with _lock:
                    _found[key] = hits[name]
                return hits[name]
    wanted = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    folder = str(roots[0]) if roots else DEFAULT_FOLDER
    searched = f" (searched: {', '.join(str(r) for r in roots)})" if len(roots) > 1 else ""
    raise PreprocessorError(
        f"the weights file {wanted} was not found; nothing is downloaded: get it from {source} and put it "
        f"in {folder} (subfolders are fine){searched}"
    )


def read_state_dict(path: str | os.PathLike) -> dict:
    """`{name: float32 tensor}` of an annotator weights file (see the module docstring).

    An unreadable, truncated or unsafe file: a PreprocessorError naming the file and what to do."""
    import torch

    from ...controlnet_core.errors import LoadError
    from ...controlnet_core.formats.files import read_state_dict as read_file

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t

    try:
        sd, _meta = read_file(path, cast=cast)
    except LoadError as e:
        raise PreprocessorError(str(e)) from None
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_into(module, sd: dict, *, path: str | os.PathLike, what: str) -> None:
    """Load `sd` into `module` strictly. Missing or unexpected names, or a shape that differs (the
    file of another annotator, or of another model size, under the expected name): a sentence naming
    the file and what it was expected to be, instead of torch's key dump."""
    name = Path(path).name
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} of its {len(own)} weights are missing (e.g. {missing[0]!r})")
        if unexpected:
            detail.append(f"it has {len(unexpected)} weights that do not belong (e.g. {unexpected[0]!r})")
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} have another shape (e.g. {k!r}: {tuple(sd[k].shape)} in the file, "
                          f"{tuple(own[k].shape)} expected)")
        raise PreprocessorError(
            f"{name} is not a {what} weights file: {'; '.join(detail)}; it is probably another model's file "
            "under this name: get the right file again"
        )
    module.load_state_dict(sd, strict=True)
