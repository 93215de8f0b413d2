// MoA router viewer: on the MoA Router Masks node, scrub the sampling steps and layer groups of
// the last run's router maps over the generated image, without running the graph again.
//
// The node (nodes/host/viewer.py) puts a description in its ui output under "moa_router_viewer":
//   {version: 1, steps, sigmas[steps + 1], acted[steps], batch, group, tile: [h, w], columns,
//    groups: {name: file}, size: [h, w], pictures: {...file, count, columns} | null,
//    colormap: {anchors, colours, alpha}}
// A file is {filename, subfolder, type}, served by ComfyUI's /view. Each group's file is a grayscale
// atlas: tile k = image * steps + step sits at column k % columns, row floor(k / columns), and its
// grey is the mean r1 of the group's layers (0: the prior painted, 255: the personal expert).
// The colours come with the data, from moa_core/render.py, so the viewer matches the node's images.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "MoARouterMasks";
const UI_KEY = "moa_router_viewer";
const VERSION = 1;
const HEIGHT = 280; // the widget's height once there is something to show

// 256 RGB entries (0..255) of the piecewise linear colormap, one per grey level of the atlas.
function colourTable({ anchors, colours }) {
  const table = [];
  for (let level = 0; level < 256; level++) {
    const v = level / 255;
    let i = 1;
    while (i < anchors.length - 1 && v > anchors[i]) i++;
    const t = (v - anchors[i - 1]) / (anchors[i] - anchors[i - 1]);
    table.push(colours[i].map((c, channel) => 255 * (colours[i - 1][channel] * (1 - t) + c * t)));
  }
  return table;
}

function viewUrl({ filename, subfolder, type }) {
  return api.apiURL(`/view?${new URLSearchParams({ filename, subfolder, type })}`);
}

async function loadImage(url) {
  const image = new Image();
  image.src = url;
  await image.decode();
  return image;
}

// Pixels of one w x h tile of `source` at (x, y), drawn at width x height. Scaling is bilinear, and
// the tile is copied out first so that smoothing never reads its neighbours in the atlas.
function tilePixels(source, x, y, w, h, width, height) {
  const tile = document.createElement("canvas");
  [tile.width, tile.height] = [w, h];
  tile.getContext("2d").drawImage(source, x, y, w, h, 0, 0, w, h);
  const scaled = document.createElement("canvas");
  [scaled.width, scaled.height] = [width, height];
  const context = scaled.getContext("2d", { willReadFrequently: true });
  context.imageSmoothingEnabled = true;
  context.drawImage(tile, 0, 0, width, height);
  return context.getImageData(0, 0, width, height).data;
}

function element(tag, style, properties = {}) {
  const node = document.createElement(tag);
  Object.assign(node.style, style);
  return Object.assign(node, properties);
}

class RouterViewer {
  constructor() {
    this.data = null;
    this.images = new Map(); // url -> Promise<HTMLImageElement>, for the current run only
    this.draws = 0; // a draw that finds a newer one started while it loaded gives way
    const input = { background: "var(--comfy-input-bg)", color: "var(--input-text)", fontSize: "12px" };
    this.element = element("div", { display: "flex", flexDirection: "column", gap: "4px", height: "100%" });
    this.element.className = "moa-router-viewer";
    this.group = element("select", { ...input, flex: "1 1 auto" }, { title: "Layer group to show" });
    this.picture = element("select", { ...input, display: "none" }, { title: "Image of the batch" });
    this.step = element("input", { flex: "2 1 auto", minWidth: "60px" }, { type: "range", min: 0, step: 1 });
    this.step.title = "Sampling step";
    this.label = element("div", { color: "var(--descrip-text)", fontSize: "11px", whiteSpace: "nowrap" });
    this.label.textContent = "Run the graph to see where the personal expert painted.";
    this.canvas = element("canvas", { flex: "1 1 0", minHeight: "0", width: "100%", objectFit: "contain" });
    this.canvas.style.display = "none";
    this.controls = element("div", { display: "none", gap: "4px", alignItems: "center" });
    this.controls.append(this.group, this.picture, this.step);
    this.element.append(this.controls, this.label, this.canvas);
    for (const control of [this.group, this.picture]) control.addEventListener("change", () => this.redraw());
    this.step.addEventListener("input", () => this.redraw());
  }

