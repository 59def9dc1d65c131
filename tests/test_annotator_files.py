"""The network annotators' infrastructure (preprocessors/nets/files.py, host.py, the registry's
weights handling): files found by name where users keep them, read safely with their quirks, built
once, and a sentence for every bad file. The expected values are hand-made (paths, tensors)."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from comfyui_controlnet_core import preprocessors as pp
from comfyui_controlnet_core.preprocessors import registry
from comfyui_controlnet_core.preprocessors.nets import files, host


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------
# find_weights


def test_find_weights_searches_subfolders_in_root_order_and_name_preference(tmp_path):
    a, b = tmp_path / "annotators", tmp_path / "aux_ckpts"
    _touch(b / "lllyasviel" / "Annotators" / "ControlNetHED.pth")
    assert files.find_weights(["ControlNetHED.pth"], source="x", roots=[a, b]) == (
        b / "lllyasviel" / "Annotators" / "ControlNetHED.pth")
    _touch(a / "hed" / "ControlNetHED.pth")  # an earlier root wins
    files._found.clear()
    assert files.find_weights(["ControlNetHED.pth"], source="x", roots=[a, b]) == a / "hed" / "ControlNetHED.pth"
    # the first accepted name wins over a later name, whatever root holds it
    _touch(a / "second.safetensors")
    _touch(b / "first.pth")
    assert files.find_weights(["first.pth", "second.safetensors"], source="x", roots=[a, b]) == b / "first.pth"


def test_find_weights_skips_hidden_half_downloads(tmp_path):
    root = tmp_path / "ckpts"
    _touch(root / "lllyasviel" / "Annotators" / ".cache" / "huggingface" / "download" / "scannet.pt")
    with pytest.raises(pp.PreprocessorError, match="scannet.pt was not found"):
        files.find_weights(["scannet.pt"], source="https://huggingface.co/lllyasviel/Annotators", roots=[root])


def test_missing_file_is_one_sentence_with_name_source_and_folder(tmp_path):
    roots = [tmp_path / "models" / "annotators", tmp_path / "ckpts"]
    with pytest.raises(pp.PreprocessorError) as e:
        files.find_weights(["depth_anything_v2_vitl.pth", "depth_anything_v2_vitl_fp32.safetensors"],
                           source="https://huggingface.co/depth-anything/Depth-Anything-V2-Large", roots=roots)
    text = str(e.value)
    assert "depth_anything_v2_vitl.pth or depth_anything_v2_vitl_fp32.safetensors was not found" in text
    assert "get it from https://huggingface.co/depth-anything/Depth-Anything-V2-Large" in text
    assert f"put it in {roots[0]}" in text and "nothing is downloaded" in text
    assert "\n" not in text


def test_aux_env_path_and_provider(tmp_path, monkeypatch):
    env_root = tmp_path / "aux_env"
    _touch(env_root / "yzd-v" / "DWPose" / "yolox_l.onnx")
    monkeypatch.setenv(files.AUX_ENV, str(env_root))
    own = tmp_path / "own"
    files.set_roots_provider(lambda: [own])
    try:
        assert files.search_roots() == [own, env_root]
        assert files.find_weights(["yolox_l.onnx"], source="x") == env_root / "yzd-v" / "DWPose" / "yolox_l.onnx"
    finally:
        files.set_roots_provider(None)


def test_aux_ckpts_roots_reads_aux_config(tmp_path):
    custom = tmp_path / "custom_nodes"
    aux = custom / "comfyui_controlnet_aux"
    (aux / "ckpts").mkdir(parents=True)
    (custom / "other_pack").mkdir()
    assert files.aux_ckpts_roots([custom, tmp_path / "absent"]) == [aux / "ckpts"]
    (aux / "config.yaml").write_text('annotator_ckpts_path: "../shared_ckpts"  # elsewhere\nUSE_SYMLINKS: False\n')
    assert files.aux_ckpts_roots([custom]) == [(aux / "../shared_ckpts").resolve(), aux / "ckpts"]


# ------------------------------------------------------------------------------------------
# read_state_dict / load_into


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def _sd(net: nn.Module) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("layout", ["plain", "state_dict_module", "model", "fp16", "safetensors"])
def test_read_state_dict_quirks(tmp_path, layout):
    torch.manual_seed(0)
    ref = _sd(Tiny())
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "plain":
        torch.save(ref, path)
    elif layout == "state_dict_module":  # PiDiNet: {'state_dict': {'module.*'}}
        torch.save({"state_dict": {"module." + k: v for k, v in ref.items()}}, path)
    elif layout == "model":  # NormalBAE scannet.pt: {'model': ...}
        torch.save({"model": ref}, path)
    elif layout == "fp16":  # HED: half storage
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in ref.items()}, path)
    else:
        from safetensors.torch import save_file

        save_file(ref, str(path))
    sd = files.read_state_dict(path)
    assert set(sd) == set(ref)
    for k, v in ref.items():
        assert sd[k].dtype == v.dtype or (v.is_floating_point() and sd[k].dtype == torch.float32)
        tol = 1e-3 if layout == "fp16" else 0.0
        assert torch.allclose(sd[k].float(), v.float(), atol=tol, rtol=tol), k
    net = Tiny()
    files.load_into(net, sd, path=path, what="tiny")


def test_truncated_and_unsafe_files_are_sentences(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(_sd(Tiny()), good)
    cut = tmp_path / "scannet.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(pp.PreprocessorError, match=r"scannet.pt: .*truncated or corrupt"):
        files.read_state_dict(cut)

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    torch.save({"w": torch.zeros(1), "x": Evil()}, bad)
    with pytest.raises(pp.PreprocessorError, match="refused"):
        files.read_state_dict(bad)
    empty = _touch(tmp_path / "empty.pth", b"")
    with pytest.raises(pp.PreprocessorError, match="empty"):
        files.read_state_dict(empty)


def test_load_into_names_another_annotators_file(tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 8, 1))
    with pytest.raises(pp.PreprocessorError) as e:
        files.load_into(Tiny(), _sd(other), path=tmp_path / "ControlNetHED.pth", what="HED")
    text = str(e.value)
    assert text.startswith("ControlNetHED.pth is not a HED weights file:")
    assert "weights are missing" in text and "do not belong" in text
    wrong = _sd(Tiny())
    wrong["conv.weight"] = torch.zeros(4, 3, 5, 5)
    with pytest.raises(pp.PreprocessorError, match=r"another shape .*'conv.weight': \(4, 3, 5, 5\) in the file"):
        files.load_into(Tiny(), wrong, path=tmp_path / "x.pth", what="tiny")


# ------------------------------------------------------------------------------------------
# registry: default files, the network cache, the host


BUILT: list[str] = []


def _load_tiny(path: Path) -> nn.Module:
    BUILT.append(path.name)
    net = Tiny()
    files.load_into(net, files.read_state_dict(path), path=path, what="tiny")
    return net


def _tiny_fn(frame: np.ndarray, model, **_):
    assert isinstance(model, host.Net)
    dev = model.device()
    with torch.inference_mode():
        x = torch.from_numpy(frame).permute(2, 0, 1)[None].to(dev)
        y = model.module(x)[0, 0]
    return torch.sigmoid(y).cpu().numpy()


@pytest.fixture
def tiny_method(tmp_path):
    BUILT.clear()
    names = ("tiny_a", "tiny_b")
    for name in names:
        pp.register(pp.Method(name, _tiny_fn, (), "test", load_weights=_load_tiny,
                              weights=pp.Weights(("tiny.pth", "tiny.safetensors"), "https://example.org/tiny"),
                              weights_doc="tiny.pth from https://example.org/tiny"))
    root = tmp_path / "annotators"
    files.set_roots_provider(lambda: [root])
    try:
        yield root
    finally:
        for name in names:
            registry.METHODS.pop(name, None)
        files.set_roots_provider(None)
        registry.clear_models()


def test_network_method_finds_its_file_builds_once_and_rebuilds_when_replaced(tiny_method):
    root = tiny_method
    image = np.random.default_rng(0).random((40, 56, 3), dtype=np.float32)
    with pytest.raises(pp.PreprocessorError, match=r"tiny.pth or tiny.safetensors was not found; .*example.org/tiny"):
        pp.run("tiny_a", image, resolution=40)
    torch.manual_seed(1)
    path = root / "sub" / "tiny.pth"
    path.parent.mkdir(parents=True)
    torch.save(_sd(Tiny()), path)
    assert pp.weights_file("tiny_a") == path
    a = pp.run("tiny_a", image, resolution=40)
    b = pp.run("tiny_b", image, resolution=40)  # same loader, same file: the same network
    assert BUILT == ["tiny.pth"]
    np.testing.assert_array_equal(a, b)
    torch.manual_seed(2)
    time.sleep(0.01)
    torch.save(_sd(Tiny()), path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    c = pp.run("tiny_a", image, resolution=40)
    assert BUILT == ["tiny.pth", "tiny.pth"] and not np.array_equal(a, c)
    assert len([k for k in registry._weights_cache if k[1] == str(path.resolve())]) == 1  # the stale one dropped


def test_batch_of_network_method_equals_frame_by_frame(tiny_method):
    torch.manual_seed(3)
    path = tiny_method / "tiny.pth"
    path.parent.mkdir(parents=True)
    torch.save(_sd(Tiny()), path)
    batch = np.random.default_rng(1).random((5, 32, 48, 3), dtype=np.float32)
    whole = pp.run("tiny_a", batch, resolution=32)
    for i in range(5):
        np.testing.assert_array_equal(whole[i], pp.run("tiny_a", batch[i], resolution=32)[0])


def test_host_is_injectable(tiny_method):
    torch.manual_seed(4)
    path = tiny_method / "tiny.pth"
    path.parent.mkdir(parents=True)
    torch.save(_sd(Tiny()), path)
    seen = []

    class Recording(host.CPUHost):
        def adopt(self, net):
            seen.append(("adopt", net.label))
            net.handle = "patcher"

        def device(self, net):
            seen.append(("device", net.handle))
            return torch.device("cpu")

    host.set_host(Recording())
    try:
        pp.run("tiny_a", np.zeros((2, 16, 16, 3), np.float32), resolution=16)
    finally:
        host.set_host(None)
    assert seen == [("adopt", "tiny_a (tiny.pth)"), ("device", "patcher"), ("device", "patcher")]


def test_wrong_file_under_expected_name(tiny_method):
    path = tiny_method / "tiny.pth"
    path.parent.mkdir(parents=True)
    torch.save(_sd(nn.Sequential(nn.Linear(2, 2))), path)
    with pytest.raises(pp.PreprocessorError, match=r"tiny.pth is not a tiny weights file"):
        pp.run("tiny_a", np.zeros((16, 16, 3), np.float32), resolution=16)


def test_listing_methods_imports_no_network_code():
    import subprocess
    import sys

    code = ("import sys; import comfyui_controlnet_core.preprocessors as pp; pp.list_methods(); "
            "[pp.method_inputs(m) for m in pp.list_methods()]; "
            "nets = [n for n in sys.modules if '.preprocessors.nets' in n]; assert not nets, nets")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
