"""The runner: one per stack of controls, with one entry per input shape.

An entry owns static buffers (latent, timesteps, context, y, each control's hint embedding and
scales, and one flat output buffer that every residual is a view of). Its `body` runs every
active control's ControlNet from those buffers and writes `sum_k strength_k * w_ki * r_ki` into
the output views in place (`mul(out=)` for the first control, `addcmul_` for the next ones; with
`parallel`, each further control runs on its own stream into its own flat buffer, added at the
end). The first `warmup_calls` calls of an entry run the body eagerly (this also warms cuDNN /
cuBLAS on the streams used), the next one captures it in a CUDA graph, later ones replay it.

Per call only small copies happen on the host's stream: x, t, context, y into the static
buffers (the hint embedding only when the run's cached embedding changed), then the replay, then
(with `fresh_outputs`) one flat copy of the residuals. With `overlap` the replay runs on a side
stream and the dict carries `"sync"`, which makes the host's stream wait for it.

Anything the body cannot express (masks, grad mode, weights off the latent's device, a
bad hint batch, input checks) goes back to the plain path by returning `NotImplemented`; a graph
capture that fails marks the entry eager-only and says so once.

Memory. Every graph of every runner and shape is captured into ONE private pool per device (its
outputs live outside the pool, in the entry's flat buffer, so graphs only share transient
memory, and they never replay concurrently: all replays are on the one side stream). Runners hold
their controls weakly: when a run's controls are dropped (ComfyUI's `cleanup`), or `release(x)` is
called, their graphs and buffers go, and the host's `empty_cache` gets the pool back. A graph is
captured only while the device keeps `min_free_mib` free beyond what the graph needs; when it does
not, every graph is dropped and the controls run eagerly (logged once).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..hint import tile_to_batch
from ..host import COND, StepRequest, unet_control
from .options import FastOptions, enabled, get_options

STATS: collections.Counter = collections.Counter()
# eager / capture / replay / fallback / capture_failed / graphs_dropped_memory
log = logging.getLogger(__name__)

_RUNNERS: dict[tuple[int, ...], "_Runner"] = {}
_SIDE: dict[int, torch.cuda.Stream] = {}
_BRANCH: dict[tuple[int, int], torch.cuda.Stream] = {}
_POOL: dict[int, Any] = {}
_LAST_DONE: dict[int, torch.cuda.Event] = {}
_PRIMED: set[tuple[int, torch.dtype]] = set()
_NEED: dict[int, int] = {}  # per device: the most device memory one capture took (measured)
_LOGGED: set[str] = set()


# Per-device singletons. `dev` is always a tensor's device, which carries its index.
def _side_stream(dev: torch.device) -> torch.cuda.Stream:
    if dev.index not in _SIDE:
        _SIDE[dev.index] = torch.cuda.Stream(device=dev)
    return _SIDE[dev.index]


def _branch_stream(dev: torch.device, k: int) -> torch.cuda.Stream:
    if (dev.index, k) not in _BRANCH:
        _BRANCH[(dev.index, k)] = torch.cuda.Stream(device=dev)
    return _BRANCH[(dev.index, k)]


def _pool(dev: torch.device) -> Any:
    if dev.index not in _POOL:
        _POOL[dev.index] = torch.cuda.graph_pool_handle()
    return _POOL[dev.index]


def release(target: Any = None) -> int:
    """Drop runners with their graphs and static buffers; returns how many were dropped.

    target None: all of them (and the per-device pool handles); a stack (anything with `controls`)
    or a control: every runner that evaluates one of those controls; a module: every runner whose
    controls use it (the host unloading that model). The host's `empty_cache` then gets the
    graphs' pool back.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # no replay may still read what is dropped
    if target is None:
        n = len(_RUNNERS)
        _RUNNERS.clear()
        _LAST_DONE.clear()
        _POOL.clear()
        return n
    if isinstance(target, torch.nn.Module):
        def uses(c: Any) -> bool:
            return c.net is target
    else:
        wanted = list(getattr(target, "controls", None) or [target])

        def uses(c: Any) -> bool:
            return any(c is w for w in wanted)
    # list(): a runner's weakref callback may drop entries if the GC runs meanwhile
    keys = [k for k, r in list(_RUNNERS.items()) if any(c is not None and uses(c) for c in r.controls())]
    for k in keys:
        _RUNNERS.pop(k, None)
    return len(keys)


