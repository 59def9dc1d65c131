// Load ControlNet (CNCore) in the front end: under the file name, what the file is — family, base
// model and layout, e.g. "ControlNet · SDXL · diffusers" — read by GET /cncore/model_info from the
// file's header (no weights are loaded). A file the pack cannot run says so before anything is queued.
// Plain ES module on the front end's shims; no build step.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "CNCore_LoadControlNet";
const ONCE = Symbol.for("cncore.loader"); // the web folder can be served twice (see pyproject.toml)
const known = new Map(); // file name -> answer, for this page (the header of a name does not change)

async function describe(name) {
  if (!name) return { text: "choose a ControlNet file", warn: true };
  if (!known.has(name)) {
    known.set(name, (async () => {
      try {
        const r = await api.fetchApi(`/cncore/model_info?name=${encodeURIComponent(name)}`);
        const body = await r.json();
        if (!r.ok) return { text: body.error ?? `no information (HTTP ${r.status})`, warn: true };
        // Not downloaded yet is an expected state (ComfyUI's Missing Models dialog names the file):
        // say so in the node's normal colour, and ask again once the file is there
        if (body.found === false) {
          known.delete(name);
          return { text: body.label, warn: false };
        }
        return { text: body.label, warn: !body.supported };
      } catch (e) {
        known.delete(name); // try again next time
        return { text: `could not ask ComfyUI about this file (${e?.message ?? e})`, warn: true };
      }
    })());
  }
  return known.get(name);
}

// The label always takes LINES lines (the longest label, "ControlNet Union / ProMax (xinsir) · SDXL ·
// diffusers", takes two at the default width); longer text is cut with an ellipsis and shown whole
// as the tooltip. So the node's size never depends on the answer, nor on whether the file is there:
// the sizes saved in workflows/*.json are the ones the user sees (tests/test_browser.py).
const LINES = 2;
const LINE_H = 16;
const MARGIN = 4; // the front end insets a DOM widget by its margin on every side
const LABEL_HEIGHT = LINES * LINE_H + 4 + 2 * MARGIN;

function addLabel(node) {
  const label = document.createElement("div");
  label.style.cssText = `font:12px sans-serif;line-height:${LINE_H}px;padding:0 4px;white-space:normal;`
    + `overflow:hidden;text-overflow:ellipsis;display:-webkit-box;-webkit-box-orient:vertical;`
    + `-webkit-line-clamp:${LINES};line-clamp:${LINES};max-height:${LINES * LINE_H}px;overflow-wrap:anywhere;`
    + "color:var(--descrip-text,#aaa)";
  const widget = node.addDOMWidget("cncore_model_info", "cncore-model-info", label, {
    serialize: false,
    hideOnZoom: false,
    margin: MARGIN,
    getMinHeight: () => LABEL_HEIGHT,
    getMaxHeight: () => LABEL_HEIGHT,
  });
  widget.serialize = false;
  const update = async () => {
    const name = node.widgets?.find((w) => w.name === "control_net_name")?.value;
    const { text, warn } = await describe(name);
    if (node.widgets?.find((w) => w.name === "control_net_name")?.value !== name) return; // changed meanwhile
    label.textContent = text;
    label.title = text;
    label.style.color = warn ? "var(--error-text,#f77)" : "var(--descrip-text,#aaa)";
    node.setDirtyCanvas?.(true, true);
  };
  return update;
}

if (!globalThis[ONCE]) {
  globalThis[ONCE] = true;
  app.registerExtension({
    name: "cncore.loader",
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (nodeData?.name !== NODE) return;
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = created?.apply(this, arguments);
        this.cncoreUpdate = addLabel(this);
        const w = this.widgets?.find((x) => x.name === "control_net_name");
        if (w) {
          const cb = w.callback;
          w.callback = (...args) => {
            const out = cb?.apply(w, args);
            this.cncoreUpdate();
            return out;
          };
        }
        this.cncoreUpdate();
        return r;
      };
      const configure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const r = configure?.apply(this, arguments);
        this.cncoreUpdate?.(); // the saved file name is known only now
        return r;
      };
    },
  });
}