  show(data) {
    if (data.version !== VERSION) {
      this.label.textContent = `Router data version ${data.version}, this viewer reads ${VERSION}: reload the page.`;
      return;
    }
    const keep = this.data && data.groups[this.group.value] ? this.group.value : data.group;
    this.data = data;
    this.images.clear();
    this.colours = colourTable(data.colormap);
    this.group.replaceChildren(...Object.keys(data.groups).map((name) => new Option(name, name)));
    this.group.value = keep;
    this.picture.replaceChildren(...Array.from({ length: data.batch }, (_, i) => new Option(`image ${i + 1}`, i)));
    this.picture.style.display = data.batch > 1 ? "" : "none";
    this.step.max = data.steps - 1;
    this.step.value = data.steps - 1; // the last step: the router's final say
    [this.canvas.height, this.canvas.width] = data.size;
    this.controls.style.display = "flex";
    this.canvas.style.display = "block";
    return this.redraw();
  }

  redraw() {
    return this.draw().catch((error) => {
      this.label.textContent = `Cannot draw the router maps: ${error.message}`;
      console.error("MoA router viewer:", error);
    });
  }

  image(file) {
    const url = viewUrl(file);
    if (!this.images.has(url)) this.images.set(url, loadImage(url));
    return this.images.get(url);
  }

  async draw() {
    const data = this.data;
    const [group, step, picture] = [this.group.value, Number(this.step.value), Number(this.picture.value || 0)];
    const draw = ++this.draws;
    const [atlas, pictures] = await Promise.all([
      this.image(data.groups[group]),
      data.pictures && this.image(data.pictures),
    ]);
    if (draw !== this.draws) return;
    const [height, width] = data.size;
    const [th, tw] = data.tile;
    const k = picture * data.steps + step;
    const grey = tilePixels(atlas, (k % data.columns) * tw, Math.floor(k / data.columns) * th, tw, th, width, height);
    let base = null;
    if (pictures) {
      const p = Math.min(picture, data.pictures.count - 1);
      const [x, y] = [(p % data.pictures.columns) * width, Math.floor(p / data.pictures.columns) * height];
      base = tilePixels(pictures, x, y, width, height, width, height);
    }
    // As moa_core/render.py: the heatmap alone, or over the image with alpha * r1 of the colour.
    const context = this.canvas.getContext("2d");
    const out = context.createImageData(width, height);
    const alpha = data.colormap.alpha;
    let sum = 0;
    for (let i = 0; i < out.data.length; i += 4) {
      const level = grey[i];
      const colour = this.colours[level];
      const a = base ? (alpha * level) / 255 : 1;
      for (let c = 0; c < 3; c++) out.data[i + c] = base ? base[i + c] * (1 - a) + colour[c] * a : colour[c];
      out.data[i + 3] = 255;
      sum += level;
    }
    context.putImageData(out, 0, 0);
    const share = Math.round((100 * sum) / 255 / (width * height));
    const off = data.acted[step] ? "" : " · MoA off: prior only";
    this.label.textContent = `step ${step + 1}/${data.steps} · σ ${data.sigmas[step].toFixed(3)} · personal ${share}%${off}`;
    this.element.dataset.draws = String(draw); // lets a test wait for the picture of its last change
  }
}

app.registerExtension({
  name: "MoA.RouterViewer",
  nodeCreated(node) {
    if (node.comfyClass !== NODE) return;
    const viewer = new RouterViewer();
    const widget = node.addDOMWidget("router_viewer", "MOA_ROUTER_VIEWER", viewer.element, {
      serialize: false, // a view of the last run, not an input: kept out of the prompt
      getMinHeight: () => (viewer.data ? HEIGHT : 40),
    });
    widget.serialize = false; // and out of the saved workflow's widgets_values
    const onExecuted = node.onExecuted;
    node.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const data = output?.[UI_KEY]?.[0];
      if (!data) return;
      viewer.show(data);
      const [width, height] = node.computeSize();
      if (node.size[1] < height) node.setSize([Math.max(node.size[0], width), height]);
      app.graph.setDirtyCanvas(true, true);
    };
  },
});