def stack_residuals(stack: Any, request: StepRequest) -> Any:
    """The fast path for `ControlStack.residuals`: the residual dict, None (no control active),
    or `NotImplemented` when the plain path must run instead."""
    if not enabled():
        return NotImplemented
    opts = get_options()
    controls = list(getattr(stack, "controls", ()))
    if not controls:
        return NotImplemented
    x = request.x
    if x.device.type != "cuda" and not opts.allow_cpu:
        return NotImplemented
    if torch.is_grad_enabled():
        return NotImplemented
    if any(c.mask is not None or getattr(c.net, "fast_path_net", None) is None for c in controls):
        return NotImplemented
    key = tuple(id(c) for c in controls)
    runner = _RUNNERS.get(key)
    if runner is None or not runner.alive(controls):
        runner = _Runner(controls, key)
        _RUNNERS[key] = runner
    try:
        return runner(request, opts)
    except _Fallback:
        STATS["fallback"] += 1
        return NotImplemented


class _Fallback(Exception):
    pass


def _drop(key: tuple[int, ...], runner_ref: "weakref.ref[_Runner]") -> None:
    """A control of the runner died: drop the runner (not a newer one that reuses the ids)."""
    if _RUNNERS.get(key) is runner_ref():
        _RUNNERS.pop(key, None)


@dataclass
class _Spec:
    """What an entry keeps of an active control. Never the control itself: an entry lives in a
    module-level cache, and a strong reference would keep every run's controls (and so their
    runners, graphs and buffers) alive for the whole process."""

    index: int  # the control's position in the runner
    net: torch.nn.Module
    rows_key: tuple[int, ...] | None  # cond_or_uncond when only some rows run (cond-only)
    global_pool: bool
    scales: tuple[float, ...]


@dataclass
class _Entry:
    specs: list[_Spec]
    batch: int
    chunks: int
    x: torch.Tensor
    t: torch.Tensor
    ctx: torch.Tensor
    y: torch.Tensor | None
    embs: list[torch.Tensor]
    emb_src: list[Any]
    scales: list[torch.Tensor]
    scale_src: list[tuple[float, ...]]
    rows: list[torch.Tensor | None]
    parallel: bool
    out_flat: torch.Tensor | None = None
    out_views: list[torch.Tensor] = field(default_factory=list)
    layout: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)
    part_flats: dict[int, torch.Tensor] = field(default_factory=dict)
    part_views: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    calls: int = 0
    graph: Any = None
    graph_failed: bool = False  # capture failed, or skipped for memory: this entry stays eager


