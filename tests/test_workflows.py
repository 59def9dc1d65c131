"""Every shipped workflow is checked against the node definitions.

workflows/*.json are UI-format workflows (what the ComfyUI front end saves and loads by drag and
drop; its template browser lists them), workflows/api/*.json their API-format twins (what
`POST /prompt` accepts). For each pair: every node type exists, every link connects an output to
an input of a compatible type, every widget value has the right type and lies in range, required
inputs are present, at least one output node exists, and the UI and API files describe the same
graph (same nodes, links and widget values).

Layout (every workflow in workflows/, see `layout_problems`): what a user sees on opening the file
in ComfyUI 0.3.64 with its front end 1.27.10 in a 1600x1000 browser window. A node's rectangle is
`pos` to `pos + size` plus its 30 px title bar above `pos`; a ControlNet Preprocessor's also holds the
room its hint preview takes when shown (PREVIEW_ROOM below it). No two node rectangles intersect; a
group contains every node it touches and groups do not overlap. The saved view `extra.ds` zooms to at
least MIN_SCALE (below ~0.57 the canvas stops drawing text) and puts every node and group inside the
canvas (the window less the side bar and the tab/menu bars: CANVAS) and off the minimap and zoom
buttons in its bottom-right corner (OVERLAYS). `scripts/fit_workflow_view.py` writes such a view.

Node definitions: ours come from the pack's own INPUT_TYPES. ComfyUI's built-in nodes used by the
workflows are described by `BUILTIN_SPECS` below, a small table of their input specs taken by hand
from ComfyUI's source (Comfy-Org/ComfyUI a125cd84, v0.3.64: nodes.py and comfy_extras/nodes_mask.py;
sampler/scheduler lists are the subset the workflows use). With a real ComfyUI
(tests/test_comfyui_integration.py, COMFYUI_PATH set) the same validator runs against its
/object_info instead.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from comfyui_controlnet_core import NODE_CLASS_MAPPINGS

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
FILES = "__FILES__"  # a file-list combo: its choices depend on the user's folders
MAX_RESOLUTION = 16384

BUILTIN_SPECS: dict[str, dict] = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": [FILES, {}]}},
        "output": ["MODEL", "CLIP", "VAE"], "output_node": False,
    },
    "CLIPTextEncode": {
        "input": {"required": {"text": ["STRING", {"multiline": True, "dynamicPrompts": True}], "clip": ["CLIP", {}]}},
        "output": ["CONDITIONING"], "output_node": False,
    },
    "EmptyLatentImage": {
        "input": {"required": {
            "width": ["INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}],
            "height": ["INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}],
            "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
        }},
        "output": ["LATENT"], "output_node": False,
    },
    "KSampler": {
        "input": {"required": {
            "model": ["MODEL", {}],
            "seed": ["INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}],
            "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
            "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}],
            "sampler_name": [["euler", "euler_ancestral", "dpmpp_2m"], {}],
            "scheduler": [["normal", "karras", "simple"], {}],
            "positive": ["CONDITIONING", {}],
            "negative": ["CONDITIONING", {}],
            "latent_image": ["LATENT", {}],
            "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}],
        }},
        "output": ["LATENT"], "output_node": False,
    },
    "FluxGuidance": {  # comfy_extras/nodes_flux.py
        "input": {"required": {
            "conditioning": ["CONDITIONING", {}],
            "guidance": ["FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1}],
        }},
        "output": ["CONDITIONING"], "output_node": False,
    },
    "VAEDecode": {
        "input": {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}},
        "output": ["IMAGE"], "output_node": False,
    },
    "SaveImage": {
        "input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
        "output": [], "output_node": True,
    },
    "PreviewImage": {"input": {"required": {"images": ["IMAGE", {}]}}, "output": [], "output_node": True},
    "LoadImage": {
        "input": {"required": {"image": [FILES, {"image_upload": True}]}},
        "output": ["IMAGE", "MASK"], "output_node": False,
    },
    "SolidMask": {
        "input": {"required": {
            "value": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}],
            "width": ["INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}],
            "height": ["INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}],
        }},
        "output": ["MASK"], "output_node": False,
    },
    "MaskComposite": {
        "input": {"required": {
            "destination": ["MASK", {}],
            "source": ["MASK", {}],
            "x": ["INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}],
            "y": ["INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}],
            "operation": [["multiply", "add", "subtract", "and", "or", "xor"], {}],
        }},
        "output": ["MASK"], "output_node": False,
    },
}

FILE_INPUTS = {("CNCore_LoadControlNet", "control_net_name"), ("CNCore_LoadControlNeXtUNet", "weights_name")}

TITLE_H = 30                # LiteGraph.NODE_TITLE_HEIGHT
MIN_SCALE = 0.6             # text is drawn from 8 px / 14 px = 0.57 (LiteGraph.Canvas.MinFontSizeForLOD = 8)
CANVAS = (1536, 922)        # the canvas in a 1600x1000 window: side bar 64 px, tab + menu bars 78 px
OVERLAYS = ((1213, 656, 323, 266),)  # canvas px under the minimap and the zoom buttons (bottom right)
PREVIEW_ROOM = {"CNCore_Preprocessor": 272}  # web/preprocessor.js: a preview at most 256 px tall + margins + gap


def pack_specs() -> dict[str, dict]:
    """Our nodes in /object_info's shape, from their INPUT_TYPES."""
    out = {}
    for name, cls in NODE_CLASS_MAPPINGS.items():
        inputs = {}
        for section, entries in cls.INPUT_TYPES().items():
            inputs[section] = {}
            for k, spec in entries.items():
                kind = spec[0]
                if (name, k) in FILE_INPUTS:
                    kind = FILES
                inputs[section][k] = [kind, dict(spec[1]) if len(spec) > 1 else {}]
        out[name] = {"input": inputs, "output": list(cls.RETURN_TYPES),
                     "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
    return out


def all_specs() -> dict[str, dict]:
    return {**BUILTIN_SPECS, **pack_specs()}


# ------------------------------------------------------------------------------------------
# the validator (also used by the integration test against a real /object_info)

def _inputs(spec: dict) -> list[tuple[str, list, bool]]:
    """(name, [type, options], required) in ComfyUI's order: required, then optional."""
    out = []
    for section in ("required", "optional"):
        for name, s in (spec["input"].get(section) or {}).items():
            out.append((name, [s[0], s[1] if len(s) > 1 else {}], section == "required"))
    return out


def is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES or kind == FILES or kind == "COMBO"


def types_match(out_type: str, in_type: str) -> bool:
    if out_type == "*" or in_type == "*":
        return True
    return bool(set(out_type.split(",")) & set(in_type.split(",")))


def check_value(node: str, name: str, kind, opts: dict, value) -> list[str]:
    where = f"node {node} input {name!r}"
    if kind == FILES:
        return [] if isinstance(value, str) and value else [f"{where}: {value!r} is not a file name"]
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else opts.get("options", [])
        return [] if value in choices else [f"{where}: {value!r} is not one of {choices}"]
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{where}: {value!r} is not an integer"]
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return [f"{where}: {value!r} is not a number"]
    elif kind == "STRING":
        return [] if isinstance(value, str) else [f"{where}: {value!r} is not a string"]
    elif kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: {value!r} is not a boolean"]
    lo, hi = opts.get("min"), opts.get("max")
    if lo is not None and value < lo or hi is not None and value > hi:
        return [f"{where}: {value!r} is outside [{lo}, {hi}]"]
    return []


def validate_api(prompt: dict, specs: dict) -> list[str]:
    errors, has_output = [], False
    for nid, node in prompt.items():
        ctype = node.get("class_type")
        if ctype not in specs:
            errors.append(f"node {nid}: unknown node type {ctype!r}")
            continue
        spec = specs[ctype]
        has_output |= bool(spec.get("output_node"))
        known = {n: (s, req) for n, s, req in _inputs(spec)}
        for name in node["inputs"]:
            if name not in known:
                errors.append(f"node {nid} ({ctype}): unknown input {name!r}")
        for name, (s, req) in known.items():
            if name not in node["inputs"]:
                if req:
                    errors.append(f"node {nid} ({ctype}): required input {name!r} missing")
                continue
            value = node["inputs"][name]
            if isinstance(value, list):
                src, slot = value
                if str(src) not in prompt:
                    errors.append(f"node {nid}: input {name!r} links to missing node {src}")
                    continue
                src_type = prompt[str(src)]["class_type"]
                outs = specs.get(src_type, {}).get("output", [])
                if not isinstance(slot, int) or not 0 <= slot < len(outs):
                    errors.append(f"node {nid}: input {name!r} links to output {slot} of {src_type}, which has {len(outs)}")
                elif not types_match(outs[slot], s[0] if isinstance(s[0], str) else "COMBO"):
                    errors.append(f"node {nid}: input {name!r} ({s[0]}) linked to {src_type} output {outs[slot]}")
            elif not is_widget(s[0]):
                errors.append(f"node {nid} ({ctype}): input {name!r} of type {s[0]} needs a link, got {value!r}")
            else:
                errors += check_value(f"{nid} ({ctype})", name, s[0], s[1], value)
    if not has_output:
        errors.append("the prompt has no output node")
    return errors


def ui_widget_names(spec: dict) -> list[str]:
    """The positional widgets_values layout the front end uses: every widget input in order, plus
    a 'control_after_generate' value after seed-like INTs and an 'upload' value after image uploads."""
    names = []
    for name, (kind, opts), _ in _inputs(spec):
        if not is_widget(kind) or opts.get("forceInput"):
            continue
        names.append(name)
        cag = opts.get("control_after_generate")
        if kind == "INT" and (cag if cag is not None else name in ("seed", "noise_seed")):
            names.append("<control_after_generate>")
        if opts.get("image_upload"):
            names.append("<upload>")
    return names


def optional_widgets(spec: dict) -> set[str]:
    return {name for name, (kind, _), required in _inputs(spec) if not required and is_widget(kind)}


def validate_ui(workflow: dict, specs: dict) -> list[str]:
    errors = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    if len(nodes) != len(workflow["nodes"]):
        errors.append("duplicate node ids")
    if workflow.get("last_node_id", 0) < max(nodes, default=0):
        errors.append("last_node_id is smaller than a node id")
    links = {}
    for link in workflow["links"]:
        lid, src, sslot, dst, dslot, ltype = link
        links[lid] = link
        if src not in nodes or dst not in nodes:
            errors.append(f"link {lid} joins a missing node")
            continue
        s_node, d_node = nodes[src], nodes[dst]
        outs = specs.get(s_node["type"], {}).get("output", [])
        if sslot >= len(outs) or outs[sslot] != ltype:
            errors.append(f"link {lid}: {s_node['type']} output {sslot} is not of type {ltype}")
        if sslot >= len(s_node["outputs"]) or lid not in (s_node["outputs"][sslot].get("links") or []):
            errors.append(f"link {lid}: not listed on output {sslot} of node {src}")
        if dslot >= len(d_node["inputs"]) or d_node["inputs"][dslot].get("link") != lid:
            errors.append(f"link {lid}: not set on input {dslot} of node {dst}")
        elif not types_match(ltype, d_node["inputs"][dslot]["type"]):
            errors.append(f"link {lid}: type {ltype} into input of type {d_node['inputs'][dslot]['type']}")
    if workflow.get("last_link_id", 0) < max(links, default=0):
        errors.append("last_link_id is smaller than a link id")
    for nid, node in nodes.items():
        spec = specs.get(node["type"])
        if spec is None:
            errors.append(f"node {nid}: unknown node type {node['type']!r}")
            continue
        known = {n: s for n, s, _ in _inputs(spec)}
        for slot in node.get("inputs", []):
            s = known.get(slot["name"])
            if s is None:
                errors.append(f"node {nid}: unknown input {slot['name']!r}")
            elif slot["type"] != (s[0] if isinstance(s[0], str) and s[0] != FILES else "COMBO") and not slot.get("widget"):
                errors.append(f"node {nid}: input {slot['name']!r} has type {slot['type']}, the node says {s[0]}")
            if slot.get("link") is not None and slot["link"] not in links:
                errors.append(f"node {nid}: input {slot['name']!r} uses missing link {slot['link']}")
        for i, out in enumerate(node.get("outputs", [])):
            if i >= len(spec["output"]) or out["type"] != spec["output"][i]:
                errors.append(f"node {nid}: output {i} type {out['type']} does not match the node")
        names = ui_widget_names(spec)
        values = node.get("widgets_values", [])
        # The front end sets widgets_values[i] on the i-th widget for i < len(widgets_values)
        # (LGraphNode.configure), so a workflow saved before an optional widget was appended at the
        # end loads with that widget at its default: only optional widgets may be missing, at the end.
        missing = names[len(values):]
        if len(values) > len(names) or any(n not in optional_widgets(spec) for n in missing):
            errors.append(f"node {nid} ({node['type']}): {len(values)} widget values for widgets {names}")
            continue
        for name, value in zip(names, values):
            if name == "<control_after_generate>":
                if value not in ("fixed", "increment", "decrement", "randomize"):
                    errors.append(f"node {nid}: bad control_after_generate {value!r}")
            elif name == "<upload>":
                if value != "image":
                    errors.append(f"node {nid}: bad upload widget value {value!r}")
            else:
                errors += check_value(f"{nid} ({node['type']})", name, known[name][0], known[name][1], value)
        linked_required = {n for n, s, req in _inputs(spec) if req and not is_widget(s[0])}
        present = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        for n in sorted(linked_required - present):
            errors.append(f"node {nid} ({node['type']}): required input {n!r} is not connected")
    return errors


def same_graph(workflow: dict, prompt: dict, specs: dict) -> list[str]:
    errors = []
    nodes = {str(n["id"]): n for n in workflow["nodes"] if n.get("mode", 0) == 0}
    if set(nodes) != set(prompt):
        return [f"UI nodes {sorted(nodes)} != API nodes {sorted(prompt)}"]
    expected: dict[str, dict] = {nid: {} for nid in nodes}
    for lid, src, sslot, dst, dslot, _ in workflow["links"]:
        name = nodes[str(dst)]["inputs"][dslot]["name"]
        expected[str(dst)][name] = [str(src), sslot]
    for nid, node in nodes.items():
        spec = specs[node["type"]]
        if prompt[nid]["class_type"] != node["type"]:
            errors.append(f"node {nid}: UI type {node['type']} vs API {prompt[nid]['class_type']}")
        for name, value in zip(ui_widget_names(spec), node.get("widgets_values", [])):
            if not name.startswith("<") and name not in expected[nid]:
                expected[nid][name] = value
        if prompt[nid]["inputs"] != expected[nid]:
            errors.append(f"node {nid} ({node['type']}): API inputs {prompt[nid]['inputs']} != UI {expected[nid]}")
    return errors


# ------------------------------------------------------------------------------------------
# layout

Rect = tuple[float, float, float, float]  # x, y, width, height


def node_rect(node: dict) -> Rect:
    (x, y), (w, h) = node["pos"], node["size"]
    return (x, y - TITLE_H, w, h + TITLE_H + PREVIEW_ROOM.get(node["type"], 0))


def intersects(a: Rect, b: Rect) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def contains(outer: Rect, inner: Rect) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1] and inner[0] + inner[2] <= outer[0] + outer[2]
            and inner[1] + inner[3] <= outer[1] + outer[3])


