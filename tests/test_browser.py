"""The pack in the real ComfyUI front end, in headless Chromium (the optional COMFYUI_PATH suite).

Needs COMFYUI_PATH (a ComfyUI checkout), COMFYUI_PYTHON (its interpreter), a Chromium binary
(CHROMIUM, default Debian's /usr/lib/chromium/chromium) and Playwright for Python in PLAYWRIGHT_PYTHON
(default COMFYUI_PYTHON); `playwright install` is never needed. Screenshots go to CNCORE_SCREENSHOTS
(default: a temporary folder, printed). Start it under `flock /tmp/comfyui.lock` on a shared machine.

A ComfyUI server starts on a temporary base directory with the pack linked in, tiny random ControlNets
under the workflows' file names and the workflows' input image. tests/browser_driver.py then drops
each workflow file on the canvas and reports what the page showed; this module checks it:
no missing-node dialog, every node type registered, no console error naming the pack; the node
rectangles on screen (title bars included) do not intersect and lie inside the canvas at the saved
view, at a zoom where the canvas draws text; the Preprocessor shows exactly the widgets of the
chosen method (the server's `preprocessors.method_inputs`) for every method; pressing "Preview
hint" shows an image of the input's size inside the node; the loader shows the file's family, base
model and layout; the template browser finds a thumbnail for every workflow (no 404).

Before that, every workflow is opened as a new user does, with its model files not downloaded yet:
the front end shows its Missing Models warning naming them, the loaders say "file not found in
models/controlnet" in their normal colour, the nodes keep their sizes and do not overlap, and nothing
in the console comes from us.

The suite runs once per front end: the one ComfyUI pins (whatever COMFYUI_PYTHON has installed, 1.27.10
for v0.3.64) and, when CNCORE_NEW_FRONTEND_ROOT names the `static` folder of a newer
`comfyui-frontend-package` (served with ComfyUI's --front-end-root), that one in both renderers:
the classic canvas and "Nodes 2.0" (setting Comfy.VueNodes.Enabled). Deprecation warnings are made to
repeat on every occurrence and are ours when our web/ files are in their call stack.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import unquote

import pytest

import test_workflows as tw
from comfyui_controlnet_core import preprocessors as pp
from comfyui_controlnet_core.controlnet_core.loader import save_controlnet
from helpers_models import make_tiny_config, random_controlnet
from helpers_comfyui import COMFYUI_PATH, COMFYUI_PYTHON, ROOT, serve

CHROMIUM = os.environ.get("CHROMIUM") or next(
    (p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "")
     if p and os.path.exists(p)), "/usr/lib/chromium/chromium")
PLAYWRIGHT_PYTHON = os.environ.get("PLAYWRIGHT_PYTHON", COMFYUI_PYTHON)
NEW_FRONT_END = os.environ.get("CNCORE_NEW_FRONTEND_ROOT", "")  # <target>/comfyui_frontend_package/static
MODULE = "comfyui-controlnet-core"  # the pack's folder name in custom_nodes/ (the template browser's category)
OUR_SCRIPTS = f"/extensions/{MODULE}/"  # where the front end serves web/ from
OUR_ROUTES = "/cncore/"  # nodes/routes.py (a non-2xx answer is logged by the browser with its URL)
# Console lines of the front end itself that mention words we look for; filtered by name. (None today:
# the newer front end's errors about /api/jobs, which ComfyUI 0.3.64 lacks, name neither us nor web/.)
FRONT_END_NOISE = ("/api/jobs", "[Jobs API]")
EXTRA_WIDGETS = {"Preview hint", "auto preview", "cncore_preview"}
INPUT_SIZE = (384, 288)  # the workflows' input image, example.png (width, height)


def write_example_image(path: Path) -> None:
    """A small drawn scene (sky, hills, a cabin, a lake) with clear edges for the previews and thumbnails."""
    from PIL import Image, ImageDraw

    w, h = INPUT_SIZE
    im = Image.new("RGB", (w, h), (120, 170, 220))
    d = ImageDraw.Draw(im)
    d.ellipse([290, 30, 340, 80], fill=(250, 220, 90))
    d.polygon([(0, 170), (110, 80), (220, 170)], fill=(90, 120, 90))
    d.polygon([(150, 170), (260, 95), (384, 170)], fill=(70, 105, 80))
    d.rectangle([0, 170, w, 210], fill=(110, 150, 80))
    d.rectangle([0, 210, w, h], fill=(60, 110, 170))
    d.rectangle([120, 120, 220, 190], fill=(140, 90, 50))
    d.polygon([(110, 122), (170, 85), (230, 122)], fill=(110, 50, 40))
    d.rectangle([160, 150, 182, 190], fill=(60, 40, 30))
    d.rectangle([132, 135, 150, 152], fill=(240, 220, 150))
    d.line([(20, 240), (360, 250)], fill=(200, 220, 240), width=2)
    im.save(path)

# The file name every Load ControlNet of the shipped workflows asks for -> (its family, what the loader
# must show for it). The browser test writes a small random file of that family in the family's real
# key layout under that name (with the family tests' builders), so the label is read from a real header.
MODEL_FILES = {
    "control_v11p_sd15_canny_fp16.safetensors": ("controlnet", "ControlNet · SD1.x · original"),
    "control_v11f1e_sd15_tile_fp16.safetensors": ("controlnet", "ControlNet · SD1.x · original"),
    "t2iadapter_canny_sd15v2.pth": ("t2i-adapter", "T2I-Adapter · SD1.x · tencentarc"),
    "control_lora_rank128_v11p_sd15_canny_fp16.safetensors": ("control-lora", "Control-LoRA (Stability AI) · SD1.x"),
    "controllllite_v01032064e_sdxl_canny.safetensors": ("lllite", "ControlNet-LLLite · SDXL"),
    "controlnet-union-sdxl-1.0-promax.safetensors": (
        "union", "ControlNet Union / ProMax (xinsir) · SDXL · diffusers"),
    "ControlAny-SDXL/anime_canny/controlnet.safetensors": ("controlnext", "ControlNeXt · SDXL · SDXL / SD1.5-v2 module"),
    "control_v11f1p_sd15_depth_fp16.safetensors": ("controlnet", "ControlNet · SD1.x · original"),
    "FLUX.1-dev-ControlNet-Union-Pro.safetensors": ("flux", "Flux ControlNet · Flux.1 · diffusers · latent hint"),
    "control_v11p_sd15_openpose_fp16.safetensors": ("controlnet", "ControlNet · SD1.x · original"),
}
# The network annotators' files the workflows' Preprocessors name (method, depth_model) -> a random
# file of the real layout (preprocessors/nets) in models/annotators, so their preview shows a hint.
ANNOTATOR_FILES = {("depth_anything_v2", "v2_vitb"): "depth_anything_v2_vitb.pth"}


def loader_files() -> set[str]:
    return {n["inputs"]["control_net_name"] for p in tw.UI_FILES for n in tw.load_pair(p)[1].values()
            if n["class_type"] == "CNCore_LoadControlNet"}


def write_model_file(name: str, path: Path) -> None:
    """A tiny random model of `name`'s family (MODEL_FILES), in that family's file layout."""
    import safetensors.torch
    import torch

    family = MODEL_FILES[name][0]
    if family == "controlnet":  # lllyasviel's v1.1 single file
        save_controlnet(random_controlnet(make_tiny_config("sd15")), path)
    elif family == "t2i-adapter":  # TencentARC's .pth of a full 1-channel (canny/sketch) SD1.x adapter
        from test_t2i_adapter import diffusers_adapter, to_tencentarc

        torch.save(to_tencentarc(diffusers_adapter("full_adapter", 1, [32, 64, 64, 64], 2, 8).state_dict(), False),
                   path)
    elif family == "control-lora":  # Stability's layout: .up/.down pairs, whole tensors, lora_controlnet
        import helpers_control_lora as clora

        cfg = make_tiny_config("sd15")
        clora.save(clora.make_file_sd(cfg, random_controlnet(cfg).state_dict(), rank=4, seed=1), path)
    elif family == "lllite":  # kohya's lllite_unet_* modules (always SDXL)
        from test_lllite import lllite_state_dict

        safetensors.torch.save_file(lllite_state_dict(), str(path))
    elif family == "controlnext":  # the authors' module layout (52 tensors), full size: 14 MB
        from test_controlnext import ref_module, save_module

        save_module(ref_module("stem", 320, seed=1), path)
    elif family == "union":  # xinsir's ProMax file: diffusers' ControlNetUnionModel weights, 8 types
        from test_union import random_union

        folder = path.with_suffix(".folder")
        random_union(8, seed=1).save_pretrained(folder)
        shutil.move(folder / "diffusion_pytorch_model.safetensors", path)
        shutil.rmtree(folder)
    elif family == "flux":  # diffusers' FluxControlNetModel weights (InstantX / Shakker layout), 10 modes
        from helpers_flux import diffusers_controlnet, save_state_dict

        save_state_dict(diffusers_controlnet(1, 1, modes=10, seed=1).state_dict(), path)
    else:
        raise AssertionError(f"no builder for family {family!r}")


LEGACY_OF = "ControlNet - Canny and Tile Combined (SD1.5)"  # dropped a second time as 0.1.0 saved it (Apply and Combine grew since)


def write_legacy_workflow(folder: Path) -> Path:
    """LEGACY_OF as the 0.1.0 nodes saved it: widget values only for the inputs released then
    (test_nodes.RELEASED_INPUTS; the front end stores them by position, later ones are appended)."""
    from test_nodes import RELEASED_INPUTS

    ui = json.loads((tw.WORKFLOWS / f"{LEGACY_OF}.json").read_text())
    specs, cut = tw.all_specs(), 0
    for node in ui["nodes"]:
        if node["type"] in RELEASED_INPUTS:
            released = set(sum(RELEASED_INPUTS[node["type"]], []))
            names = tw.ui_widget_names(specs[node["type"]])
            keep = next((i for i, n in enumerate(names) if n not in released), len(names))
            cut += len(node["widgets_values"]) - keep
            node["widgets_values"] = node["widgets_values"][:keep]
    assert cut, f"{LEGACY_OF} has no widget appended after 0.1.0: pick another workflow"
    path = folder / f"{LEGACY_OF} (saved by 0.1.0).json"
    path.write_text(json.dumps(ui))
    return path


pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set (a ComfyUI checkout to test in)"),
]


NEEDS_NEW = pytest.mark.skipif(not NEW_FRONT_END, reason="CNCORE_NEW_FRONTEND_ROOT is not set (a newer front "
                                                          "end's static folder)")
FRONT_ENDS = [
    pytest.param({"name": "pinned", "root": None, "vue": False}, id="pinned"),
    pytest.param({"name": "new-litegraph", "root": NEW_FRONT_END, "vue": False}, id="new-litegraph", marks=NEEDS_NEW),
    pytest.param({"name": "new-vue", "root": NEW_FRONT_END, "vue": True}, id="new-vue", marks=NEEDS_NEW),
]


@pytest.fixture(scope="module", params=FRONT_ENDS)
def page_report(request, tmp_path_factory):
    front_end = request.param
    assert os.path.exists(CHROMIUM), (
        f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium) or set CHROMIUM")
    if front_end["root"]:
        assert (Path(front_end["root"]) / "index.html").is_file(), (
            f"CNCORE_NEW_FRONTEND_ROOT={front_end['root']} has no index.html: point it at "
            "<pip --target folder>/comfyui_frontend_package/static")
    base = tmp_path_factory.mktemp("comfyui_browser")
    for d in ("models/checkpoints", "models/controlnet", "input", "output", "temp", "custom_nodes", "user/default"):
        (base / d).mkdir(parents=True, exist_ok=True)
    os.symlink(ROOT, base / "custom_nodes" / MODULE, target_is_directory=True)
    write_example_image(base / "input" / "example.png")
    settings = {"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": front_end["vue"]}
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(settings))
    # The models are written aside first: the driver opens every workflow without them, then moves them
    # into models/ (as a user who downloads them) and reloads the page.
    staged, moves = base / "not_downloaded_yet", []
    for name in loader_files():  # a small random file of each loader's family under the workflows' names
        (staged / "controlnet" / name).parent.mkdir(parents=True, exist_ok=True)
        write_model_file(name, staged / "controlnet" / name)
        moves.append([str(staged / "controlnet" / name), str(base / "models" / "controlnet" / name)])
    for p in tw.UI_FILES:  # ControlNeXt UNet weights: a small file of attention out-projections
        for n in tw.load_pair(p)[1].values():
            if n["class_type"] == "CNCore_LoadControlNeXtUNet":
                import safetensors.torch
                import torch

                name = n["inputs"]["weights_name"]
                path = staged / "controlnet" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"
                safetensors.torch.save_file({key + ".weight": torch.zeros(8, 8), key + ".bias": torch.zeros(8)}, str(path))
                moves.append([str(path), str(base / "models" / "controlnet" / name)])
    for (method, _), name in ANNOTATOR_FILES.items():  # a ViT-S under the ViT-B name: sizes come from the shapes
        from test_annotator_depth_anything import random_release_state_dict
        import torch

        (staged / "annotators").mkdir(parents=True, exist_ok=True)
        torch.save(random_release_state_dict(seed=3), staged / "annotators" / name)
        moves.append([str(staged / "annotators" / name), str(base / "models" / "annotators" / name)])
    ckpts = {n["inputs"]["ckpt_name"] for p in tw.UI_FILES for n in tw.load_pair(p)[1].values()
             if n["class_type"] == "CheckpointLoaderSimple"}
    for name in ckpts:  # the checkpoints are only listed (nothing is queued): empty files do
        (staged / "checkpoints").mkdir(parents=True, exist_ok=True)
        (staged / "checkpoints" / name).touch()
        moves.append([str(staged / "checkpoints" / name), str(base / "models" / "checkpoints" / name)])
    shots = Path(os.environ.get("CNCORE_SCREENSHOTS") or tempfile.mkdtemp(prefix="cncore_screens_")) / front_end["name"]
    flags = ["--disable-all-custom-nodes", "--whitelist-custom-nodes", MODULE]
    if front_end["root"]:
        flags += ["--front-end-root", front_end["root"]]
    with serve(base, *flags) as server:
        category = json.loads((ROOT / "locales" / "en" / "main.json").read_text())["templateWorkflows"]["category"]
        config = {"url": server.url + "/", "chromium": CHROMIUM, "out": str(shots), "category": category[MODULE],
                  "vue": front_end["vue"],
                  "absent": {"workflows": [str(p) for p in tw.UI_FILES], "moves": moves},
                  "workflows": [str(p) for p in tw.UI_FILES] + [str(write_legacy_workflow(base))],
                  "methods": {m: list(pp.method_inputs(m)) for m in pp.list_methods()}}
        (base / "browser.json").write_text(json.dumps(config))
        run = subprocess.run([PLAYWRIGHT_PYTHON, str(Path(__file__).with_name("browser_driver.py")),
                              str(base / "browser.json")], capture_output=True, text=True, timeout=1500)
        assert run.returncode == 0, f"the browser driver failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
        report = json.loads((shots / "result.json").read_text())
        print(f"\n[browser] front end {report['version']} ({'Nodes 2.0' if report['vue'] else 'classic canvas'}), "
              f"screenshots in {shots}")
        yield report, server, front_end


def _intersect(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _pack_errors(console: list[dict], deprecations: list[dict] | None = None) -> list[str]:
    """Console errors and warnings that name the pack or come from our web/ files, and deprecation
    warnings whose call stack passes through web/."""
    ours = [f"{c['type']}: {c['text']} ({c.get('url', '')})" for c in console
            if c["type"] in ("error", "warning", "pageerror")
            and (any(k in c["text"] for k in ("cncore", "CNCore", "controlnet-core", "controlnet_core"))
                 or OUR_SCRIPTS in c.get("url", "") or OUR_ROUTES in c.get("url", ""))
            and not any(k in c["text"] for k in FRONT_END_NOISE)]
    return ours + [f"deprecated: {d['message']}\n{d['stack']}" for d in deprecations or [] if OUR_SCRIPTS in d["stack"]]


def test_the_front_end_is_the_one_asked_for(page_report):
    report, _, front_end = page_report
    assert report["watching_deprecations"] is True
    if front_end["root"] is None and COMFYUI_PATH:  # ComfyUI's own pin
        requirements = (Path(COMFYUI_PATH) / "requirements.txt").read_text().splitlines()
        pins = [line.split("==", 1)[1].strip() for line in requirements
                if line.startswith("comfyui-frontend-package==")]
        assert [report["version"]] == pins, (report["version"], pins)
    else:
        assert report["version"] and report["vue"] is front_end["vue"], (report["version"], report["vue"])


def test_extensions_are_registered_once(page_report):
    report, _, _ = page_report
    assert sorted(report["extensions"]) == ["cncore.loader", "cncore.preprocessor"]


def _overlaps(graph: dict) -> list:
    """Pairs of nodes whose drawn boxes (title bar included; in Nodes 2.0 the DOM elements) intersect."""
    nodes = graph["nodes"]
    return [(a["title"], b["title"], a["screen"], b["screen"]) for i, a in enumerate(nodes) for b in nodes[i + 1:]
            if _intersect(a["screen"], b["screen"])]


def _assert_saved_sizes(graph: dict, name: str) -> None:
    """The saved sizes are the ones the classic canvas shows (so the file's layout test means something).
    Nodes 2.0 sizes each node by its content instead (DOM boxes): only the overlap check applies there."""
    ui = json.loads((tw.WORKFLOWS / f"{name}.json").read_text())
    saved = {str(n["id"]): n["size"] for n in ui["nodes"]}  # newer front ends give ids as strings
    for n in graph["nodes"]:
        if n["dom"]:
            continue
        size = saved[str(n["id"])]
        assert abs(n["rect"][3] - 30 - size[1]) <= 2 and abs(n["rect"][2] - size[0]) <= 2, (n["title"], n["rect"], size)


@pytest.mark.parametrize("name", [p.stem for p in tw.UI_FILES])
def test_workflow_loads_cleanly_and_is_laid_out(page_report, name):
    report, _, _ = page_report
    entry = report["workflows"][name]
    assert entry["dialogs"] == [], entry["dialogs"]
    nodes = entry["graph"]["nodes"]
    assert all(n["registered"] for n in nodes), [n["type"] for n in nodes if not n["registered"]]
    assert _pack_errors(entry["console"], entry["deprecations"]) == []
    # as the user sees it (node sizes after the front end and our extension laid them out)
    for graph in (entry["graph"], entry["graph_after_preview"]):
        assert graph["scale"] >= 0.6 and not graph["lowQuality"]
        assert _overlaps(graph) == [], name
    left, top, width, height = entry["graph"]["canvas"]
    for n in entry["graph"]["nodes"]:
        x, y, w, h = n["screen"]
        assert left <= x and x + w <= left + width and top <= y and y + h <= top + height, (n["title"], n["screen"])
    _assert_saved_sizes(entry["graph"], name)


@pytest.mark.parametrize("name", [p.stem for p in tw.UI_FILES])
def test_a_workflow_opened_before_its_models_are_downloaded(page_report, name):
    """A new user's first open: the front end's Missing Models warning names every model file, the
    loaders say the file is not there (in their normal colour: nothing red from us), the layout is the
    one with the files (the label's room does not depend on them), and the console has nothing of ours."""
    report, _, _ = page_report
    entry = report["absent"][name]
    assert _pack_errors(entry["console"], entry["deprecations"]) == []
    _, api = tw.load_pair(tw.WORKFLOWS / f"{name}.json")
    files = {v for n in api.values() for k, v in n["inputs"].items() if k in ("ckpt_name", "control_net_name")}
    warning = entry["missing_models"]
    assert warning and all(f in warning["text"] for f in files), (files, warning)
    assert entry["labels"] and all(
        label["text"] == "file not found in models/controlnet" and "error" not in label["color"]
        for label in entry["labels"].values()), entry["labels"]
    assert _overlaps(entry["graph"]) == [], name
    _assert_saved_sizes(entry["graph"], name)


@pytest.mark.parametrize("name", [p.stem for p in tw.UI_FILES])
def test_the_front_end_saves_and_queues_exactly_the_shipped_graph(page_report, name):
    """With the extension's extra widgets and hidden widgets, Save writes the file's widget values and
    Run queues the API twin's inputs: nothing changes for saved workflows or API users."""
    report, _, _ = page_report
    _assert_saves_and_queues(report["workflows"][name]["saved"], tw.WORKFLOWS / f"{name}.json")


def test_a_workflow_saved_by_0_1_0_opens_as_the_shipped_one(page_report):
    """The shipped workflow as 0.1.0 saved it (no values for the widgets appended since): it loads
    cleanly, and Save and Run give exactly what the shipped file and its API twin hold (the appended
    widgets at their defaults)."""
    report, _, _ = page_report
    entry = report["workflows"][f"{LEGACY_OF} (saved by 0.1.0)"]
    assert entry["dialogs"] == [] and _pack_errors(entry["console"], entry["deprecations"]) == []
    _assert_saves_and_queues(entry["saved"], tw.WORKFLOWS / f"{LEGACY_OF}.json")


def _assert_saves_and_queues(saved: dict, ui_path: Path) -> None:
    ui, api = tw.load_pair(ui_path)
    for node in ui["nodes"]:  # newer front ends leave out the empty list of a node without widgets
        assert (saved["widgets_values"].get(str(node["id"])) or []) == node["widgets_values"], node["type"]
    assert saved["prompt"].keys() == api.keys()
    for nid, node in api.items():
        got = saved["prompt"][nid]
        assert got["class_type"] == node["class_type"]
        assert {k: (list(v) if isinstance(v, list) else v) for k, v in got["inputs"].items()} == node["inputs"], nid


# The workflows with a Preprocessor node (the pose workflow's hint comes from Pose Keypoints, queued only)
WITH_PREPROCESSOR = [p.stem for p in tw.UI_FILES
                     if any(n["class_type"] == "CNCore_Preprocessor" for n in tw.load_pair(p)[1].values())]


@pytest.mark.parametrize("name", WITH_PREPROCESSOR)
def test_preprocessor_shows_the_widgets_of_its_method_and_previews(page_report, name):
    report, _, _ = page_report
    entry = report["workflows"][name]
    assert entry["visible"], "the workflow has a Preprocessor node"
    for nid, seen in entry["visible"].items():
        for method, visible in seen["methods"].items():
            shown = [w for w in visible if w not in EXTRA_WIDGETS]
            assert shown[0] == "method" and sorted(shown[1:]) == sorted(pp.method_inputs(method)), (method, visible)
            assert {"Preview hint", "auto preview"} <= set(visible)
        if seen["heights"]:  # fewer widgets, smaller node
            assert seen["heights"]["invert"] < seen["heights"]["tile"] < seen["heights"]["canny"]
        state = entry["preview"][nid]
        assert state["shown"] and (state["width"], state["height"]) == INPUT_SIZE, state  # the hint of example.png
        method = next(n["inputs"] for k, n in tw.load_pair(tw.WORKFLOWS / f"{name}.json")[1].items() if k == str(nid))
        network = ANNOTATOR_FILES.get((method["method"], method.get("depth_model")))
        # a network method says which weights file it used; the others show the hint alone
        assert (state["text"].startswith("weights: ") and state["text"].endswith(network)) if network else (
            state["text"] == ""), state
    # the node after the preview: taller by at most the room the layout keeps for it (on the classic
    # canvas; Nodes 2.0 sizes nodes by their content, and its boxes are checked for overlaps instead)
    saved = {str(n["id"]): n for n in json.loads((tw.WORKFLOWS / f"{name}.json").read_text())["nodes"]}
    for n in entry["graph_after_preview"]["nodes"]:
        room = tw.PREVIEW_ROOM.get(n["type"], 0)
        assert n["dom"] or n["rect"][3] - 30 <= saved[str(n["id"])]["size"][1] + room + 1, (n["title"], n["rect"])
    # a refused request (inpaint without a mask): the server's sentence in the node, no image; in the
    # console only the browser's own line for the 400 answer (no page can silence it), nothing of ours
    err = entry["error_preview"]
    assert "needs a mask" in err["text"] and not err["shown"], err
    refused = _pack_errors(entry["console_refused_preview"])
    assert all("status of 400" in line and "/cncore/preview" in line for line in refused), refused


@pytest.mark.parametrize("name", [p.stem for p in tw.UI_FILES])
def test_loader_shows_what_the_file_is(page_report, name):
    report, _, _ = page_report
    labels = {str(k): v["text"] for k, v in report["workflows"][name]["labels"].items()}
    files = {str(n["id"]): n["widgets_values"][0] for n in json.loads((tw.WORKFLOWS / f"{name}.json").read_text())["nodes"]
             if n["type"] == "CNCore_LoadControlNet"}
    assert labels and {str(k): v for k, v in labels.items()} == {k: MODEL_FILES[f][1] for k, f in files.items()}


def test_every_loader_file_of_the_workflows_has_a_family_here():
    """A new workflow's model file needs its family in MODEL_FILES, or its label goes unchecked."""
    assert loader_files() <= set(MODEL_FILES), loader_files() - set(MODEL_FILES)


def test_template_browser_finds_every_thumbnail(page_report):
    report, _, _ = page_report
    t = report["templates"]
    badges = ("Node graph", "App")  # newer front ends put the template's kind above its title
    titles = [next(line for line in c.split("\n") if line.strip() not in badges) for c in t["cards"]]
    assert sorted(titles) == sorted(p.stem for p in tw.UI_FILES)
    asked = {unquote(u.rsplit("/", 1)[-1]): s for s, u in t["responses"] if u.endswith(".jpg")}
    assert {f"{p.stem}.jpg" for p in tw.UI_FILES} <= set(asked), asked
    assert all(s == 200 for s in asked.values()), asked
    # no thumbnail of ours missing (a newer front end also asks 0.3.64's template package for a
    # /templates/index_logo.json it lacks: the front end's own 404, not ours)
    missing = [c for c in t["console"] if "404" in c["text"] and "/templates/index_logo.json" not in c.get("url", "")]
    assert _pack_errors(t["console"], t["deprecations"]) == [] and not missing, missing
    # the category carries the pack's name from locales/en/main.json (the cards only their file names)
    assert t["category_shown"]