class _Runner:
    def __init__(self, controls: Sequence[Any], key: tuple[int, ...]):
        me = weakref.ref(self)
        self.refs = [weakref.ref(c, lambda _r, k=key: _drop(k, me)) for c in controls]
        self.entries: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
        self.weights_key: tuple | None = None

    def alive(self, controls: Sequence[Any]) -> bool:
        return len(controls) == len(self.refs) and all(r() is c for r, c in zip(self.refs, controls))

    def controls(self) -> list[Any]:
        return [r() for r in self.refs]

    # ------------------------------------------------------------------------------------------
    def __call__(self, request: StepRequest, opts: FastOptions) -> Any:
        x = request.x
        dev = x.device
        cuda = dev.type == "cuda"
        capturing = cuda and torch.cuda.is_current_stream_capturing()
        batch, chunks = x.shape[0], len(request.cond_or_uncond)
        sigma0 = float(request.sigma[0])

        specs: list[_Spec] = []
        active: list[Any] = []  # the controls of `specs`, for this call only
        for k, c in enumerate(self.controls()):
            if c is None or not c.is_active(sigma0):
                continue
            rows_key = None
            if c.settings.apply_to == "cond-only":
                n_cond = list(request.cond_or_uncond).count(COND)
                if n_cond == 0:
                    continue
                if n_cond < chunks:
                    rows_key = request.cond_or_uncond
            s = c.settings
            net = getattr(c.net, "fast_path_net", None)
            if net is None:  # e.g. a Control-LoRA whose merge was freed since the check above
                raise _Fallback
            specs.append(_Spec(k, net, rows_key, s.global_pool, tuple(s.strength * w for w in c.weights)))
            active.append(c)
        if not specs:
            return None

        wkey = tuple(_weights_key(s.net) for s in specs)
        if wkey != self.weights_key:
            if capturing:
                raise _Fallback
            if any(_off_device(s.net, dev) for s in specs):
                raise _Fallback
            if self.entries:
                _sync(dev)
                self.entries.clear()
            self.weights_key = wkey
        embs = []
        for c in active:
            e = c.hint_embedding(x.shape[-2], x.shape[-1], dev)
            if e.shape[0] != 1 and e.shape[0] * chunks != batch:
                raise _Fallback  # the plain path raises the right error
            embs.append(e)

        y = request.y
        t = request.timesteps
        if any(v is not None and v.device != dev for v in (t, request.context, y)):
            raise _Fallback  # mixed devices: the plain path behaves (or fails) as it always did
        parallel = bool(opts.parallel and cuda and len(specs) > 1)
        key = (
            tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, tuple(request.context.shape), request.context.dtype,
            None if y is None else (tuple(y.shape), y.dtype), chunks, parallel,
            tuple((s.index, s.rows_key, s.global_pool, tuple(e.shape), e.dtype) for s, e in zip(specs, embs)),
        )
        entry = self.entries.get(key)
        if entry is None:
            if capturing:
                raise _Fallback
            entry = self._new_entry(specs, request, embs, parallel)
            self.entries[key] = entry
            while len(self.entries) > opts.max_graphs:
                _sync(dev)
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
            for s_new, s_old in zip(specs, entry.specs):  # strength may change between calls
                s_old.scales = s_new.scales

        cur = torch.cuda.current_stream(dev) if cuda else None
        if cuda and not capturing and dev.index in _LAST_DONE:
            cur.wait_event(_LAST_DONE[dev.index])  # the previous replay may still read the buffers
        # --- inputs into the static buffers (on the host's stream) ---
        entry.x.copy_(x)
        entry.t.copy_(t)
        entry.ctx.copy_(request.context)
        if y is not None:
            entry.y.copy_(y)
        for k, (s, e) in enumerate(zip(entry.specs, embs)):
            if entry.emb_src[k] is not e:
                entry.embs[k].copy_(e)
                entry.emb_src[k] = e
            if entry.scale_src[k] != s.scales:
                if capturing:
                    raise _Fallback
                entry.scales[k].copy_(torch.tensor(s.scales, dtype=torch.float32), non_blocking=False)
                entry.scale_src[k] = s.scales

        overlap = bool(opts.overlap and cuda)
        # eager warm-up calls run on the side stream too when a graph will follow: the capture
        # happens there, so cuBLAS/cuDNN are warm on that stream
        warm_side = (opts.warm_on_side and opts.graphs and entry.graph is None and not entry.graph_failed
                     and not capturing)
        run = _side_stream(dev) if cuda and (overlap or warm_side) else cur
        if cuda and run is not cur:
            run.wait_stream(cur)
        fresh = None
        ctx_mgr = torch.cuda.stream(run) if cuda else contextlib.nullcontext()
        with ctx_mgr:
            if entry.graph is not None and not capturing:
                entry.graph.replay()
                STATS["replay"] += 1
            else:
                want_graph = (cuda and opts.graphs and not capturing and not entry.graph_failed
                              and entry.out_flat is not None and entry.calls >= opts.warmup_calls)
                free_before = _free_device_bytes(dev) if want_graph else 0  # one read: the check and the measure
                if want_graph and not _memory_allows_graph(entry, dev, opts, free_before):
                    entry.graph_failed = True
                    want_graph = False
                if want_graph and self._capture(entry, dev):
                    entry.graph.replay()
                    STATS["replay"] += 1
                    _measure_need(dev, free_before)
                else:
                    _body(entry)
                    STATS["eager"] += 1
            entry.calls += 1
        if opts.fresh_outputs:
            fresh = torch.empty_like(entry.out_flat)  # allocated on the host's stream
            with ctx_mgr:
                fresh.copy_(entry.out_flat)
            if cuda and run is not cur and not capturing:
                # written on the side stream: if the host drops it before it waits (an interrupted
                # step), the allocator must not hand the block out before that copy has finished
                fresh.record_stream(run)
            views = [fresh[o:o + n].view(shape) for o, n, shape in entry.layout]
        else:
            views = list(entry.out_views)
        out = unet_control(views[:-1], views[-1])
        if cuda and run is not cur:
            done = torch.cuda.Event()
            done.record(run)
            if not capturing:
                _LAST_DONE[dev.index] = done
            if overlap:
                out["sync"] = _Sync(cur, done)
            else:
                cur.wait_event(done)
        return out

    # ------------------------------------------------------------------------------------------
    def _new_entry(self, specs: list[_Spec], request: StepRequest, embs: list[torch.Tensor], parallel: bool) -> _Entry:
        x = request.x
        dev = x.device
        # a rows_key is this request's cond_or_uncond, so its cond rows are the request's
        cond_rows = request.rows(COND) if any(s.rows_key is not None for s in specs) else None
        rows = [None if s.rows_key is None else cond_rows for s in specs]
        return _Entry(
            specs=specs, batch=x.shape[0], chunks=len(request.cond_or_uncond),
            x=torch.empty_like(x), t=torch.empty_like(request.timesteps),
            ctx=torch.empty_like(request.context), y=None if request.y is None else torch.empty_like(request.y),
            embs=[torch.empty_like(e) for e in embs], emb_src=[None] * len(specs),
            scales=[torch.empty(len(s.scales), dtype=torch.float32, device=dev) for s in specs],
            scale_src=[()] * len(specs), rows=rows, parallel=parallel,
        )

    def _capture(self, entry: _Entry, dev: torch.device) -> bool:
        g = torch.cuda.CUDAGraph()
        side = _side_stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        if (dev.index, entry.x.dtype) not in _PRIMED:
            # cuBLAS keeps a workspace per stream, made at its first matmul there: make it now,
            # outside the capture, not inside the graph's pool (matters when warm_on_side is off)
            with torch.cuda.stream(side):
                a = torch.ones(8, 8, device=dev, dtype=entry.x.dtype)
                torch.mm(a, a)
            _PRIMED.add((dev.index, entry.x.dtype))
        try:
            with torch.cuda.stream(side):
                g.capture_begin(pool=_pool(dev), capture_error_mode="thread_local")
                try:
                    _body(entry)
                finally:
                    g.capture_end()
        except Exception as exc:  # an op that cannot be captured: stay eager for this entry
            entry.graph_failed = True
            STATS["capture_failed"] += 1
            warnings.warn(f"ControlNet fast path: CUDA graph capture failed ({exc}); running eagerly", stacklevel=3)
            torch.cuda.synchronize(dev)
            return False
        torch.cuda.current_stream(dev).wait_stream(side)
        entry.graph = g
        STATS["capture"] += 1
        return True