def bounding_box(rects: list[Rect]) -> Rect:
    x0, y0 = min(r[0] for r in rects), min(r[1] for r in rects)
    return (x0, y0, max(r[0] + r[2] for r in rects) - x0, max(r[1] + r[3] for r in rects) - y0)


def on_screen(rect: Rect, ds: dict) -> Rect:
    """Canvas pixels of a graph rectangle at the view `ds` (screen = (graph + offset) x scale)."""
    s, (ox, oy) = ds["scale"], ds["offset"]
    return ((rect[0] + ox) * s, (rect[1] + oy) * s, rect[2] * s, rect[3] * s)


def layout_problems(workflow: dict) -> list[str]:
    nodes = [(f"node {n['id']} ({n.get('title') or n['type']})", node_rect(n)) for n in workflow["nodes"]]
    groups = [(f"group {g.get('title')!r}", tuple(g["bounding"])) for g in workflow.get("groups", [])]
    problems = []
    for i, (a, ra) in enumerate(nodes):
        for b, rb in nodes[i + 1:]:
            if intersects(ra, rb):
                problems.append(f"{a} overlaps {b}")
    for i, (g, rg) in enumerate(groups):
        for h, rh in groups[i + 1:]:
            if intersects(rg, rh):
                problems.append(f"{g} overlaps {h}")
        for a, ra in nodes:
            if intersects(rg, ra) and not contains(rg, ra):
                problems.append(f"{a} sticks out of {g}")
    ds = workflow.get("extra", {}).get("ds")
    if not ds:
        return problems + ["no saved view (extra.ds)"]
    if ds["scale"] < MIN_SCALE:
        problems.append(f"the saved zoom {ds['scale']} is below {MIN_SCALE}: the canvas draws no text there")
    canvas = (0, 0) + CANVAS
    for what, r in nodes + groups:
        sr = on_screen(r, ds)
        if not contains(canvas, sr):
            problems.append(f"{what} is not inside the {CANVAS[0]}x{CANVAS[1]} canvas at the saved view")
        elif any(intersects(sr, o) for o in OVERLAYS):
            problems.append(f"{what} lies under the minimap / zoom buttons at the saved view")
    return problems


