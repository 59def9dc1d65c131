"""ONNX files without the `onnx` package: a protobuf reader for what a forward pass needs, and a
torch interpreter that runs the graph's nodes in order.

Why an interpreter and not a name mapping onto hand-written modules: the DWPose files
(`yolox_l.onnx`, `dw-ll_ucoco_384.onnx`) were exported with batch norm folded into the convs, and
such exports name their weights by node order (`onnx::Conv_123`), not by module path, so a mapping
would hang on one exporter's numbering. Running the graph itself needs only the ~40 standard
operators below and works for any export of the same networks. The weights become torch tensors
(buffers of `OnnxGraph`), so `.to(device, dtype)` moves the whole graph like any module.

Only what the files hold is read: no code runs, nothing is imported from the file. Tensors stored
outside the file (`data_location = EXTERNAL`) are refused with a sentence.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PreprocessorError

# ---------------------------------------------------------------------------------------------
# Protobuf wire format (https://protobuf.dev/programming-guides/encoding/)
# ---------------------------------------------------------------------------------------------

_I64 = 1 << 64


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 70:
            raise ValueError("malformed varint")


def _fields(buf: memoryview):
    """(field number, wire type, value) for each field of one message; value is an int for
    varint / fixed fields (fixed32/64 as raw little-endian ints) and a memoryview for bytes."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ValueError("field runs past the end of the message")
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield num, wire, value


def _signed(v: int) -> int:
    return v - _I64 if v >= 1 << 63 else v


def _packed_ints(wire: int, value) -> list[int]:
    if wire == 0:
        return [_signed(value)]
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(_signed(v))
    return out


def _packed_floats(wire: int, value) -> list[float]:
    if wire == 5:
        return [struct.unpack("<f", value.to_bytes(4, "little"))[0]]
    return list(np.frombuffer(value, dtype="<f4"))


# ONNX TensorProto.DataType -> numpy dtype
_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
           9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}
_TORCH_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32,
                 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def _tensor(buf: memoryview) -> tuple[str, np.ndarray]:
    dims: list[int] = []
    dtype, name, raw, external = 1, "", None, False
    floats: list[float] = []
    ints: list[int] = []
    doubles: list[float] = []
    for num, wire, v in _fields(buf):
        if num == 1:
            dims += _packed_ints(wire, v)
        elif num == 2:
            dtype = v
        elif num == 4:
            floats += _packed_floats(wire, v)
        elif num in (5, 7, 11):  # int32_data (also holds fp16/bool/int8 bits), int64_data, uint64_data
            ints += _packed_ints(wire, v)
        elif num == 8:
            name = bytes(v).decode("utf-8", "replace")
        elif num == 9:
            raw = v
        elif num == 10:
            doubles += list(np.frombuffer(v, "<f8")) if wire == 2 else [struct.unpack("<d", v.to_bytes(8, "little"))[0]]
        elif num == 14 and v == 1:
            external = True
    if external:
        raise ValueError(f"tensor {name!r} is stored in a separate file (external data)")
    if dtype == 16:  # bfloat16: widen through float32 bits
        bits = np.frombuffer(raw, "<u2") if raw is not None else np.asarray(ints, np.uint16)
        arr = (bits.astype(np.uint32) << 16).view(np.float32)
    elif dtype not in _DTYPES:
        raise ValueError(f"tensor {name!r} has unsupported data type {dtype}")
    elif raw is not None:
        arr = np.frombuffer(raw, np.dtype(_DTYPES[dtype]).newbyteorder("<")).astype(_DTYPES[dtype])
    elif dtype == 1:
        arr = np.asarray(floats, np.float32)
    elif dtype == 11:
        arr = np.asarray(doubles, np.float64)
    elif dtype == 10:
        arr = np.asarray(ints, np.uint16).view(np.float16)
    else:
        arr = np.asarray(ints).astype(_DTYPES[dtype])
    count = int(np.prod(dims)) if dims else 1
    if arr.size != count:
        raise ValueError(f"tensor {name!r} holds {arr.size} values for shape {dims}")
    return name, arr.reshape(dims)


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    name: str = ""
    domain: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OnnxModel:
    """What a forward needs from a ModelProto: nodes in file order, initializers, names."""

    nodes: list[Node]
    initializers: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]
    opset: int
    producer: str = ""