class _Sync:
    """The `"sync"` callable of the residual dict: the host's stream waits for the ControlNet."""

    __slots__ = ("stream", "event")

    def __init__(self, stream: torch.cuda.Stream, event: torch.cuda.Event):
        self.stream, self.event = stream, event

    def __call__(self) -> None:
        self.stream.wait_event(self.event)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free_device_bytes(dev: torch.device) -> int:
    """Device memory no one has reserved (the driver's free count; the host's cached blocks are
    not free for a graph: its pool takes new segments, and the host needs its cache next step)."""
    return int(torch.cuda.mem_get_info(dev)[0])


def _measure_need(dev: torch.device, free_before: int) -> None:
    """After a graph's capture and first replay: what it took from the device (the pool's new
    segments at capture; with cudaMallocAsync a graph's memory is mapped at its first launch)."""
    torch.cuda.synchronize(dev)
    _NEED[dev.index] = max(_NEED.get(dev.index, 0), free_before - _free_device_bytes(dev))


def graph_need_bytes(entry: Any, dev: torch.device) -> int:
    """What capturing `entry` is expected to take: the most a capture on this device took so far,
    and at least twice its residual bytes (the residuals live in the pool during the body, next to
    block activations of a similar size)."""
    floor = 2 * entry.out_flat.numel() * entry.out_flat.element_size()
    return max(_NEED.get(dev.index, 0), floor)


