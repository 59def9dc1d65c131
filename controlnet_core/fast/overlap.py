"""Overlap for hosts that never call `"sync"`: a residual dict whose first read makes the host wait.

With `overlap`, the runner hands the residuals back while the ControlNet still runs on a side
stream, together with `"sync"`, a callable that makes the host's stream wait for it. Our reference
UNet calls it before its first residual. ComfyUI knows no such key: its UNet reads `control[name]`
(`apply_control`, after each input block, after the middle block, before each output block) and a
chained control's `control_merge` reads `control_prev[name]` while the UNet has not started yet.

`on_read(d)` returns the same dict without "sync", as a `SyncOnRead`: the first read of a slot that
holds tensors (through any mapping access: `d[k]`, `d.get`, `items`, `values`, iteration, copies,
`dict(d)`, `{**d}`) calls `sync` once, before the tensors are handed out. A ControlNet's dict has an
empty "input" slot, so ComfyUI's UNet reads nothing until `control["middle"]` after its middle
block: the ControlNet overlaps the whole encoder, and every other reader (a chained control, a
wrapper of another pack) waits at its own first read. Nothing is registered on the host, so
nothing can outlive the call. The code path in ComfyUI: docs/comfyui_fast_path.md.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping


class SyncOnRead(dict):
    """A dict that calls `sync()` once, at the first read that can hand out a tensor."""

    __slots__ = ("_sync",)

    def __init__(self, data: Mapping[str, Any], sync: Callable[[], None] | None):
        super().__init__(data)
        self._sync = sync

    def _wait(self, key: Any = None, probe: bool = False) -> None:
        # `probe`: a read of one key, which needs the wait only if that slot holds something
        if self._sync is not None and (not probe or dict.get(self, key)):
            sync, self._sync = self._sync, None
            sync()

    @property
    def pending(self) -> bool:
        """True until the host has waited (for tests and diagnostics)."""
        return self._sync is not None

    def __getitem__(self, key: Any) -> Any:
        self._wait(key, probe=True)
        return dict.__getitem__(self, key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._wait(key, probe=True)
        return dict.get(self, key, default)

    def pop(self, key: Any, *default: Any) -> Any:
        self._wait(key, probe=True)
        return dict.pop(self, key, *default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._wait(key, probe=True)
        return dict.setdefault(self, key, default)

    # Whole-dict reads. Overriding __iter__ also sends dict(d), {**d} and d.update(...) of another
    # dict through keys() + __getitem__ instead of CPython's direct copy of the entries.
    def __iter__(self):
        self._wait()
        return dict.__iter__(self)

    def items(self):
        self._wait()
        return dict.items(self)

    def values(self):
        self._wait()
        return dict.values(self)

    def popitem(self) -> tuple[Any, Any]:
        self._wait()
        return dict.popitem(self)

    def copy(self) -> dict:
        self._wait()
        return dict(dict.items(self))

    __copy__ = copy

    def __deepcopy__(self, memo: dict) -> dict:
        import copy

        self._wait()
        return copy.deepcopy(dict(dict.items(self)), memo)

    def __reduce_ex__(self, protocol: Any) -> Any:
        self._wait()
        return (dict, (dict(dict.items(self)),))

    def __or__(self, other: Any) -> Any:
        self._wait()
        return dict(dict.items(self)) | other

    def __ror__(self, other: Any) -> Any:
        self._wait()
        return other | dict(dict.items(self))

    def __eq__(self, other: Any) -> bool:
        self._wait()
        return dict.__eq__(self, other)

    def __ne__(self, other: Any) -> bool:
        self._wait()
        return dict.__ne__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        self._wait()
        return dict.__repr__(self)


def on_read(d: Any) -> Any:
    """`d` with its "sync" turned into a wait at the first read (a `SyncOnRead`); `d` itself when
    it carries no "sync" (no overlap, or None)."""
    if not isinstance(d, dict) or "sync" not in d:
        return d
    sync = d.pop("sync")
    return SyncOnRead(d, sync)
