"""Drive the real ComfyUI front end in headless Chromium (Playwright for Python) against a running server.

Run by tests/test_browser.py in an interpreter that has Playwright (`PLAYWRIGHT_PYTHON`, by default
ComfyUI's); it is not a test module itself. Usage: `python browser_driver.py CONFIG.json`, where the
config holds `url`, `chromium` (the browser binary), `workflows` (UI workflow files), `out` (a folder
for screenshots), `methods` ({method: [widgets it reads]}, from the pack) and `category` (the
template browser's name for the pack). It writes `result.json`
into `out`: for each workflow what the page showed (nodes, dialogs, console errors, the screen
rectangles of the nodes, visible widgets per method, the preview image size or the error shown), and
for the template browser the thumbnail requests. With `absent` in the config ({"moves": [[from, to],
...]}), every workflow is first opened with its model files absent (what ComfyUI warns about, the
loaders' labels, the layout), then the files are moved into place and the page reloaded. `vue` says
which renderer the front end was started with (setting `Comfy.VueNodes.Enabled`): in "Nodes 2.0" the
nodes are DOM elements, measured and clicked as such. Deprecation warnings of the front end are made
to repeat on every occurrence and are recorded with their call stacks (`deprecations`), so a test can
tell the ones our web/ code causes from the front end's own. The assertions live in tests/test_browser.py.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

VIEWPORT = {"width": 1600, "height": 1000}

# In the page: the graph as the user sees it (screen rectangles of the nodes, title bar included).
GRAPH_STATE = """() => {
  const app = window.app, canvas = app.canvas, ds = canvas.ds;
  const el = canvas.canvas.getBoundingClientRect();
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const nodes = app.graph._nodes.map((n) => {
    // Nodes 2.0 draws each node as a DOM element sized by its content: its box is what the user sees
    const dom = document.querySelector(`[data-node-id="${n.id}"]`)?.getBoundingClientRect();
    return {
      id: n.id, type: n.type, title: n.title,
      registered: !!LiteGraph.registered_node_types[n.type],
      rect: [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title],
      screen: dom ? [dom.left, dom.top, dom.width, dom.height]
        : [el.left + (n.pos[0] + ds.offset[0]) * ds.scale, el.top + (n.pos[1] - title + ds.offset[1]) * ds.scale,
           n.size[0] * ds.scale, (n.size[1] + title) * ds.scale],
      dom: !!dom,
    };
  });
  const groups = app.graph._groups.map((g) => ({
    title: g.title, screen: [el.left + (g._bounding[0] + ds.offset[0]) * ds.scale,
                             el.top + (g._bounding[1] + ds.offset[1]) * ds.scale,
                             g._bounding[2] * ds.scale, g._bounding[3] * ds.scale] }));
  return { scale: ds.scale, offset: [...ds.offset], canvas: [el.left, el.top, el.width, el.height],
           lowQuality: canvas.low_quality, nodes, groups };
}"""

VISIBLE_WIDGETS = """(id) => {
  const n = window.app.graph.getNodeById(id);
  return n.widgets.filter((w) => !w.hidden).map((w) => w.name);
}"""

SET_METHOD = """([id, method]) => {
  const n = window.app.graph.getNodeById(id);
  const w = n.widgets.find((x) => x.name === "method");
  w.value = method;
  w.callback?.(method, window.app.canvas, n);   // what choosing in the combo's menu does
  return n.size[1];
}"""

WIDGET_CENTER = """([id, name]) => {
  const app = window.app, ds = app.canvas.ds, n = app.graph.getNodeById(id);
  const w = n.widgets.find((x) => x.name === name);
  const el = app.canvas.canvas.getBoundingClientRect();
  const h = w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT;
  return [el.left + (n.pos[0] + n.size[0] / 2 + ds.offset[0]) * ds.scale,
          el.top + (n.pos[1] + w.y + h / 2 + ds.offset[1]) * ds.scale];
}"""

PREVIEW_STATE = """(id) => {
  const n = window.app.graph.getNodeById(id);
  const w = n.widgets.find((x) => x.name === "cncore_preview");
  const img = w.element.querySelector("img"), msg = w.element.querySelector("div");
  return { width: img.naturalWidth, height: img.naturalHeight, shown: img.style.display !== "none" && !w.hidden,
           text: msg.textContent };
}"""

LOADER_LABEL = """(id) => {
  const n = window.app.graph.getNodeById(id);
  const w = n.widgets.find((x) => x.name === "cncore_model_info");
  return w ? { text: w.element.textContent, color: w.element.style.color } : null;
}"""

# Every deprecation warning, every time, with the stack of the call that caused it (our web/ files
# appear in it by their URL when it was our code).
WATCH_DEPRECATIONS = """() => {
  window.cncoreDeprecations = [];
  if (!window.LiteGraph?.onDeprecationWarning) return false;
  LiteGraph.alwaysRepeatWarnings = true;
  LiteGraph.onDeprecationWarning.push((message) => {
    const limit = Error.stackTraceLimit;
    Error.stackTraceLimit = 100;
    window.cncoreDeprecations.push({ message, stack: new Error().stack });
    Error.stackTraceLimit = limit;
  });
  return true;
}"""

# The missing-models list the front end shows: 1.27's dialog, or (newer) the "issues found" card whose
# "View details" opens the Workflow Overview's "Missing Models" section.
MISSING_MODELS = """async () => {
  const dialogs = [...document.querySelectorAll(".p-dialog")].map((d) => d.innerText);
  const missing = dialogs.find((t) => /missing models/i.test(t) || document.querySelector(".comfy-missing-models"));
  if (missing) return { kind: "dialog", text: missing };
  const details = document.querySelector('[data-testid="error-overlay-see-errors"]');
  if (details) {
    details.click();
    await new Promise((r) => setTimeout(r, 1500));
  }
  const heading = [...document.querySelectorAll("*")].find(
    (e) => e.childElementCount === 0 && e.textContent.trim() === "Missing Models");
  let section = heading;
  while (section && !/Download/.test(section.innerText)) section = section.parentElement;
  return section ? { kind: "panel", text: section.innerText } : null;
}"""

CLOSE_MISSING_MODELS = """() => {
  for (const b of document.querySelectorAll(".p-dialog .p-dialog-close-button, [data-testid='error-overlay-dismiss']"))
    b.click();
}"""

DROP = """async ([text, name]) => {
  const canvas = document.querySelector("#graph-canvas");
  const dt = new DataTransfer();
  dt.items.add(new File([text], name, { type: "application/json" }));
  const r = canvas.getBoundingClientRect();
  const at = { clientX: r.left + r.width - 40, clientY: r.top + r.height - 40, bubbles: true, cancelable: true,
               dataTransfer: dt };
  for (const type of ["dragenter", "dragover", "drop"]) canvas.dispatchEvent(new DragEvent(type, at));
}"""


SAVED = """async () => {
  const { output } = await window.app.graphToPrompt();  // the API prompt the Run button queues
  const workflow = window.app.graph.serialize();        // what Save writes
  return { prompt: output, widgets_values: Object.fromEntries(workflow.nodes.map((n) => [n.id, n.widgets_values])) };
}"""

OVERLAYS = """(visibility) => {
  window.app.canvas.show_info = visibility === "visible";  // the FPS / node count corner
  for (const el of document.querySelectorAll(".minimap-main-container, .p-buttongroup-vertical"))
    el.style.visibility = visibility;
  window.app.canvas.setDirty(true, true);
}"""


def _graph_clip(graph: dict, pad: float = 16) -> dict:
    """The screen rectangle of every node and group, padded, inside the canvas."""
    rects = [n["screen"] for n in graph["nodes"]] + [g["screen"] for g in graph["groups"]]
    cx, cy, cw, ch = graph["canvas"]
    x0, y0 = max(cx, min(r[0] for r in rects) - pad), max(cy, min(r[1] for r in rects) - pad)
    x1 = min(cx + cw, max(r[0] + r[2] for r in rects) + pad)
    y1 = min(cy + ch, max(r[1] + r[3] for r in rects) + pad)
    return {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0}


def _press_preview(page, nid: int, vue: bool) -> dict:
    """Click the node's "Preview hint" button as a user does; wait for the image or a message."""
    if vue:  # a DOM button inside the node's element
        page.locator(f'[data-node-id="{nid}"]').get_by_role("button", name="Preview hint").click()
    else:  # drawn on the canvas
        x, y = page.evaluate(WIDGET_CENTER, [nid, "Preview hint"])
        page.mouse.click(x, y)
    page.wait_for_timeout(200)
    deadline = time.time() + 30
    state = page.evaluate(PREVIEW_STATE, nid)
    while time.time() < deadline and (not state["shown"] and not state["text"] or "making" in state["text"]):
        page.wait_for_timeout(200)
        state = page.evaluate(PREVIEW_STATE, nid)
    return state