def _memory_allows_graph(entry: Any, dev: torch.device, opts: FastOptions, free: int | None = None) -> bool:
    """True when the device keeps `min_free_mib` free after the graph's need (`free`: the device's
    free bytes, read here when not given). Otherwise every graph is dropped (their pool goes back
    at the host's next `empty_cache`), this entry stays eager, and the reason is logged once per
    process."""
    need = graph_need_bytes(entry, dev)
    if free is None:
        free = _free_device_bytes(dev)
    if free >= need + opts.min_free_mib * 2**20:
        return True
    dropped = 0
    for r in list(_RUNNERS.values()):
        for e in list(r.entries.values()):
            if e.graph is not None:
                e.graph, e.graph_failed = None, True
                dropped += 1
    STATS["graphs_dropped_memory"] += 1
    if "memory" not in _LOGGED:
        _LOGGED.add("memory")
        log.warning(
            "ControlNet fast path: %d MiB of VRAM free, a CUDA graph needs about %d MiB plus %d MiB to spare; "
            "running the ControlNet without graphs (%d dropped) so the memory stays with the model. "
            "Said once per process.", free >> 20, need >> 20, opts.min_free_mib, dropped,
        )
    return False


_REGISTRATIONS = [0]  # bumped whenever any module (re)registers a parameter or buffer
_TENSORS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, list[torch.Tensor]]]" = weakref.WeakKeyDictionary()


def _bump(*_a: object) -> None:
    _REGISTRATIONS[0] += 1


_HOOKS = all(hasattr(torch.nn.modules.module, f"register_module_{w}_registration_hook") for w in ("parameter", "buffer"))
_HOOKED = [False]


def _hook_registrations() -> None:
    """Install the global registration hooks on the first fast-path call, not at import: importing
    the pack must not change how every module in the host process registers its weights. Caches
    are built after this point, so registrations before it need no count. Without the hooks
    (torch < 2.1) the tensor list is rebuilt at every call (slower, same result)."""
    if _HOOKS and not _HOOKED[0]:
        torch.nn.modules.module.register_module_parameter_registration_hook(_bump)
        torch.nn.modules.module.register_module_buffer_registration_hook(_bump)
        _HOOKED[0] = True


def _weights_key(net: torch.nn.Module) -> tuple:
    """Where the weights live now: a graph replays from these addresses, so any move or
    replacement of a weight (offload/reload, a patcher's setattr) must drop the graphs. The
    tensor list is cached per module and rebuilt after any parameter/buffer registration."""
    _hook_registrations()
    cached = _TENSORS.get(net)
    if cached is None or cached[0] != _REGISTRATIONS[0] or not _HOOKS:
        cached = (_REGISTRATIONS[0], [*net.parameters(), *net.buffers()])
        _TENSORS[net] = cached
    return (id(net), *[t.data_ptr() for t in cached[1]])


