// ControlNet Preprocessor (CNCore) in the front end:
//  - only the widgets the chosen method reads are shown (the server lists them per method in the
//    node definition: input "method", option "cncore_inputs"); hidden widgets keep their values and
//    are still saved, so saved workflows and API prompts do not change;
//  - a "Preview hint" button (and an optional auto preview) asks POST /cncore/preview for the hint of
//    the image coming from a Load Image node, or of the image the node got on its last run, and shows
//    it inside the node; problems are shown there as a sentence.
// Plain ES module on the front end's shims; no build step.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "CNCore_Preprocessor";
const ONCE = Symbol.for("cncore.preprocessor"); // the web folder can be served twice (see pyproject.toml)
const AUTO = "cncore_auto_preview"; // node property: preview after every change
const MAX_PREVIEW_HEIGHT = 256; // tests/test_workflows.py PREVIEW_ROOM keeps this much room below the node

function hideWidget(node, widget, hide) {
  if (!!widget.hidden === hide) return;
  widget.hidden = hide;
  // The front end skips hidden widgets when drawing and sizing, but still gives them a row when it
  // arranges the node; a zero (-4 + 4 margin) height removes that gap.
  if (hide) widget.computeSize = () => [0, -4];
  else delete widget.computeSize;
}

// Connectivity through the node's own methods where the front end has them (newer ones deprecate
// reading `input.link`, and warn on it); the plain field where it does not.
function isConnected(node, slot) {
  if (typeof node.isInputConnected === "function") return node.isInputConnected(slot);
  return node.inputs?.[slot]?.link != null;
}

function inputLink(node, slot) {
  if (slot == null || slot < 0 || !isConnected(node, slot)) return null;
  if (typeof node.getInputLink === "function") return node.getInputLink(slot) ?? null;
  return linkOf(node.graph, node.inputs[slot].link) ?? null;
}

function isLinked(node, name) {
  const slot = node.inputs?.findIndex((i) => i.widget?.name === name || i.name === name) ?? -1;
  return slot >= 0 && isConnected(node, slot);
}

function relayout(node) {
  const table = node.constructor.cncoreInputs;
  if (!table) return;
  const method = node.widgets?.find((w) => w.name === "method")?.value;
  const used = new Set(table[method] ?? Object.values(table).flat());
  for (const w of node.widgets ?? []) {
    if (node.constructor.cncoreParams.has(w.name)) hideWidget(node, w, !used.has(w.name) && !isLinked(node, w.name));
  }
  fitHeight(node);
}

function fitHeight(node) {
  const [, h] = node.computeSize();
  node.setSize([node.size[0], h]);
  node.setDirtyCanvas?.(true, true);
}

// ------------------------------------------------------------------------------------------
// where the image comes from

// A link by id: newer frontends keep a graph's links in a Map, older ones in a plain object.
function linkOf(graph, id) {
  return graph?.links?.get?.(id) ?? graph?.links?.[id];
}

function sourceOf(node, inputName) {
  const slot = node.findInputSlot?.(inputName) ?? node.inputs?.findIndex((i) => i.name === inputName);
  const link = inputLink(node, slot);
  let origin = link ? node.graph.getNodeById(link.origin_id) : null;
  let originSlot = link?.origin_slot;
  for (let hops = 0; origin && origin.type === "Reroute" && hops < 32; hops++) { // old reroute nodes
    const l = inputLink(origin, 0);
    origin = l ? node.graph.getNodeById(l.origin_id) : null;
    originSlot = l?.origin_slot;
  }
  return origin ? { node: origin, slot: originSlot } : null;
}

// Load Image's value: "name.png", "sub/dir/name.png" or "name.png [output]".
function imageRef(loadImageNode) {
  let value = String(loadImageNode.widgets?.find((w) => w.name === "image")?.value ?? "");
  let type = "input";
  const m = value.match(/^(.*) \[(input|output|temp)\]$/);
  if (m) [, value, type] = m;
  const cut = value.lastIndexOf("/");
  return { filename: value.slice(cut + 1), subfolder: cut >= 0 ? value.slice(0, cut) : "", type };
}

const isLoadImage = (n) => n?.comfyClass === "LoadImage" || n?.type === "LoadImage";

function latentSize(node) {
  const src = sourceOf(node, "latent");
  const w = src?.node.widgets?.find((x) => x.name === "width")?.value;
  const h = src?.node.widgets?.find((x) => x.name === "height")?.value;
  return Number.isInteger(w) && Number.isInteger(h) ? [h, w] : null;
}

function previewRequest(node) {
  const value = (name) => node.widgets.find((w) => w.name === name)?.value;
  const method = value("method");
  const params = {};
  for (const name of node.constructor.cncoreParams) {
    if (name !== "resolution" && name !== "pixel_perfect") params[name] = value(name);
  }
  const body = { method, params, resolution: value("resolution"), pixel_perfect: value("pixel_perfect") };
  const target = latentSize(node);
  if (target) body.target_hw = target;
  const image = sourceOf(node, "image");
  const mask = sourceOf(node, "mask");
  const needsMask = node.constructor.cncoreNeedsMask.has(method);
  const maskFromFile = isLoadImage(mask?.node) && mask.slot === 1;
  // No mask connected at all: send the image anyway and let the server say that a mask is needed.
  const fromFile = isLoadImage(image?.node) && image.slot === 0 && (!needsMask || !mask || maskFromFile);
  if (fromFile) {
    body.image = imageRef(image.node);
    if (needsMask && maskFromFile) body.mask = imageRef(mask.node);
  } else if (image) {
    body.last_run = String(node.id); // the image of the last run (see nodes/adapter.remember_input)
  }
  return body; // no image at all: the server answers with the sentence to show
}

