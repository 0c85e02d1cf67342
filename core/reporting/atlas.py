"""The cluster atlas: one card per cluster of a fit, to look at every cluster and name it.

A card shows crops around sampled member patches (with context, the patch outlined), the
cluster's share of the image area (its patches' pixels), its mapped class, its purity where
ground truth exists, and the nearest cluster of the baseline fit. The page is one static
`index.html` (data, style and script inline) beside JPEG sprite sheets (`sprites/`, one per SPRITE_CLUSTERS clusters, a row of
thumbnails per cluster), so it opens from disk or any static server and loads fast at k = 300+.
A class picker per card keeps the person's choices in the browser's localStorage, and "Export
mapping" downloads `mapping.json` (`core.mapping.human`), which `apply --mapping` and
`label.human_mapping` take.
"""

import html
import json

import numpy as np

from core.classes import CLASS_NAMES, IGNORE, TRAIN_ID_COLORS
from core.clustering.fit_artifact import FitArtifact
from core.mapping.human import mapping_document

THUMB = 64  # thumbnail side, pixels
CONTEXT = 2.5  # a crop spans this many patches on each side of the patch's centre
EXAMPLES = 12  # member patches shown per cluster
SPRITE_CLUSTERS = 32  # clusters per sprite sheet
OUTLINE = np.array([255, 230, 0], np.uint8)


def patch_box(
    row: int, col: int, grid_hw: tuple[int, int], image_hw: tuple[int, int]
) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) in image pixels of patch (row, col) of a grid that spans the image."""
    (gh, gw), (h, w) = grid_hw, image_hw
    return row * h / gh, col * w / gw, (row + 1) * h / gh, (col + 1) * w / gw


def thumbnail(image: np.ndarray, box: tuple[float, float, float, float], size: int = THUMB) -> np.ndarray:
    """(size, size, 3) uint8: a square crop around `box` (CONTEXT patches each way; the image edge
    padded grey), resized by nearest neighbour, with the patch outlined."""
    top, left, bottom, right = box
    half = CONTEXT * max(bottom - top, right - left)
    cy, cx = (top + bottom) / 2, (left + right) / 2
    scale = size / (2 * half)
    ys = np.floor(cy - half + (np.arange(size) + 0.5) / scale).astype(np.int64)
    xs = np.floor(cx - half + (np.arange(size) + 0.5) / scale).astype(np.int64)
    inside = (ys[:, None] >= 0) & (ys[:, None] < image.shape[0]) & (xs[None] >= 0) & (xs[None] < image.shape[1])
    out = np.full((size, size, 3), 96, np.uint8)
    out[inside] = image[
        np.clip(ys, 0, image.shape[0] - 1)[:, None].repeat(size, 1)[inside],
        np.clip(xs, 0, image.shape[1] - 1)[None].repeat(size, 0)[inside],
    ]
    y0, y1 = int((top - cy + half) * scale), int(np.ceil((bottom - cy + half) * scale)) - 1
    x0, x1 = int((left - cx + half) * scale), int(np.ceil((right - cx + half) * scale)) - 1
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, size - 1), min(x1, size - 1)
    for line in (out[y0, x0 : x1 + 1], out[y1, x0 : x1 + 1], out[y0 : y1 + 1, x0], out[y0 : y1 + 1, x1]):
        line[:] = OUTLINE
    return out


def sprite_sheet(rows: list[list[np.ndarray]], size: int = THUMB) -> np.ndarray:
    """One row of thumbnails per cluster, EXAMPLES wide; missing ones (None) stay black."""
    sheet = np.zeros((max(len(rows), 1) * size, EXAMPLES * size, 3), np.uint8)
    for r, thumbs in enumerate(rows):
        for c, thumb in enumerate(thumbs[:EXAMPLES]):
            if thumb is not None:
                sheet[r * size : (r + 1) * size, c * size : (c + 1) * size] = thumb
    return sheet


def cluster_cards(
    fit: FitArtifact, baseline: FitArtifact, patches: np.ndarray, pixels: np.ndarray, examples: list[int]
) -> list[dict]:
    """Per cluster: its patches, its pixel share (the image pixels its patches cover, of all),
    mapped class, purity (labelled patches of its majority class, None without ground truth),
    nearest baseline cluster (cosine) and its class, and where its thumbnails are (sprite sheet
    and row)."""
    labelled = fit.extra_arrays["mapping_counts"].sum(axis=0) if "mapping_counts" in fit.extra_arrays else None
    nearest = (fit.centroids @ baseline.centroids.T).argmax(axis=1)
    total = max(float(pixels.sum()), 1.0)
    cards = []
    for c in range(fit.k):
        n_labelled = 0 if labelled is None else int(labelled[c].sum())
        cards.append(
            {
                "cluster": c,
                "patches": int(patches[c]),
                "share": float(pixels[c]) / total,
                "class": int(fit.mapping[c]),
                "purity": float(labelled[c].max() / n_labelled) if n_labelled else None,
                "baseline": int(nearest[c]),
                "baseline_class": int(baseline.mapping[nearest[c]]),
                "sprite": c // SPRITE_CLUSTERS,
                "row": c % SPRITE_CLUSTERS,
                "examples": int(examples[c]),
            }
        )
    return cards


def render_html(cards: list[dict], fit: FitArtifact, info: dict) -> str:
    """The atlas page: `info` has the fit's name, the run it comes from and how the examples were drawn."""
    classes = [
        {"id": i, "name": n, "color": "#" + "".join(f"{v:02x}" for v in TRAIN_ID_COLORS[i])}
        for i, n in enumerate(CLASS_NAMES)
    ]
    classes.append({"id": IGNORE, "name": "ignore", "color": "#000000"})
    data = {
        "cards": cards,
        "classes": classes,
        "info": info,
        "thumb": THUMB,
        "examples": EXAMPLES,
        "document": mapping_document(fit, fit.mapping, []),
    }
    payload = json.dumps(data).replace(
        "<", "\\u003c"
    )  # no string in the data can end the script element (nor open a comment)
    title = html.escape(f"Cluster atlas: {info['fit']} (k={fit.k})")
    return _PAGE.replace("__TITLE__", title).replace("__DATA__", payload)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 13px system-ui, sans-serif; margin: 0; background: #f4f4f4; }
