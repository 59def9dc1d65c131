"""Our ONNX reader + torch interpreter (preprocessors/nets/onnx_graph.py) against onnxruntime on
random-weight exports of the two DWPose networks (tests/helpers_pose.py: YOLOX-L and RTMPose-L
topology, real module paths, narrower channels so the suite stays fast), at the opset the real
files use (11) and a current one (17). fp32 bound: relative error <= 1e-4 of the output's range."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

import helpers_pose as H
from comfyui_controlnet_core.preprocessors import PreprocessorError
from comfyui_controlnet_core.preprocessors.nets.onnx_graph import OPS, load_onnx, parse_model

ort = pytest.importorskip("onnxruntime")  # a test extra; installed by scripts/test.sh


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def yolox_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pose") / "yolox_l.onnx"
    x = torch.rand(1, 3, 640, 640) * 255
    H.export_onnx(H.randomize(H.YOLOX(0.33, 0.25), seed=1), x, path, "images", ["output"], opset=11)
    return path


@pytest.fixture(scope="module")
def rtm_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pose") / "dw-ll_ucoco_384.onnx"
    x = torch.randn(1, 3, 384, 288)
    H.export_onnx(H.randomize(H.RTMPose(0.25, 0.33), seed=2), x, path, "input", ["simcc_x", "simcc_y"], opset=11)
    return path


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_yolox_graph_matches_onnxruntime(yolox_file):
    g = load_onnx(yolox_file)
    ops = {n.op for n in g.nodes}
    assert {"Conv", "Sigmoid", "Mul", "Concat", "Slice", "MaxPool", "Resize", "Reshape", "Transpose"} <= ops
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, 640, 640)).astype(np.float32)
    ref = _session(yolox_file).run(None, {"images": x})[0]
    (ours,) = g(torch.from_numpy(x))
    assert ours.shape == ref.shape == (1, 8400, 85)
    assert ref[..., 5:].std() > 0.05  # the class scores move: not a saturated net
    assert _rel(ours, ref) <= 1e-4


@pytest.mark.parametrize("batch", [1, 3])
def test_rtmpose_graph_matches_onnxruntime(rtm_file, batch):
    g = load_onnx(rtm_file)
    assert {"ReduceL2", "HardSigmoid", "GlobalAveragePool", "MatMul", "Split"} <= {n.op for n in g.nodes}
    x = np.random.default_rng(batch).standard_normal((batch, 3, 384, 288)).astype(np.float32)
    ref = _session(rtm_file).run(None, {"input": x})
    ours = g(torch.from_numpy(x))
    for a, b, width in zip(ours, ref, (576, 768)):
        assert a.shape == b.shape == (batch, 133, width)
        assert _rel(a, b) <= 1e-4
        assert (a.numpy().argmax(-1) == b.argmax(-1)).mean() > 0.99  # the decoded keypoints


@pytest.mark.parametrize("opset", [13, 17])
def test_newer_opsets_run_too(tmp_path, opset):
    # Split/Squeeze/Unsqueeze/Slice take their axes as inputs from opset 13, reductions from 18
    path = tmp_path / "rtm.onnx"
    x = torch.randn(2, 3, 384, 288)
    H.export_onnx(H.randomize(H.RTMPose(0.25, 0.33), seed=3), x, path, "input", ["simcc_x", "simcc_y"], opset=opset)
    ref = _session(path).run(None, {"input": x.numpy()})
    for a, b in zip(load_onnx(path)(x), ref):
        assert _rel(a, b) <= 1e-4


def test_reader_sees_the_graph_as_onnx_does(rtm_file):
    onnx = pytest.importorskip("onnx")
    ref = onnx.load(str(rtm_file))
    ours = parse_model(rtm_file.read_bytes())
    assert [n.op_type for n in ref.graph.node] == [n.op for n in ours.nodes]
    assert [n.name for n in ref.graph.node] == [n.name for n in ours.nodes]
    assert "/head/gau/uv/MatMul" in {n.name for n in ours.nodes}  # the real module paths
    assert set(ours.initializers) == {t.name for t in ref.graph.initializer}
    for t in ref.graph.initializer:
        np.testing.assert_array_equal(ours.initializers[t.name], onnx.numpy_helper.to_array(t))
    assert ours.opset == 11 and ours.inputs == ["input"] and ours.outputs == ["simcc_x", "simcc_y"]


def test_graph_moves_with_to(rtm_file):
    g = load_onnx(rtm_file).to(torch.float64)
    x = torch.randn(1, 3, 384, 288, dtype=torch.float64)
    out = g(x)
    assert out[0].dtype == torch.float64
    ref = load_onnx(rtm_file)(x.float())
    assert _rel(out[0].float(), ref[0]) <= 1e-4


def test_bad_files_are_a_sentence(tmp_path, rtm_file):
    junk = tmp_path / "dw-ll_ucoco_384.onnx"
    junk.write_bytes(b"\x00\x01 not a model" * 100)
    with pytest.raises(PreprocessorError, match="dw-ll_ucoco_384.onnx is not a readable ONNX model"):
        load_onnx(junk)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(rtm_file.read_bytes()[: 200_000])  # an interrupted download
    with pytest.raises(PreprocessorError, match="damaged or incomplete"):
        load_onnx(cut)


def test_unknown_operator_is_named(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("NonMaxSuppression", ["b", "s"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4, 4]),
                                           helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 3])])
    path = tmp_path / "yolo_nas_l_fp16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), str(path))
    assert "NonMaxSuppression" not in OPS
    with pytest.raises(PreprocessorError, match="NonMaxSuppression"):
        load_onnx(path)


def test_weights_are_in_the_state_dict(rtm_file):
    # ComfyUI's model management sizes a model by its state dict and moves its parameters
    g = load_onnx(rtm_file)
    inits = parse_model(rtm_file.read_bytes()).initializers
    size = sum(t.numel() * t.element_size() for t in g.state_dict().values())
    assert size >= sum(a.nbytes for a in inits.values()) > 1e6
    assert all(not p.requires_grad for p in g.parameters()) and len(list(g.parameters())) > 50