// ------------------------------------------------------------------------------------------
// the preview area

function addPreviewArea(node) {
  const box = document.createElement("div");
  box.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;overflow:hidden";
  const msg = document.createElement("div");
  msg.style.cssText = "font:12px sans-serif;line-height:16px;white-space:normal;color:var(--descrip-text,#aaa)";
  const img = document.createElement("img");
  img.style.cssText = "flex:1 1 auto;min-height:0;width:100%;object-fit:contain;display:none";
  img.alt = "hint preview";
  box.append(msg, img);
  const MARGIN = 6; // the front end insets a DOM widget by its margin on every side
  const state = { height: 0 };
  const widget = node.addDOMWidget("cncore_preview", "cncore-preview", box, {
    serialize: false,
    hideOnZoom: false,
    margin: MARGIN,
    getMinHeight: () => state.height,
    getMaxHeight: () => state.height,
  });
  widget.serialize = false;
  widget.hidden = true;
  const show = ({ text = "", error = false, src = null } = {}) => {
    msg.textContent = text;
    msg.style.display = text ? "" : "none";
    msg.style.color = error ? "var(--error-text,#f77)" : "var(--descrip-text,#aaa)";
    if (src) {
      if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
      img.src = src;
    }
    img.style.display = img.src && !error ? "" : "none";
    if (error && img.src.startsWith("blob:")) {
      URL.revokeObjectURL(img.src);
      img.removeAttribute("src");
    }
    const width = Math.max(64, node.size[0] - 2 * MARGIN);
    const imageH = img.style.display === "" && img.naturalWidth
      ? Math.min(MAX_PREVIEW_HEIGHT, Math.round((width * img.naturalHeight) / img.naturalWidth)) : 0;
    const textH = text ? 16 * Math.ceil((text.length * 6.5) / width) + 4 : 0;
    const content = imageH + textH + (imageH && textH ? 4 : 0);
    state.height = content ? content + 2 * MARGIN : 0;
    widget.hidden = content === 0;
    fitHeight(node);
  };
  img.addEventListener("load", () => show({ text: msg.textContent }));
  node.cncoreShow = show;
}

async function preview(node) {
  const show = node.cncoreShow;
  const seq = (node.cncoreSeq = (node.cncoreSeq ?? 0) + 1);
  show({ text: "making the preview…" });
  try {
    const r = await api.fetchApi("/cncore/preview", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(previewRequest(node)),
    });
    if (seq !== node.cncoreSeq) return; // a newer request was sent meanwhile
    if (!r.ok) {
      let text = `the preview failed (HTTP ${r.status})`;
      try { text = (await r.json()).error ?? text; } catch { /* not JSON: keep the status line */ }
      show({ text, error: true });
      return;
    }
    // a network method says which weights file it found (routes.py WEIGHTS_HEADER)
    const weights = r.headers.get("X-CNCore-Weights");
    show({ text: weights ? `weights: ${weights}` : "", src: URL.createObjectURL(await r.blob()) });
  } catch (e) {
    if (seq === node.cncoreSeq) show({ text: `the preview could not reach ComfyUI (${e?.message ?? e})`, error: true });
  }
}

function schedulePreview(node) {
  if (!node.properties?.[AUTO]) return;
  clearTimeout(node.cncoreTimer);
  node.cncoreTimer = setTimeout(() => preview(node), 400);
}

// ------------------------------------------------------------------------------------------

if (!globalThis[ONCE]) {
  globalThis[ONCE] = true;
  app.registerExtension({
    name: "cncore.preprocessor",
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (nodeData?.name !== NODE) return;
      const options = nodeData.input?.required?.method?.[1] ?? {};
      nodeType.cncoreInputs = options.cncore_inputs ?? null;
      nodeType.cncoreParams = new Set(Object.values(options.cncore_inputs ?? {}).flat());
      nodeType.cncoreNeedsMask = new Set(options.cncore_needs_mask ?? []);

      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = created?.apply(this, arguments);
        this.properties ??= {};
        this.properties[AUTO] ??= false;
        for (const w of this.widgets ?? []) {
          if (w.name !== "method" && !nodeType.cncoreParams.has(w.name)) continue;
          const cb = w.callback;
          w.callback = (...args) => {
            const out = cb?.apply(w, args);
            if (w.name === "method") relayout(this);
            schedulePreview(this);
            return out;
          };
        }
        const button = this.addWidget("button", "Preview hint", null, () => preview(this), { serialize: false });
        button.serialize = false;
        const auto = this.addWidget("toggle", "auto preview", false, (v) => {
          this.properties[AUTO] = !!v;
          if (v) preview(this);
        }, { on: "on", off: "off", serialize: false });
        auto.serialize = false;
        this.cncoreAuto = auto;
        addPreviewArea(this);
        relayout(this);
        return r;
      };

      const configure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const r = configure?.apply(this, arguments);
        if (this.cncoreAuto) this.cncoreAuto.value = !!this.properties?.[AUTO];
        relayout(this); // the saved method is known only now
        return r;
      };

      const executed = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (output) {
        const r = executed?.apply(this, arguments);
        // a network method's run says which weights file it used (node_defs.py: ui.cncore_weights)
        const weights = output?.cncore_weights?.[0];
        if (weights && this.cncoreShow) this.cncoreShow({ text: `weights: ${weights}` });
        return r;
      };

      const connections = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function () {
        const r = connections?.apply(this, arguments);
        if (this.widgets && this.cncoreShow) relayout(this); // a linked widget stays visible
        return r;
      };
    },
  });
}