def _dialogs(page) -> list[str]:
    return [t.strip()[:300] for t in page.locator(".p-dialog").all_inner_texts() if t.strip()]


def _open(page, url: str) -> bool:
    """Load the front end; True when its deprecation warnings are watched."""
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_function("() => window.app?.graph && window.LiteGraph?.registered_node_types"
                           "?.CNCore_Preprocessor && document.querySelector('#graph-canvas')", timeout=180_000)
    page.wait_for_timeout(1500)
    return page.evaluate(WATCH_DEPRECATIONS)


def _drop(page, path: Path) -> None:
    text = path.read_text()
    n_nodes = len(json.loads(text)["nodes"])
    page.evaluate("() => { window.cncoreDeprecations = []; }")
    page.evaluate(DROP, [text, path.name])
    page.wait_for_function(f"() => window.app.graph._nodes.length === {n_nodes}", timeout=30_000)
    page.wait_for_timeout(2000)  # labels fetched, layout settled


def _labels(page, graph: dict) -> dict:
    return {node["id"]: page.evaluate(LOADER_LABEL, node["id"]) for node in graph["nodes"]
            if node["type"] == "CNCore_LoadControlNet"}


def _absent(page, config: dict, console: list, out: Path) -> dict:
    """Every shipped workflow opened as a new user does, before downloading its models."""
    seen = {}
    for wf in config["workflows"]:
        path = Path(wf)
        console.clear()
        _drop(page, path)
        entry = {"graph": page.evaluate(GRAPH_STATE)}
        entry["labels"] = _labels(page, entry["graph"])
        page.screenshot(path=str(out / f"{path.stem}_absent.png"))
        entry["missing_models"] = page.evaluate(MISSING_MODELS)
        page.screenshot(path=str(out / f"{path.stem}_absent_warning.png"))
        page.evaluate(CLOSE_MISSING_MODELS)
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
        entry["console"] = list(console)
        entry["deprecations"] = page.evaluate("() => window.cncoreDeprecations")
        seen[path.stem] = entry
    return seen


