// comfyui-bnb-flux frontend. Badges: after a run, each node of the pack shows what it did, from its `ui` output.
//   Load BnB Flux      -> quant type, quantized layers, resident size; inputs a pre-quantized file overrides
//   Apply Control LoRA -> control/style, format, rank, layers, widened inputs, warnings; a rescale downstream
//   Apply LoRA Stack   -> each slot: applied (as above) or off
//   Set LoRA Scale     -> the LoRA and its strength, old -> new
//   Save BnB Flux      -> the saved file (under the output directory) and its size
// A badge is dimmed when a run starts, says "running..." while its node runs, and "failed: <message>" when
// its node fails; one from an earlier run that this run used from ComfyUI's cache is shown as it was.
// Widgets: Load BnB Flux greys out quant_type/double_quant for a pre-quantized file (asks the server's
// GET /bnb_flux/model_info); Set LoRA Scale takes the nearest LoRA applied upstream when its model input
// is connected; Apply LoRA Stack shows its filled slots and one empty slot.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const STYLE = `
.bnb-flux-badge { font: 11px/1.35 monospace; padding: 4px 6px; border-radius: 4px; box-sizing: border-box;
  white-space: pre-wrap; overflow-wrap: anywhere; overflow: hidden; background: #1d3b2a; color: #d6f5df; }
.bnb-flux-badge.bnb-flux-warn { background: #4a3410; color: #ffe2a8; }
.bnb-flux-badge.bnb-flux-error { background: #5c1f1f; color: #ffd9d9; }
.bnb-flux-badge.bnb-flux-stale { opacity: 0.55; }
`;
const BADGE = "bnb_flux_info";
const WIDGET_MARGIN = 10; // the frontend's DOM widget margin, each side
const STACK_SLOTS = 6;
const EMPTY_SLOT = "None";
const ERROR_SHOWN = 600; // characters of a failure message on the badge (the tooltip has all of it)

function mib(bytes) {
  return `${(bytes / 2 ** 20).toFixed(bytes < 2 ** 30 ? 1 : 0)} MiB`;
}

function kindName(info) {
  return `${info.kind === "control" ? "Control" : "Style"} LoRA (${info.format})`;
}

// "; rescaled downstream to 0.85 (Set LoRA Scale #7)" for the LoRA `name`, from the node's rescale notes
function rescaledNote(rescaled, name, strength) {
  const notes = [...(rescaled?.values() || [])].filter((r) => r.name === name && r.to !== strength);
  return notes.length ? `; rescaled downstream to ${notes.map((r) => `${r.to} (Set LoRA Scale #${r.by})`).join(", ")}` : "";
}

function loraLines(info, rescaled) {
  const lines = [`${kindName(info)}, strength ${info.strength}${rescaledNote(rescaled, info.name, info.strength)}`,
    `rank ${info.rank}, ${info.layers} layers` + (info.norm_sets ? `, ${info.norm_sets} norm scales` : "")];
  for (const [module, width] of Object.entries(info.widened || {})) lines.push(`${module} widened to ${width} inputs`);
  for (const w of info.warnings || []) lines.push(`\u26a0 ${w}`);
  return lines;
}

export function describeModel(info) {
  const lines = [`${info.quant}`,
    `${info.quantized_layers} of ${info.linear_layers} Linear layers quantized`,
    `${mib(info.size_bytes)} resident, compute ${info.compute_dtype}`];
  if (info.prequantized) {
    lines.push(`pre-quantized file${info.file_quantization ? ` (${info.file_quantization})` : ""}: its own quantization is used`);
  }
  for (const unused of info.unused_inputs || []) lines.push(`\u26a0 ${unused}`);
  for (const note of info.notes || []) lines.push(`note: ${note}`);
  return { text: lines.join("\n"), warn: (info.unused_inputs || []).length > 0 };
}

export function describeLora(info, rescaled) {
  return { text: loraLines(info, rescaled).join("\n"), warn: (info.warnings || []).length > 0 };
}

export function describeStack(slots, rescaled) {
  if (!slots.length) return { text: "no LoRA applied (every slot empty or off)", warn: false };
  const lines = [];
  for (const slot of slots) {
    if (slot.state === "off") {
      lines.push(`${slot.slot}. ${slot.name}: off (skipped)`);
      continue;
    }
    const [first, ...rest] = loraLines(slot, rescaled);
    lines.push(`${slot.slot}. ${slot.name}: ${first}`, ...rest.map((line) => `   ${line}`));
  }
  return { text: lines.join("\n"), warn: slots.some((s) => (s.warnings || []).length > 0) };
}

export function describeScale(info) {
  return { text: `${info.name}: strength ${info.from} -> ${info.to} (no reload)`, warn: false };
}

export function describeSaved(info) {
  return { text: `saved ${info.path}\n${mib(info.size_bytes)}, ${info.quant_type}, ${info.quantized_layers} of ` +
    `${info.linear_layers} Linear layers quantized`, warn: false };
}

// node type -> [ui key, describe(value, rescale notes), whole list (true) or its first item]
const HANDLERS = {
  LoadBnbFlux: ["bnb_flux", describeModel, false],
  ApplyControlLora: ["bnb_flux_lora", describeLora, false],
  ApplyLoraStack: ["bnb_flux_stack", describeStack, true],
  SetLoraScale: ["bnb_flux_scale", describeScale, false],
  SaveBnbFlux: ["bnb_flux_saved", describeSaved, false],
};

// --- the badge: a DOM widget whose text wraps inside the node; the node grows to fit it ---------------------

let measurer = null;
function textHeight(text, width) {
  if (!measurer) {
    measurer = document.createElement("div");
    measurer.className = "bnb-flux-badge";
    Object.assign(measurer.style, { position: "absolute", visibility: "hidden", left: "-10000px", top: "0",
      height: "auto" });
    document.body.appendChild(measurer);
  }
  measurer.style.width = `${Math.max(width, 40)}px`;
  measurer.textContent = text;
  return measurer.offsetHeight;
}

const badged = new Set(); // nodes that show a badge
let seenThisRun = new Set(); // nodes the current (or last) run executed or used from the cache

function badgeWidget(node) {
  let badge = widget(node, BADGE);
  if (!badge) {
    const el = document.createElement("div");
    el.className = "bnb-flux-badge";
    // the wrapped text at the node's width, plus the margin the frontend takes off above and below
    const height = () => textHeight(el.textContent, node.size[0] - 2 * WIDGET_MARGIN) + 2 * WIDGET_MARGIN + 1;
    badge = node.addDOMWidget(BADGE, BADGE, el, {
      serialize: false, hideOnZoom: false, getMinHeight: height, getMaxHeight: height });
    badge.serialize = false;
  }
  return badge;
}

// state: "ok", "warn", "error" or "stale" (dimmed); `dimmed` dims a badge of any state
function setBadge(node, text, state, dimmed = false) {
  const widget = badgeWidget(node);
  const el = widget.element;
  el.textContent = text;
  el.title = text;
  for (const s of ["warn", "error"]) el.classList.toggle(`bnb-flux-${s}`, state === s);
  el.classList.toggle("bnb-flux-stale", dimmed || state === "stale");
  badged.add(node);
  node.setSize?.([node.size[0], node.computeSize()[1]]);
  node.setDirtyCanvas?.(true, true);
}

function widgetElement(node) {
  return widget(node, BADGE)?.element;
}

function hasBadge(node) {
  return !!widgetElement(node);
}

function render(node) {
  const shown = node.__bnbFlux;
  if (!shown) return;
  const { text, warn } = shown.describe(shown.info, shown.rescaled);
  // a badge this run has not reached yet stays dimmed when a rescale note changes
  const dimmed = !!widgetElement(node)?.classList.contains("bnb-flux-stale") && !seenThisRun.has(node);
  setBadge(node, text, warn ? "warn" : "ok", dimmed);
}

// --- Set LoRA Scale marks the strength of the node that applied the LoRA --------------------------------------

function nodeByExecutionId(id) {
  // "12" or, inside subgraphs, "5:12" (the subgraph node's id, then the node's own)
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    node = graph?.getNodeById?.(part) ?? graph?.getNodeById?.(Number(part));
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

// a node's class: its `type` is set only after its constructor, which is where nodeCreated runs
function typeOf(node) {
  return node?.comfyClass ?? node?.constructor?.comfyClass ?? node?.type;
}

function forgetRescale(scaleNode) {
  const target = scaleNode.__bnbFluxTarget;
  if (target?.__bnbFlux?.rescaled.delete(scaleNode)) render(target);
  scaleNode.__bnbFluxTarget = null;
}

function noteRescale(scaleNode, info) {
  forgetRescale(scaleNode);
  const target = info.applied_by != null ? nodeByExecutionId(info.applied_by) : null;
  if (!target?.__bnbFlux) return;
  target.__bnbFlux.rescaled.set(scaleNode, { name: info.name, to: info.to, by: scaleNode.id });
  scaleNode.__bnbFluxTarget = target;
  render(target);
}

// --- run events ----------------------------------------------------------------------------------------------

function live(node) {
  if (node.graph) return true;
  badged.delete(node);
  return false;
}

function onExecutionStart() {
  seenThisRun = new Set();
  for (const node of [...badged]) {
    if (live(node)) widgetElement(node)?.classList.add("bnb-flux-stale");
  }
}

function onCached({ detail }) {
  for (const id of detail?.nodes || []) {
    const node = nodeByExecutionId(id);
    if (!node) continue;
    seenThisRun.add(node);
    widgetElement(node)?.classList.remove("bnb-flux-stale");
  }
}

function onExecuting({ detail }) {
  const id = detail && typeof detail === "object" ? detail.display_node ?? detail.node : detail;
  if (id == null) return;
  const node = nodeByExecutionId(id);
  if (!node) return;
  seenThisRun.add(node);
  if (node.__bnbFlux) node.__bnbFlux.rescaled.clear();
  if (typeOf(node) === "SetLoraScale") forgetRescale(node);
  if (hasBadge(node)) {
    node.__bnbFlux = null;
    setBadge(node, "running...", "stale");
  }
}

function onFailed(node, text) {
  if (!node || !HANDLERS[typeOf(node)]) return;
  if (typeOf(node) === "SetLoraScale") forgetRescale(node);
  node.__bnbFlux = null;
  setBadge(node, text, "error");
}

function onExecutionError({ detail }) {
  onRunEnd();
  const node = nodeByExecutionId(detail?.node_id);
  const message = String(detail?.exception_message ?? "").trim();
  const shown = message.length > ERROR_SHOWN ? `${message.slice(0, ERROR_SHOWN)}...` : message;
  onFailed(node, `failed: ${shown}`);
  const el = node && HANDLERS[typeOf(node)] ? widgetElement(node) : null;
  if (el) el.title = `failed (${detail?.exception_type}): ${message}`;
}

function onInterrupted({ detail }) {
  onRunEnd();
  onFailed(nodeByExecutionId(detail?.node_id), "interrupted");
}

function onRunEnd() {
  // a Set LoRA Scale this run did not use (bypassed, removed, cut off by a failure) rescales nothing it ran
  for (const node of [...badged]) {
    if (!live(node) || !node.__bnbFlux) continue;
    let changed = false;
    for (const scaleNode of [...node.__bnbFlux.rescaled.keys()]) {
      if (!seenThisRun.has(scaleNode)) changed = node.__bnbFlux.rescaled.delete(scaleNode) || changed;
    }
    if (changed) render(node);
  }
}

// --- widgets ---------------------------------------------------------------------------------------------------

function widget(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

// the label the frontend gives a widget: its input's (translated) name
function ownLabel(node, w) {
  const input = node.inputs?.find((i) => i.widget?.name === w.name);
  return input?.label ?? input?.localized_name ?? w.name;
}

// Load BnB Flux: quant_type and double_quant greyed out, labelled with the file's own scheme, when the chosen
// file is pre-quantized; as they were otherwise (or when the server cannot tell).
async function showFileQuantization(node) {
  const unet = widget(node, "unet_name");
  const quant = widget(node, "quant_type");
  const double = widget(node, "double_quant");
  if (!unet || !quant || !double) return;
  const ticket = (node.__bnbFluxInfoTicket = (node.__bnbFluxInfoTicket || 0) + 1);
  let info = null;
  try {
    const response = await api.fetchApi(`/bnb_flux/model_info?name=${encodeURIComponent(unet.value)}`);
    if (response.ok) info = await response.json();
  } catch (e) {
    info = null;
  }
  if (ticket !== node.__bnbFluxInfoTicket) return; // another file was chosen meanwhile
  const fromFile = info?.prequantized === true;
  for (const w of [quant, double]) {
    w.disabled = fromFile;
    w.label = ownLabel(node, w);
  }
  if (fromFile) {
    quant.label = `quant_type: ${info.quant_type} (from file)`;
    double.label = info.double_quant == null ? `double_quant: not used (${info.quant_type} file)`
      : `double_quant: ${info.double_quant ? "on" : "off"} (from file)`;
    // a greyed toggle still draws its own value: show none (a copy: the options object may be shared)
    double.__bnbFluxOptions ??= double.options;
    double.options = { ...double.__bnbFluxOptions, on: " ", off: " " };
  } else if (double.__bnbFluxOptions) {
    double.options = double.__bnbFluxOptions;
  }
  node.__bnbFluxFileQuantization = info;
  node.setDirtyCanvas?.(true, true);
}

function afterChange(w, action) {
  if (!w || w.__bnbFluxHooked) return;
  w.__bnbFluxHooked = true;
  const callback = w.callback;
  w.callback = function () {
    const result = callback?.apply(this, arguments);
    action();
    return result;
  };
}

// Names of the LoRAs applied upstream of `node`'s model input, nearest first (as far as the editor can follow
// MODEL links: any node with a MODEL input passes the walk on).
export function loraNamesUpstream(node) {
  const names = [];
  const seen = new Set();
  let current = node;
  while (current && !seen.has(current)) {
    seen.add(current);
    const input = current.inputs?.find((i) => i.type === "MODEL") ?? (typeOf(current) === "Reroute" ? current.inputs?.[0] : null);
    const link = input?.link != null ? current.graph?.links?.get?.(input.link) ?? current.graph?.links?.[input.link] : null;
    const origin = link ? current.graph.getNodeById(link.origin_id) : null;
    if (!origin) break;
    if (origin.mode === 0 || origin.mode == null) { // bypassed (4) or muted (2) nodes apply nothing
      if (typeOf(origin) === "ApplyControlLora") names.push(widget(origin, "lora_name")?.value);
      if (typeOf(origin) === "ApplyLoraStack") {
        for (let i = STACK_SLOTS; i >= 1; i--) {
          const name = widget(origin, `lora_${i}`)?.value;
          if (name && name !== EMPTY_SLOT && widget(origin, `on_${i}`)?.value !== false) names.push(name);
        }
      }
    }
    current = origin;
  }
  return names.filter((n) => typeof n === "string");
}

// Set LoRA Scale: on connecting its model, lora_name becomes the nearest LoRA applied upstream unless it already
// names one of them (the file list holds every LoRA, and its first entry is rarely applied)
function fillLoraName(node) {
  const name = widget(node, "lora_name");
  if (!name) return;
  const upstream = loraNamesUpstream(node);
  if (upstream.length && !upstream.includes(name.value)) {
    name.value = upstream[0];
    node.setDirtyCanvas?.(true, true);
  }
}

// Apply LoRA Stack: the filled slots and one empty slot to fill next; an empty slot shows only its file
function arrangeSlots(node) {
  let last = 0;
  for (let i = 1; i <= STACK_SLOTS; i++) {
    const name = widget(node, `lora_${i}`)?.value;
    if (name && name !== EMPTY_SLOT) last = i;
  }
  for (let i = 1; i <= STACK_SLOTS; i++) {
    const name = widget(node, `lora_${i}`);
    const empty = !name?.value || name.value === EMPTY_SLOT;
    const shown = i <= last + 1;
    if (name) name.hidden = !shown;
    for (const w of [widget(node, `strength_${i}`), widget(node, `on_${i}`)]) if (w) w.hidden = !shown || empty;
  }
  node.setSize?.([node.size[0], node.computeSize()[1]]);
  node.setDirtyCanvas?.(true, true);
}

function prepare(node) {
  if (typeOf(node) === "LoadBnbFlux") {
    afterChange(widget(node, "unet_name"), () => showFileQuantization(node));
    showFileQuantization(node);
  } else if (typeOf(node) === "ApplyLoraStack") {
    for (let i = 1; i <= STACK_SLOTS; i++) afterChange(widget(node, `lora_${i}`), () => arrangeSlots(node));
    arrangeSlots(node);
  }
}

app.registerExtension({
  name: "comfyui-bnb-flux",
  setup() {
    const style = document.createElement("style");
    style.textContent = STYLE;
    document.head.appendChild(style);
    api.addEventListener("execution_start", onExecutionStart);
    api.addEventListener("execution_cached", onCached);
    api.addEventListener("executing", onExecuting);
    api.addEventListener("execution_error", onExecutionError);
    api.addEventListener("execution_interrupted", onInterrupted);
    api.addEventListener("execution_success", onRunEnd);
  },
  nodeCreated(node) {
    prepare(node);
  },
  loadedGraphNode(node) {
    prepare(node);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const handler = HANDLERS[nodeData.name];
    if (!handler) return;
    const [key, describe, whole] = handler;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const value = message?.[key];
      const info = whole ? value : value?.[0];
      if (!info) return;
      seenThisRun.add(this);
      this.__bnbFlux = { info, describe, rescaled: this.__bnbFlux?.rescaled ?? new Map() };
      render(this);
      if (nodeData.name === "SetLoraScale") noteRescale(this, info);
    };
    if (nodeData.name === "SetLoraScale") {
      const onConnectionsChange = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function (type, index, connected, link, slot) {
        const result = onConnectionsChange?.apply(this, arguments);
        // type 1: an input; while a workflow loads, its saved lora_name stays
        if (connected && type === 1 && slot?.type === "MODEL" && !app.configuringGraph) fillLoraName(this);
        return result;
      };
    }
  },
});