def _attribute(buf: memoryview) -> tuple[str, Any]:
    name, typ = "", 0
    f = i = s = t = None
    floats: list[float] = []
    ints: list[int] = []
    strings: list[bytes] = []
    for num, wire, v in _fields(buf):
        if num == 1:
            name = bytes(v).decode()
        elif num == 2:
            f = struct.unpack("<f", v.to_bytes(4, "little"))[0]
        elif num == 3:
            i = _signed(v)
        elif num == 4:
            s = bytes(v)
        elif num == 5:
            t = _tensor(v)[1]
        elif num == 6:
            raise ValueError(f"attribute {name!r} holds a subgraph (If/Loop), which this reader does not run")
        elif num == 7:
            floats += _packed_floats(wire, v)
        elif num == 8:
            ints += _packed_ints(wire, v)
        elif num == 9:
            strings.append(bytes(v))
        elif num == 20:
            typ = v
    # AttributeType: 1 FLOAT, 2 INT, 3 STRING, 4 TENSOR, 6 FLOATS, 7 INTS, 8 STRINGS
    by_type = {1: f, 2: i, 3: s, 4: t, 6: floats, 7: ints, 8: strings}
    if typ in by_type:
        return name, by_type[typ]
    for value in (f, i, s, t):  # very old files without `type`
        if value is not None:
            return name, value
    return name, ints or floats or strings


def _node(buf: memoryview) -> Node:
    n = Node("", [], [])
    for num, _, v in _fields(buf):
        if num == 1:
            n.inputs.append(bytes(v).decode())
        elif num == 2:
            n.outputs.append(bytes(v).decode())
        elif num == 3:
            n.name = bytes(v).decode("utf-8", "replace")
        elif num == 4:
            n.op = bytes(v).decode()
        elif num == 5:
            key, value = _attribute(v)
            n.attrs[key] = value
        elif num == 7:
            n.domain = bytes(v).decode()
    return n


def _value_name(buf: memoryview) -> str:
    for num, _, v in _fields(buf):
        if num == 1:
            return bytes(v).decode()
    return ""


def parse_model(data: bytes) -> OnnxModel:
    """Parse the bytes of an .onnx file (ModelProto). ValueError when it is not one."""
    buf = memoryview(data)
    graph, opset, producer = None, 0, ""
    for num, wire, v in _fields(buf):
        if num == 7 and wire == 2:
            graph = v
        elif num == 8 and wire == 2:
            domain, version = "", 0
            for n2, _, v2 in _fields(v):
                if n2 == 1:
                    domain = bytes(v2).decode()
                elif n2 == 2:
                    version = v2
            if domain in ("", "ai.onnx"):
                opset = version
        elif num == 2 and wire == 2:
            producer = bytes(v).decode("utf-8", "replace")
    if graph is None:
        raise ValueError("no graph in the file")
    nodes, inits, inputs, outputs = [], {}, [], []
    for num, _, v in _fields(graph):
        if num == 1:
            nodes.append(_node(v))
        elif num == 5:
            name, arr = _tensor(v)
            inits[name] = arr
        elif num == 11:
            inputs.append(_value_name(v))
        elif num == 12:
            outputs.append(_value_name(v))
    inputs = [i for i in inputs if i not in inits]  # old exports list the weights as inputs too
    if not nodes or not outputs:
        raise ValueError("the graph has no nodes or no outputs")
    return OnnxModel(nodes, inits, inputs, outputs, opset or 11, producer)


def load_onnx(path: Path | str) -> "OnnxGraph":
    """The graph in an .onnx file as a torch module; PreprocessorError naming the file if it is not
    a readable ONNX model or uses operators we do not run."""
    path = Path(path)
    try:
        model = parse_model(path.read_bytes())
    except (ValueError, IndexError, struct.error) as e:
        raise PreprocessorError(
            f"{path.name} is not a readable ONNX model ({e}); the file may be damaged or incomplete: "
            "fetch it again"
        ) from None
    return OnnxGraph(model, source=path.name)


