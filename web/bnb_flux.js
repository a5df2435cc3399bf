// comfyui-bnb-flux frontend: after a run, shows on the node what it did, from the node's `ui` output.
//   Load BnB Flux      -> quant type, quantized layers, resident size (ui.bnb_flux)
//   Apply Control LoRA -> control/style, format, rank, layers, widened inputs; warnings (ui.bnb_flux_lora)
import { app } from "../../scripts/app.js";

const STYLE = `
.bnb-flux-badge { font: 11px/1.35 monospace; padding: 4px 6px; border-radius: 4px; white-space: pre;
  background: #1d3b2a; color: #d6f5df; overflow: auto; }
.bnb-flux-badge.bnb-flux-warn { background: #4a3410; color: #ffe2a8; }
`;

function mib(bytes) {
  return `${(bytes / 2 ** 20).toFixed(bytes < 2 ** 30 ? 1 : 0)} MiB`;
}

export function describeModel(info) {
  const lines = [`${info.quant}`,
    `${info.quantized_layers} of ${info.linear_layers} Linear layers quantized`,
    `${mib(info.size_bytes)} resident, compute ${info.compute_dtype}`];
  if (info.prequantized) lines.push("pre-quantized file: its own quantization is used");
  for (const note of info.notes || []) lines.push(`note: ${note}`);
  return { text: lines.join("\n"), warn: false };
}

export function describeLora(info) {
  const widened = Object.entries(info.widened || {}).map(([m, w]) => `${m} widened to ${w} inputs`);
  const lines = [`${info.kind === "control" ? "Control" : "Style"} LoRA (${info.format}), strength ${info.strength}`,
    `rank ${info.rank}, ${info.layers} layers` + (info.norm_sets ? `, ${info.norm_sets} norm scales` : ""),
    ...widened];
  for (const w of info.warnings || []) lines.push(`\u26a0 ${w}`);
  return { text: lines.join("\n"), warn: (info.warnings || []).length > 0 };
}

const HANDLERS = { LoadBnbFlux: ["bnb_flux", describeModel], ApplyControlLora: ["bnb_flux_lora", describeLora] };

function showBadge(node, { text, warn }) {
  let widget = node.widgets?.find((w) => w.name === "bnb_flux_info");
  if (!widget) {
    const el = document.createElement("div");
    el.className = "bnb-flux-badge";
    // the node makes room for every line of the badge
    const height = () => 20 + 16 * (el.textContent.split("\n").length || 1);
    widget = node.addDOMWidget("bnb_flux_info", "bnb_flux_info", el, {
      serialize: false, hideOnZoom: false, getMinHeight: height, getMaxHeight: height });
    widget.serialize = false;
  }
  widget.element.textContent = text;
  widget.element.classList.toggle("bnb-flux-warn", warn);
  widget.element.title = text;
  const size = node.computeSize();
  node.setSize?.([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1] + 10)]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "comfyui-bnb-flux",
  setup() {
    const style = document.createElement("style");
    style.textContent = STYLE;
    document.head.appendChild(style);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const handler = HANDLERS[nodeData.name];
    if (!handler) return;
    const [key, describe] = handler;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const info = message?.[key]?.[0];
      if (info) showBadge(this, describe(info));
    };
  },
});