def fit_view(workflow: dict, pad: float = 20, max_scale: float = 1.0) -> dict:
    """The view that centres the whole graph in the canvas, as large as fits (at most `max_scale`)."""
    rects = [node_rect(n) for n in workflow["nodes"]] + [tuple(g["bounding"]) for g in workflow.get("groups", [])]
    x, y, w, h = bounding_box(rects)
    scale = min(max_scale, (CANVAS[0] - 2 * pad) / w, (CANVAS[1] - 2 * pad) / h)
    scale = float(int(scale * 1000) / 1000)  # a round number, never above the fit
    return {"scale": scale, "offset": [round((CANVAS[0] / scale - w) / 2 - x, 1), round((CANVAS[1] / scale - h) / 2 - y, 1)]}


def load_pair(ui_path: Path) -> tuple[dict, dict]:
    api_path = ui_path.parent / "api" / ui_path.name
    return json.loads(ui_path.read_text()), json.loads(api_path.read_text())


# ------------------------------------------------------------------------------------------
# tests

def test_the_four_main_uses_ship_as_ui_and_api_pairs():
    names = {p.name for p in UI_FILES}
    assert {"ControlNet - Canny (SD1.5).json", "ControlNet - Canny and Tile Combined (SD1.5).json",
            "ControlNet - Masked Region (SD1.5).json", "ControlNet - Start and End Percent (SD1.5).json"} <= names
    for p in UI_FILES:
        assert (WORKFLOWS / "api" / p.name).is_file(), f"{p.name} has no API twin"
    assert {p.name for p in (WORKFLOWS / "api").glob("*.json")} == names