header { position: sticky; top: 0; background: #222; color: #eee; padding: 8px 12px; z-index: 1; }
header h1 { font-size: 16px; margin: 0 0 6px; }
header label { margin-right: 12px; }
#cards { display: flex; flex-wrap: wrap; gap: 8px; padding: 8px; }
.card { background: #fff; border: 1px solid #ccc; border-radius: 4px; padding: 6px; width: calc(var(--thumb) * 4 + 16px); }
.card.named { border-color: #2a7; box-shadow: 0 0 0 2px #2a7; }
.card h2 { font-size: 13px; margin: 0 0 4px; display: flex; justify-content: space-between; }
.thumbs { display: grid; grid-template-columns: repeat(4, var(--thumb)); gap: 2px; margin-bottom: 4px; }
.thumb { width: var(--thumb); height: var(--thumb); background-repeat: no-repeat; }
.swatch { display: inline-block; width: 10px; height: 10px; border: 1px solid #555; margin-right: 3px; vertical-align: middle; }
.stats { color: #444; line-height: 1.5; }
</style></head>
<body>
<header>
  <h1 id="title">__TITLE__</h1>
  <label>sort <select id="sort">
    <option value="cluster">cluster</option><option value="size">size (largest first)</option>
    <option value="purity">purity (lowest first)</option><option value="class">class</option></select></label>
  <label>class <select id="filter"><option value="all">all</option></select></label>
  <label><input type="checkbox" id="unnamed"> unnamed only</label>
  <button id="export">Export mapping</button> <button id="reset">Forget my names</button>
  <span id="status"></span>
</header>
<div id="cards"></div>
<script id="atlas-data" type="application/json">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("atlas-data").textContent);
const doc = data.document;
const storageKey = "overclust-atlas:" + doc.fingerprint + ":" + doc.k;
const names = JSON.parse(localStorage.getItem(storageKey) || "{}");  // cluster -> trainId the person chose
const classById = Object.fromEntries(data.classes.map(c => [c.id, c]));
document.documentElement.style.setProperty("--thumb", data.thumb + "px");
const pct = v => v === null ? "n/a" : (100 * v).toFixed(1) + " %";
const current = c => (String(c.cluster) in names) ? names[c.cluster] : c.class;
const swatch = id => `<span class="swatch" style="background:${classById[id].color}"></span>${classById[id].name}`;

const filter = document.getElementById("filter");
for (const c of data.classes) filter.insertAdjacentHTML("beforeend", `<option value="${c.id}">${c.name}</option>`);

function card(c) {
  const el = document.createElement("div");
  el.className = "card";
  el.dataset.cluster = c.cluster;
  const thumbs = [];
  for (let i = 0; i < c.examples; i++) {
    thumbs.push(`<div class="thumb" style="background-image:url(sprites/sprite-${String(c.sprite).padStart(3, "0")}.jpg);` +
                `background-position:${-i * data.thumb}px ${-c.row * data.thumb}px"></div>`);
  }
  // "not named" first: picking the fitted class is then a choice too (a confirmed cluster leaves "unnamed only")
  const options = `<option value="">not named</option>` + data.classes.map(k => `<option value="${k.id}">${k.name}</option>`).join("");
  el.innerHTML = `<h2><span>cluster ${c.cluster}</span><span class="current"></span></h2>
    <div class="thumbs">${thumbs.join("")}</div>
    <div class="stats">pixel share ${pct(c.share)} (${c.patches} patches)<br>
      fitted class ${swatch(c.class)}, purity ${pct(c.purity)}<br>
      nearest baseline cluster ${c.baseline} (${swatch(c.baseline_class)})</div>
    <label>name <select class="picker">${options}</select></label>`;
  const picker = el.querySelector(".picker");
  picker.value = String(c.cluster) in names ? names[c.cluster] : "";
  picker.addEventListener("change", () => {
    if (picker.value === "") delete names[c.cluster]; else names[c.cluster] = Number(picker.value);
    localStorage.setItem(storageKey, JSON.stringify(names));
    refresh(el, c);
    render();
  });
  refresh(el, c);
  return el;
}

function refresh(el, c) {
  el.classList.toggle("named", String(c.cluster) in names);
  el.querySelector(".current").innerHTML = swatch(current(c));
}

const elements = new Map(data.cards.map(c => [c.cluster, card(c)]));
const order = {
  cluster: (a, b) => a.cluster - b.cluster,
  size: (a, b) => b.share - a.share || a.cluster - b.cluster,
  purity: (a, b) => (a.purity ?? 2) - (b.purity ?? 2) || a.cluster - b.cluster,
  class: (a, b) => current(a) - current(b) || a.cluster - b.cluster,
};

function render() {
  const sort = document.getElementById("sort").value, cls = filter.value;
  const unnamed = document.getElementById("unnamed").checked;
  const shown = data.cards.filter(c => (cls === "all" || current(c) === Number(cls)) && !(unnamed && String(c.cluster) in names))
                          .sort(order[sort]);
  document.getElementById("cards").replaceChildren(...shown.map(c => elements.get(c.cluster)));
  document.getElementById("status").textContent =
    `${shown.length} of ${data.cards.length} clusters shown, ${Object.keys(names).length} named by you`;
}

for (const id of ["sort", "filter", "unnamed"]) document.getElementById(id).addEventListener("change", render);
document.getElementById("reset").addEventListener("click", () => {
  for (const key of Object.keys(names)) delete names[key];
  localStorage.removeItem(storageKey);
  for (const c of data.cards) { elements.get(c.cluster).querySelector(".picker").value = ""; refresh(elements.get(c.cluster), c); }
  render();
});
document.getElementById("export").addEventListener("click", () => {
  const out = {...doc, mapping: {...doc.mapping}, named: Object.keys(names).map(Number).sort((a, b) => a - b)};
  for (const [cluster, id] of Object.entries(names)) out.mapping[cluster] = id;
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([JSON.stringify(out, null, 2)], {type: "application/json"}));
  link.download = "mapping.json";
  document.body.appendChild(link);
  link.click();
  link.remove();
});
render();
</script>
</body></html>
"""