def run(config: dict) -> dict:
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"workflows": {}, "templates": {}}
    vue = bool(config.get("vue"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=config["chromium"], headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
        console: list[dict] = []
        responses: list[tuple[int, str]] = []
        page.on("console", lambda m: console.append({"type": m.type, "text": m.text, "url": m.location.get("url", "")}))
        page.on("pageerror", lambda e: console.append({"type": "pageerror", "text": f"{e}\n{e.stack or ''}",
                                                       "url": ""}))
        page.on("response", lambda r: responses.append((r.status, r.url)))
        host = config["url"].split("//", 1)[1].split("/", 1)[0]
        # No network here: requests to other hosts would only time out.
        page.route("**/*", lambda route: route.continue_() if f"//{host}/" in route.request.url + "/"
                   else route.abort())
        if config.get("absent"):
            result["watching_deprecations"] = _open(page, config["url"])
            result["absent"] = _absent(page, {"workflows": config["absent"]["workflows"]}, console, out)
            for src, dst in config["absent"]["moves"]:  # the user downloads the models, reloads the page
                Path(dst).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(src, dst)
        result["watching_deprecations"] = _open(page, config["url"])
        result["version"] = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")
        result["vue"] = page.evaluate(
            "() => window.app.extensionManager?.setting?.get?.('Comfy.VueNodes.Enabled') ?? null")
        result["extensions"] = page.evaluate(
            "() => (window.app.extensions ?? []).map((e) => e.name).filter((n) => n.startsWith('cncore'))")

        for wf in config["workflows"]:
            path = Path(wf)
            name = path.stem
            console.clear()
            _drop(page, path)
            entry: dict = {"dialogs": _dialogs(page)}
            entry["saved"] = page.evaluate(SAVED)  # what Save and Run would send, before anything is touched
            entry["graph"] = page.evaluate(GRAPH_STATE)
            page.screenshot(path=str(out / f"{name}_loaded.png"))

            entry["labels"] = _labels(page, entry["graph"])

            pre = [n["id"] for n in entry["graph"]["nodes"] if n["type"] == "CNCore_Preprocessor"]
            entry["visible"] = {}
            entry["preview"] = {}
            for i, nid in enumerate(pre):
                original = page.evaluate(f"() => window.app.graph.getNodeById({nid}).widgets"
                                         ".find((w) => w.name === 'method').value")
                visible = {original: page.evaluate(VISIBLE_WIDGETS, nid)}
                heights = {}
                if i == 0:  # switching methods: once per workflow is enough
                    for method in config["methods"]:
                        heights[method] = page.evaluate(SET_METHOD, [nid, method])
                        visible[method] = page.evaluate(VISIBLE_WIDGETS, nid)
                    page.evaluate(SET_METHOD, [nid, original])
                    page.wait_for_timeout(300)  # a frame, so the widgets have their new places
                entry["visible"][nid] = {"methods": visible, "heights": heights}
                entry["preview"][nid] = _press_preview(page, nid, vue)
            page.mouse.move(VIEWPORT["width"] - 4, 300)  # no tooltip in the screenshot
            page.wait_for_timeout(500)
            entry["graph_after_preview"] = page.evaluate(GRAPH_STATE)
            page.screenshot(path=str(out / f"{name}_preview.png"))
            page.evaluate(OVERLAYS, "hidden")  # the graph alone, for the workflow's thumbnail
            page.wait_for_timeout(300)
            page.screenshot(path=str(out / f"{name}_canvas.png"), clip=_graph_clip(entry["graph_after_preview"]))
            page.evaluate(OVERLAYS, "visible")
            entry["console"] = list(console)
            if pre:  # a request the server refuses: the sentence shows in the node, not in the console
                original = page.evaluate(f"() => window.app.graph.getNodeById({pre[0]}).widgets"
                                         ".find((w) => w.name === 'method').value")
                page.evaluate(SET_METHOD, [pre[0], "inpaint"])  # no mask is connected
                page.wait_for_timeout(300)
                entry["error_preview"] = _press_preview(page, pre[0], vue)
                page.screenshot(path=str(out / f"{name}_error.png"))
                page.evaluate(SET_METHOD, [pre[0], original])
            # the refused preview's own lines (Chromium logs every 4xx answer as "Failed to load resource")
            entry["console_refused_preview"] = console[len(entry["console"]):]
            entry["deprecations"] = page.evaluate("() => window.cncoreDeprecations")
            result["workflows"][name] = entry

        # The template browser: our workflows with their thumbnails.
        responses.clear()
        console.clear()
        page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        page.wait_for_timeout(2500)
        modules = page.locator("text=" + config["category"])
        category_shown = modules.count() > 0
        if category_shown:
            modules.first.click()
            page.wait_for_timeout(2500)
        cards = page.locator("[data-testid^='template-workflow-']")
        for i in range(cards.count()):  # thumbnails load lazily: bring every card into view once
            cards.nth(i).scroll_into_view_if_needed()
            page.wait_for_timeout(300)
        if cards.count():
            cards.first.scroll_into_view_if_needed()
            page.wait_for_timeout(1000)
        page.screenshot(path=str(out / "templates.png"))
        result["templates"] = {
            "responses": [(s, u) for s, u in responses if "/workflow_templates/" in u],
            "console": list(console),
            "deprecations": page.evaluate("() => window.cncoreDeprecations"),
            "cards": cards.all_inner_texts(),
            "category_shown": category_shown,
        }
        browser.close()
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
