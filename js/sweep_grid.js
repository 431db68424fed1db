// WeGen sweep grid (extension): after a "WeGen Diversity Sweep" node runs, shows its images in a grid (one row
// per prompt, one column per seed) with each image's seed and prompt under it, and the sweep's diversity
// figure. Data comes from the node's `ui` output (wegen_sweep: subfolder, images, prompts, seeds, columns,
// diversity), and the pictures from ComfyUI's /view route (the files the node saved in the output folder).
// Only this node is decorated, and the workflow runs the same without this file.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SWEEP_NODE = "WeGenDiversitySweep";
const STYLE = `
.wegen-sweep{display:flex;flex-direction:column;gap:4px;font:11px sans-serif;color:var(--input-text,#ddd);
  background:var(--comfy-input-bg,#222);border-radius:6px;padding:6px;box-sizing:border-box;overflow:auto}
.wegen-sweep-head{opacity:.8}
.wegen-sweep-grid{display:grid;gap:6px}
.wegen-sweep-cell{display:flex;flex-direction:column;gap:2px;min-width:0}
.wegen-sweep-cell img{width:100%;height:auto;border:1px solid #555;image-rendering:pixelated;cursor:zoom-in}
.wegen-sweep-seed{opacity:.7}
.wegen-sweep-prompt{display:-webkit-box;-webkit-line-clamp:4;-webkit-box-orient:vertical;overflow:hidden}`;

function addStyle() {
  if (document.getElementById("wegen-sweep-style")) return;
  const style = document.createElement("style");
  style.id = "wegen-sweep-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function viewUrl(subfolder, filename, type) {
  const query = new URLSearchParams({ filename, subfolder, type });
  return api.apiURL(`/view?${query}`);
}

function diversityText(d) {
  if (!d) return "";
  const f = (x) => Number(x).toFixed(4);
  return `diversity: features cosine ${f(d.features_cosine)}, features rms ${f(d.features_rms)}, ` +
    `pixels rms ${f(d.pixels_rms)}`;
}

function render(node, shown) {
  const panel = node.wegenSweep;
  const n = shown.images.length;
  panel.head.textContent = `${n} image${n === 1 ? "" : "s"} in ${shown.subfolder} - ${diversityText(shown.diversity)}`;
  panel.grid.style.gridTemplateColumns = `repeat(${Math.max(1, shown.columns)}, minmax(64px, 1fr))`;
  panel.grid.replaceChildren();
  shown.images.forEach((file, i) => {
    const cell = el("div", "wegen-sweep-cell");
    const img = el("img");
    img.src = viewUrl(shown.subfolder, file, shown.type);
    img.loading = "lazy";
    img.title = `${shown.prompts[i]} (seed ${shown.seeds[i]})`;
    img.onclick = () => window.open(img.src, "_blank");
    cell.append(img, el("div", "wegen-sweep-seed", `seed ${shown.seeds[i]}`),
      el("div", "wegen-sweep-prompt", shown.prompts[i]));
    panel.grid.appendChild(cell);
  });
  node.setSize([Math.max(node.size[0], 120 * Math.min(shown.columns, 6)), Math.max(node.size[1], 560)]);
  app.graph?.setDirtyCanvas(true, true);
}

function buildPanel(node) {
  addStyle();
  const root = el("div", "wegen-sweep");
  const head = el("div", "wegen-sweep-head", "Queue the workflow: the sweep's images appear here.");
  const grid = el("div", "wegen-sweep-grid");
  root.append(head, grid);
  const widget = node.addDOMWidget("sweep_grid", "wegen_sweep_grid", root, {
    serialize: false, hideOnZoom: false, getMinHeight: () => 160, getMaxHeight: () => 1600,
  });
  widget.serialize = false; // not part of widgets_values: saved workflows keep their widget order
  node.wegenSweep = { root, head, grid };
}

app.registerExtension({
  name: "wegen.sweep_grid",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== SWEEP_NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      buildPanel(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const shown = message?.wegen_sweep?.[0];
      if (shown && this.wegenSweep) render(this, shown);
    };
  },
});