def test_file_names_read_as_template_titles():
    """The template browser (front end 1.27.10) titles a pack's workflow with its file name and
    describes it with the same name, `-` and `_` as spaces: names are words, end with the base model
    the workflow needs, and use only characters that are plain in a URL path (the space is encoded)
    and on every file system."""
    for p in UI_FILES:
        assert re.fullmatch(r"[A-Z][A-Za-z0-9 .()-]+ \((SD1\.5|SDXL|Flux)\)", p.stem) and "  " not in p.stem, p.name


@pytest.mark.parametrize("ui_path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_workflow_is_valid_and_ui_matches_api(ui_path):
    ui, api = load_pair(ui_path)
    specs = all_specs()
    assert validate_api(api, specs) == []
    assert validate_ui(ui, specs) == []
    assert same_graph(ui, api, specs) == []
    used = {n["class_type"] for n in api.values()}
    assert used & set(NODE_CLASS_MAPPINGS), "the workflow uses none of the pack's nodes"
    assert ui.get("version") is not None and isinstance(ui.get("links"), list)


@pytest.mark.parametrize("ui_path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_workflow_layout_is_clean_and_the_saved_view_shows_it_all(ui_path):
    assert layout_problems(json.loads(ui_path.read_text())) == []


def test_layout_rule_catches_overlaps_and_bad_views():
    """The rule itself, on a small hand-made graph."""
    wf = {"nodes": [{"id": 1, "type": "A", "pos": [0, 30], "size": [100, 50]},
                    {"id": 2, "type": "B", "pos": [0, 120], "size": [100, 50]}],
          "groups": [{"title": "g", "bounding": [-10, -10, 130, 190]}],
          "extra": {"ds": {"scale": 1.0, "offset": [20, 20]}}}
    assert layout_problems(wf) == []
    wf["nodes"][1]["pos"] = [0, 100]  # its title bar (70..100) now covers node 1's body (30..80)
    assert any("overlaps" in p for p in layout_problems(wf))
    wf["nodes"][1]["pos"] = [0, 120]
    wf["groups"][0]["bounding"] = [-10, -10, 130, 120]
    assert any("sticks out" in p for p in layout_problems(wf))
    wf["groups"][0]["bounding"] = [-10, -10, 130, 190]
    wf["extra"]["ds"] = {"scale": 0.5, "offset": [20, 20]}
    assert any("below 0.6" in p for p in layout_problems(wf))
    wf["extra"]["ds"] = {"scale": 1.0, "offset": [1500, 20]}
    assert any("not inside" in p for p in layout_problems(wf))
    wf["extra"]["ds"] = {"scale": 1.0, "offset": [1300, 700]}
    assert any("minimap" in p for p in layout_problems(wf))
    wf["extra"]["ds"] = fit_view(wf)
    assert layout_problems(wf) == [] and wf["extra"]["ds"]["scale"] == 1.0


def test_workflows_show_what_their_names_promise():
    def api(name):
        return load_pair(WORKFLOWS / name)[1]

    canny = api("ControlNet - Canny (SD1.5).json")
    pre = [n for n in canny.values() if n["class_type"] == "CNCore_Preprocessor"]
    assert pre and pre[0]["inputs"]["method"] == "canny"
    two = api("ControlNet - Canny and Tile Combined (SD1.5).json")
    assert sum(n["class_type"] == "CNCore_LoadControlNet" for n in two.values()) == 2
    assert any(n["class_type"] == "CNCore_CombineControls" for n in two.values())
    apply = [n for n in two.values() if n["class_type"] == "CNCore_ApplyControlNet"][0]
    assert isinstance(apply["inputs"].get("control_stack"), list)
    masked = api("ControlNet - Masked Region (SD1.5).json")
    apply = [n for n in masked.values() if n["class_type"] == "CNCore_ApplyControlNet"][0]
    assert isinstance(apply["inputs"].get("mask"), list)
    flux = api("ControlNet Union - Canny and Tile (Flux).json")
    apply = [n for n in flux.values() if n["class_type"] == "CNCore_ApplyControlNet"][0]
    combine = [n for n in flux.values() if n["class_type"] == "CNCore_CombineControls"][0]
    assert isinstance(apply["inputs"].get("vae"), list) and isinstance(apply["inputs"].get("control_stack"), list)
    assert (apply["inputs"]["control_type"], combine["inputs"]["control_type"]) == ("canny", "tile")  # Flux modes
    assert any(n["class_type"] == "FluxGuidance" for n in flux.values())
    sched = api("ControlNet - Start and End Percent (SD1.5).json")
    apply = [n for n in sched.values() if n["class_type"] == "CNCore_ApplyControlNet"][0]
    assert (apply["inputs"]["start_percent"], apply["inputs"]["end_percent"]) != (0.0, 1.0)
    cnx = api("ControlNeXt - Canny (SDXL).json")  # both halves of a released ControlNeXt
    unet = [k for k, n in cnx.items() if n["class_type"] == "CNCore_LoadControlNeXtUNet"]
    sampler = [n for n in cnx.values() if n["class_type"] == "KSampler"][0]
    assert len(unet) == 1 and sampler["inputs"]["model"] == [unet[0], 0]
    assert cnx[unet[0]]["inputs"]["weights_name"].endswith("/unet.safetensors")


def _canny_pair():
    return load_pair(WORKFLOWS / "ControlNet - Canny (SD1.5).json")


def test_validator_catches_broken_workflows():
    """The validator itself: each kind of damage is reported."""
    specs = all_specs()
    ui, api = _canny_pair()
    apply_id = next(k for k, n in api.items() if n["class_type"] == "CNCore_ApplyControlNet")

    bad = json.loads(json.dumps(api))
    bad[apply_id]["inputs"]["strength"] = 11.0
    assert any("outside" in e for e in validate_api(bad, specs))
    bad = json.loads(json.dumps(api))
    bad[apply_id]["inputs"]["resize_mode"] = "zoom"
    assert any("not one of" in e for e in validate_api(bad, specs))
    bad = json.loads(json.dumps(api))
    vae_src = next(k for k, n in api.items() if n["class_type"] == "CheckpointLoaderSimple")
    bad[apply_id]["inputs"]["control_net"] = [vae_src, 2]  # a VAE into a CONTROL_NET socket
    assert any("linked to" in e for e in validate_api(bad, specs))
    bad = json.loads(json.dumps(api))
    bad[apply_id]["class_type"] = "CNCore_Nope"
    assert any("unknown node type" in e for e in validate_api(bad, specs))
    bad = json.loads(json.dumps(api))
    del bad[apply_id]["inputs"]["image"]
    assert any("required input 'image'" in e for e in validate_api(bad, specs))

    bad_ui = json.loads(json.dumps(ui))
    node = next(n for n in bad_ui["nodes"] if n["type"] == "CNCore_ApplyControlNet")
    node["widgets_values"] = node["widgets_values"][:5]  # a required widget (interpolation) has no value
    assert validate_ui(bad_ui, specs)
    bad_ui = json.loads(json.dumps(ui))
    bad_ui["links"][0][5] = "LATENT" if bad_ui["links"][0][5] != "LATENT" else "IMAGE"
    assert validate_ui(bad_ui, specs)
    bad_ui = json.loads(json.dumps(ui))
    node = next(n for n in bad_ui["nodes"] if n["type"] == "CNCore_ApplyControlNet")
    node["widgets_values"][0] = 0.5  # strength differs from the API twin
    assert same_graph(bad_ui, api, specs)