# ---------------------------------------------------------------------------------------------
# The interpreter
# ---------------------------------------------------------------------------------------------


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _same(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX binary ops need equal element types; exporters insert Casts, but shape arithmetic on
    int64 sometimes meets a float constant: promote as torch would."""
    if a.dtype != b.dtype:
        dt = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dt), b.to(dt)
    return a, b


def _div(a, b):
    a, b = _same(a, b)
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _binary(fn):
    return lambda n, x, o: [fn(*_same(x[0], x[1]))]


def _unary(fn):
    return lambda n, x, o: [fn(x[0])]


def _pads(pads: list[int], rank: int) -> list[int]:
    """ONNX pads [b1, b2, .., e1, e2, ..] -> F.pad order (last axis first, begin/end pairs)."""
    out = []
    for i in reversed(range(rank)):
        out += [pads[i], pads[i + rank]]
    return out


def _spatial_padding(n: Node, x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int],
                     value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Apply auto_pad / asymmetric pads by hand; returns (input, symmetric padding for the op)."""
    rank = len(kernel)
    auto = n.attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(rank):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto == "SAME_UPPER" else big)
            pads_e.append(big if auto == "SAME_UPPER" else small)
        pads = pads_b + pads_e
    elif auto == "VALID":
        pads = [0] * (2 * rank)
    else:
        pads = list(n.attrs.get("pads", [0] * (2 * rank)))
    if pads[:rank] == pads[rank:]:
        return x, pads[:rank]
    return F.pad(x, _pads([0, 0] + pads[:rank] + [0, 0] + pads[rank:], rank + 2)[: 2 * rank], value=value), [0] * rank


def _conv(n: Node, x, o):
    inp, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    k = list(w.shape[2:])
    rank = len(k)
    strides = list(n.attrs.get("strides", [1] * rank))
    dil = list(n.attrs.get("dilations", [1] * rank))
    inp, pad = _spatial_padding(n, inp, k, strides, dil)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    return [conv(inp, w, b, strides, pad, dil, int(n.attrs.get("group", 1)))]


def _conv_transpose(n: Node, x, o):
    inp, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    rank = w.ndim - 2
    if "output_shape" in n.attrs or n.attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise NotImplementedError("ConvTranspose with output_shape / auto_pad")
    pads = list(n.attrs.get("pads", [0] * (2 * rank)))
    if pads[:rank] != pads[rank:]:
        raise NotImplementedError("ConvTranspose with asymmetric pads")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[rank]
    return [fn(inp, w, b, list(n.attrs.get("strides", [1] * rank)), pads[:rank],
               list(n.attrs.get("output_padding", [0] * rank)), int(n.attrs.get("group", 1)),
               list(n.attrs.get("dilations", [1] * rank)))]