def _off_device(net: torch.nn.Module, dev: torch.device) -> bool:
    return any(t.device != dev for t in [*net.parameters(), *net.buffers()])


# ----------------------------------------------------------------------------------------------
# the body: runs the ControlNets from the entry's static buffers into its output views


def _body(entry: _Entry) -> None:
    cuda = entry.x.device.type == "cuda"
    main = torch.cuda.current_stream(entry.x.device) if cuda else None
    branches: list[tuple[int, torch.cuda.Stream]] = []
    for k, spec in enumerate(entry.specs):
        branch = entry.parallel and k > 0
        if branch:
            s = _branch_stream(entry.x.device, k)
            s.wait_stream(main)
            with torch.cuda.stream(s):
                rs = _control_outputs(entry, k)
                _ensure_outputs(entry, rs, part=k)
                _accumulate(entry, k, rs, entry.part_views[k], accumulate=False)
            branches.append((k, s))
        else:
            rs = _control_outputs(entry, k)
            _ensure_outputs(entry, rs)
            _accumulate(entry, k, rs, entry.out_views, accumulate=k > 0)
    for k, s in branches:
        main.wait_stream(s)
        entry.out_flat.add_(entry.part_flats[k])


def _control_outputs(entry: _Entry, k: int) -> list[torch.Tensor]:
    spec = entry.specs[k]
    net = spec.net
    x, t, ctx, y = entry.x, entry.t, entry.ctx, entry.y
    emb = tile_to_batch(entry.embs[k], entry.batch, entry.chunks)  # shape checked before the entry was made
    rows = entry.rows[k]
    if rows is not None:
        b = entry.batch
        x, t = x.index_select(0, rows), t.index_select(0, rows)
        emb = emb.index_select(0, rows) if emb.shape[0] == b else emb
        ctx = ctx.index_select(0, rows) if ctx.shape[0] == b else ctx
        y = None if y is None else (y.index_select(0, rows) if y.shape[0] == b else y)
    down, mid = net(x, None, t, ctx, y, hint_embedding=emb)
    rs = [*down, mid]
    if spec.global_pool:
        rs = [r.mean(dim=(2, 3), keepdim=True).expand_as(r) for r in rs]
    return rs


def _ensure_outputs(entry: _Entry, rs: list[torch.Tensor], part: int | None = None) -> None:
    """Allocate the flat output buffer (and a branch's own) from the first residuals seen."""
    if part is None and entry.out_flat is not None:
        return
    if part is not None and part in entry.part_flats:
        return
    layout, off = [], 0
    for r in rs:
        shape = (entry.batch, *r.shape[1:])
        layout.append((off, math.prod(shape), shape))
        off += math.prod(shape)
    flat = torch.empty(off, dtype=rs[0].dtype, device=rs[0].device)
    views = [flat[o:o + n].view(shape) for o, n, shape in layout]
    if part is None:
        entry.out_flat, entry.out_views, entry.layout = flat, views, layout
    else:
        entry.part_flats[part], entry.part_views[part] = flat, views


def _accumulate(entry: _Entry, k: int, rs: list[torch.Tensor], dst: list[torch.Tensor], accumulate: bool) -> None:
    scales = entry.scales[k]
    rows = entry.rows[k]
    for i, (r, d) in enumerate(zip(rs, dst)):
        s = scales[i]
        if rows is None:
            if accumulate:
                d.addcmul_(r, s)
            else:
                torch.mul(r, s, out=d)
        else:
            rs_ = r * s
            if accumulate:
                d.index_add_(0, rows, rs_)
            else:
                d.zero_()
                d.index_copy_(0, rows, rs_)