def _pool(kind: str):
    def run(n: Node, x, o):
        inp = x[0]
        k = list(n.attrs["kernel_shape"])
        rank = len(k)
        strides = list(n.attrs.get("strides", [1] * rank))
        dil = list(n.attrs.get("dilations", [1] * rank))
        ceil = bool(n.attrs.get("ceil_mode", 0))
        if kind == "max":
            inp, pad = _spatial_padding(n, inp, k, strides, dil, value=-math.inf)
            if any(p > kk // 2 for p, kk in zip(pad, k)):  # torch limits padding to half the kernel
                inp = F.pad(inp, _pads([0, 0] + pad + [0, 0] + pad, rank + 2)[: 2 * rank], value=-math.inf)
                pad = [0] * rank
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[rank]
            return [fn(inp, k, strides, pad, dil, ceil_mode=ceil)]
        inp, pad = _spatial_padding(n, inp, k, strides, dil)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[rank]
        return [fn(inp, k, strides, pad, ceil_mode=ceil, count_include_pad=bool(n.attrs.get("count_include_pad", 0)))]
    return run


def _batchnorm(n: Node, x, o):
    inp, scale, bias, mean, var = x[:5]
    return [F.batch_norm(inp, mean, var, scale, bias, False, 0.0, float(n.attrs.get("epsilon", 1e-5)))]


def _gemm(n: Node, x, o):
    a, b = x[0], x[1]
    if n.attrs.get("transA", 0):
        a = a.t()
    if n.attrs.get("transB", 0):
        b = b.t()
    y = float(n.attrs.get("alpha", 1.0)) * (a @ b)
    if len(x) > 2 and x[2] is not None:
        y = y + float(n.attrs.get("beta", 1.0)) * x[2]
    return [y]


def _reshape(n: Node, x, o):
    data, shape = x[0], _ints(x[1])
    if not n.attrs.get("allowzero", 0):
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [data.reshape(shape)]


def _flatten(n: Node, x, o):
    a = _axis(int(n.attrs.get("axis", 1)), x[0].ndim)
    return [x[0].reshape(int(np.prod(x[0].shape[:a])), -1)]


def _transpose(n: Node, x, o):
    perm = n.attrs.get("perm") or list(reversed(range(x[0].ndim)))
    return [x[0].permute(*perm)]


def _concat(n: Node, x, o):
    parts = [t for t in x if t is not None and t.numel() > 0] or [x[0]]
    dt = parts[0].dtype
    return [torch.cat([t.to(dt) for t in parts], int(n.attrs["axis"]))]


def _split(n: Node, x, o):
    axis = int(n.attrs.get("axis", 0))
    if len(x) > 1 and x[1] is not None:
        sizes = _ints(x[1])
    elif "split" in n.attrs:
        sizes = list(n.attrs["split"])
    else:
        count = len(n.outputs)
        dim = x[0].shape[axis]
        step = -(-dim // count)
        sizes = [min(step, dim - i * step) for i in range(count)]
    return list(torch.split(x[0], sizes, axis))


def _slice(n: Node, x, o):
    data = x[0]
    if o < 10:
        starts, ends = list(n.attrs["starts"]), list(n.attrs["ends"])
        axes = list(n.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.ndim
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, data.ndim)
        dim = data.shape[a]
        if st > 0:
            index[a] = slice(s, e, st)
        else:  # negative step: slice the mirrored axis (torch slicing has no negative steps)
            s = dim - 1 if s >= dim else (s + dim if s < 0 else s)
            e = -1 if e < -dim else (e + dim if e < 0 else min(e, dim - 1))
            index[a] = slice(dim - 1 - s, dim - 1 - e, -st)
            flips.append(a)
    if flips:
        data = data.flip(flips)
    return [data[tuple(index)]]


def _axes_of(n: Node, x, o, since: int) -> list[int] | None:
    if o >= since:
        return _ints(x[1]) if len(x) > 1 and x[1] is not None else None
    return list(n.attrs["axes"]) if "axes" in n.attrs else None


def _squeeze(n: Node, x, o):
    axes = _axes_of(n, x, o, 13)
    if axes is None:
        return [x[0].squeeze()]
    axes = sorted(_axis(a, x[0].ndim) for a in axes)
    out = x[0]
    for a in reversed(axes):
        out = out.squeeze(a)
    return [out]


def _unsqueeze(n: Node, x, o):
    axes = _axes_of(n, x, o, 13)
    rank = x[0].ndim + len(axes)
    out = x[0]
    for a in sorted(_axis(a, rank) for a in axes):
        out = out.unsqueeze(a)
    return [out]


def _reduce(fn: Callable, since: int = 18):
    def run(n: Node, x, o):
        axes = _axes_of(n, x, o, since)
        keep = bool(n.attrs.get("keepdims", 1))
        if axes is None or len(axes) == 0:
            if n.attrs.get("noop_with_empty_axes", 0):
                return [x[0]]
            axes = list(range(x[0].ndim))
        return [fn(x[0], [_axis(a, x[0].ndim) for a in axes], keep)]
    return run


def _gather(n: Node, x, o):
    data, idx = x[0], x[1].long()
    a = _axis(int(n.attrs.get("axis", 0)), data.ndim)
    idx = torch.where(idx < 0, idx + data.shape[a], idx)
    out = data.index_select(a, idx.reshape(-1).to(data.device))
    return [out.reshape(data.shape[:a] + idx.shape + data.shape[a + 1 :])]


def _softmax(fn):
    def run(n: Node, x, o):
        inp = x[0]
        if o >= 13:
            return [fn(inp, dim=int(n.attrs.get("axis", -1)))]
        a = _axis(int(n.attrs.get("axis", 1)), inp.ndim)  # old semantics: flatten to 2-D at axis
        flat = inp.reshape(int(np.prod(inp.shape[:a])), -1)
        return [fn(flat, dim=1).reshape(inp.shape)]
    return run


def _clip(n: Node, x, o):
    if o < 11:
        lo, hi = n.attrs.get("min"), n.attrs.get("max")
    else:
        lo = x[1] if len(x) > 1 and x[1] is not None and x[1].numel() else None
        hi = x[2] if len(x) > 2 and x[2] is not None and x[2].numel() else None
        lo = None if lo is None else lo.item()
        hi = None if hi is None else hi.item()
    return [torch.clamp(x[0], lo, hi)]


def _resize(n: Node, x, o):
    inp = x[0]
    rank = inp.ndim
    mode = n.attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    coord = n.attrs.get("coordinate_transformation_mode", b"half_pixel")
    coord = coord.decode() if isinstance(coord, bytes) else coord
    if n.op == "Upsample" or o < 11:  # Upsample / Resize-10: (X, scales), asymmetric
        scales = _ints_f(x[1] if len(x) > 1 else n.attrs["scales"])
        coord = "asymmetric"
        sizes = [int(math.floor(d * s)) for d, s in zip(inp.shape, scales)]
    else:
        scales_t = x[2] if len(x) > 2 and x[2] is not None and x[2].numel() else None
        sizes_t = x[3] if len(x) > 3 and x[3] is not None and x[3].numel() else None
        if sizes_t is not None:
            sizes = _ints(sizes_t)
        else:
            scales = _ints_f(scales_t)
            sizes = [int(math.floor(d * s)) for d, s in zip(inp.shape, scales)]
    if list(sizes[:2]) != list(inp.shape[:2]):
        raise NotImplementedError("Resize of the batch or channel axis")
    size = sizes[2:]
    if mode == "nearest":
        nearest = n.attrs.get("nearest_mode", b"round_prefer_floor")
        nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
        if coord == "asymmetric" and (nearest == "floor" or o < 11):
            return [F.interpolate(inp, size=size, mode="nearest")]
        if coord in ("half_pixel", "pytorch_half_pixel") and nearest in ("round_prefer_ceil", "round_prefer_floor"):
            return [F.interpolate(inp, size=size, mode="nearest-exact")]
        raise NotImplementedError(f"Resize nearest with {coord}/{nearest}")
    if mode == "linear":
        torch_mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[rank]
        if coord == "align_corners":
            return [F.interpolate(inp, size=size, mode=torch_mode, align_corners=True)]
        if coord in ("half_pixel", "pytorch_half_pixel"):
            return [F.interpolate(inp, size=size, mode=torch_mode, align_corners=False)]
        raise NotImplementedError(f"Resize linear with {coord}")
    raise NotImplementedError(f"Resize mode {mode}")


def _ints_f(t) -> list[float]:
    return [float(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _range(n: Node, x, o):
    start, limit, delta = (v.item() for v in x[:3])
    return [torch.arange(start, limit, delta, dtype=x[0].dtype, device=x[0].device)]


def _constant_of_shape(n: Node, x, o):
    value = n.attrs.get("value")
    fill = torch.as_tensor(np.asarray(value).reshape(-1)[0] if value is not None else np.float32(0))
    return [torch.full(_ints(x[0]), fill.item(), dtype=fill.dtype, device=x[0].device)]


def _pad(n: Node, x, o):
    mode = n.attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if o < 11:
        pads, value = list(n.attrs["pads"]), float(n.attrs.get("value", 0.0))
    else:
        pads = _ints(x[1])
        value = x[2].item() if len(x) > 2 and x[2] is not None and x[2].numel() else 0.0
    if len(x) > 3 and x[3] is not None:
        raise NotImplementedError("Pad with axes")
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[mode]
    p = _pads(pads, x[0].ndim)
    if torch_mode != "constant":  # torch pads only the spatial axes in these modes
        p = p[: 2 * (x[0].ndim - 2)]
        return [F.pad(x[0], p, mode=torch_mode)]
    return [F.pad(x[0], p, value=value)]


def _cast(n: Node, x, o):
    to = int(n.attrs["to"])
    if to not in _TORCH_DTYPES:
        raise NotImplementedError(f"Cast to ONNX type {to}")
    return [x[0].to(_TORCH_DTYPES[to])]


def _hard_sigmoid(n: Node, x, o):
    alpha, beta = float(n.attrs.get("alpha", 0.2)), float(n.attrs.get("beta", 0.5))
    return [torch.clamp(alpha * x[0] + beta, 0.0, 1.0)]


def _variadic(fn):
    def run(n: Node, x, o):
        out = x[0]
        for t in x[1:]:
            out = fn(*_same(out, t))
        return [out]
    return run


def _topk(n: Node, x, o):
    k = _ints(x[1])[0] if o >= 10 else int(n.attrs["k"])
    v, i = torch.topk(x[0], k, dim=int(n.attrs.get("axis", -1)), largest=bool(n.attrs.get("largest", 1)),
                      sorted=bool(n.attrs.get("sorted", 1)))
    return [v, i]


def _argmax(n: Node, x, o):
    keep = bool(n.attrs.get("keepdims", 1))
    return [torch.argmax(x[0], dim=int(n.attrs.get("axis", 0)), keepdim=keep)]


OPS: dict[str, Callable[[Node, list, int], list]] = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": lambda n, x, o: [_div(x[0], x[1])],
    "Pow": lambda n, x, o: [torch.pow(x[0], x[1].to(x[0].dtype) if x[0].is_floating_point() else x[1])],
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt),
    "LessOrEqual": _binary(torch.le), "GreaterOrEqual": _binary(torch.ge), "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or), "Not": _unary(torch.logical_not),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal), "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil), "Erf": _unary(torch.erf), "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid), "Relu": _unary(F.relu), "Softplus": _unary(F.softplus),
    "HardSwish": _unary(F.hardswish), "HardSigmoid": _hard_sigmoid,
    "LeakyRelu": lambda n, x, o: [F.leaky_relu(x[0], float(n.attrs.get("alpha", 0.01)))],
    "Elu": lambda n, x, o: [F.elu(x[0], float(n.attrs.get("alpha", 1.0)))],
    "Identity": lambda n, x, o: [x[0]], "Dropout": lambda n, x, o: [x[0]],
    "Where": lambda n, x, o: [torch.where(x[0].bool(), *_same(x[1], x[2]))],
    "Cast": _cast, "Clip": _clip,
    "Conv": _conv, "ConvTranspose": _conv_transpose, "BatchNormalization": _batchnorm,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda n, x, o: [x[0].mean(dim=tuple(range(2, x[0].ndim)), keepdim=True)],
    "GlobalMaxPool": lambda n, x, o: [x[0].amax(dim=tuple(range(2, x[0].ndim)), keepdim=True)],
    "Gemm": _gemm, "MatMul": lambda n, x, o: [torch.matmul(x[0], x[1])],
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose, "Concat": _concat, "Split": _split,
    "Slice": _slice, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Gather": _gather,
    "Shape": lambda n, x, o: [torch.tensor(x[0].shape, dtype=torch.int64, device=x[0].device)],
    "Size": lambda n, x, o: [torch.tensor(x[0].numel(), dtype=torch.int64, device=x[0].device)],
    "Expand": lambda n, x, o: [x[0].expand(torch.broadcast_shapes(tuple(x[0].shape), tuple(_ints(x[1]))))],
    "Tile": lambda n, x, o: [x[0].repeat(*_ints(x[1]))],
    "ConstantOfShape": _constant_of_shape, "Range": _range, "Pad": _pad,
    "Resize": _resize, "Upsample": _resize, "TopK": _topk, "ArgMax": _argmax,
    "ReduceMean": _reduce(lambda t, a, k: t.mean(dim=a, keepdim=k)),
    "ReduceSum": _reduce(lambda t, a, k: t.sum(dim=a, keepdim=k), since=13),
    "ReduceMax": _reduce(lambda t, a, k: t.amax(dim=a, keepdim=k)),
    "ReduceMin": _reduce(lambda t, a, k: t.amin(dim=a, keepdim=k)),
    "ReduceL2": _reduce(lambda t, a, k: torch.sqrt((t * t).sum(dim=a, keepdim=k))),
    "ReduceSumSquare": _reduce(lambda t, a, k: (t * t).sum(dim=a, keepdim=k)),
}


class OnnxGraph(torch.nn.Module):
    """An ONNX graph as a torch module: `forward(*inputs) -> tuple of outputs` (graph order).

    Initializers and Constant nodes are parameters / buffers (`.to(device)` / `.half()` move them); the nodes
    run in file order, which ONNX requires to be topological. Values are dropped after their last
    use, so peak memory is that of the live activations, not of every intermediate."""

    def __init__(self, model: OnnxModel, source: str = "the ONNX file"):
        super().__init__()
        self.source = source
        self.opset = model.opset
        self.input_names = list(model.inputs)
        self.output_names = list(model.outputs)
        unknown = sorted({n.op for n in model.nodes if n.op not in OPS and n.op != "Constant"}
                         | {f"{n.domain}.{n.op}" for n in model.nodes if n.domain not in ("", "ai.onnx")})
        if unknown:
            raise PreprocessorError(
                f"{source} uses ONNX operators this pack does not run: {', '.join(unknown)}; use the standard "
                "export of the model (for DWPose: yolox_l.onnx and dw-ll_ucoco_384.onnx)"
            )
        self._slot: dict[str, str] = {}
        for i, (name, arr) in enumerate(model.initializers.items()):
            self._register(f"w{i}", name, arr)
        self.nodes: list[Node] = []
        for j, node in enumerate(model.nodes):
            if node.op == "Constant":
                value = next(iter(node.attrs.values()))
                if isinstance(value, list) and all(isinstance(v, float) for v in value):
                    value = np.asarray(value, np.float32)
                elif isinstance(value, list):
                    value = np.asarray(value, np.int64)
                elif isinstance(value, float):
                    value = np.float32(value)
                elif isinstance(value, int):
                    value = np.int64(value)
                self._register(f"k{j}", node.outputs[0], np.asarray(value))
            else:
                self.nodes.append(node)
        # last node index that reads each value, to free intermediates early
        self._last_use: dict[str, int] = {}
        for j, node in enumerate(self.nodes):
            for name in node.inputs:
                self._last_use[name] = j
        for name in self.output_names:
            self._last_use[name] = len(self.nodes)

    def _register(self, attr: str, name: str, arr: np.ndarray) -> None:
        # Float weights as (frozen) parameters, the rest as buffers: ComfyUI's ModelPatcher counts a
        # module's size from its state dict and moves parameters when it loads a model in parts.
        t = torch.from_numpy(np.array(arr, copy=True))
        if t.is_floating_point():
            self.register_parameter(attr, torch.nn.Parameter(t, requires_grad=False))
        else:
            self.register_buffer(attr, t)
        self._slot[name] = attr

    @property
    def float_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise PreprocessorError(f"{self.source} takes {len(self.input_names)} input(s); got {len(inputs)}")
        env: dict[str, torch.Tensor] = dict(zip(self.input_names, inputs))
        for name, attr in self._slot.items():
            env.setdefault(name, getattr(self, attr))
        for j, node in enumerate(self.nodes):
            args = [env[name] if name else None for name in node.inputs]
            try:
                outs = OPS[node.op](node, args, self.opset)
            except NotImplementedError as e:
                raise PreprocessorError(
                    f"{self.source}: node {node.name or node.op} needs an ONNX feature this pack does not run ({e})"
                ) from None
            except RuntimeError as e:
                raise PreprocessorError(f"{self.source}: node {node.name or node.op} ({node.op}) failed: {e}") from None
            for name, value in zip(node.outputs, outs):
                if name:
                    env[name] = value
            for name in node.inputs:
                if name and self._last_use.get(name) == j and name not in self._slot:
                    env.pop(name, None)
        return tuple(env[name] for name in self.output_names)
