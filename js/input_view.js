// InputView: one instance's inputs (image, text, tabular, time series) with per-unit score
// overlays and clickable units. anywidget ESM; bundled into multiviz_widgets/static/.
//
// Traits: items [{name, kind, ...payload}], scores {modality: [float per unit]}, scales
// {modality: |score| at full colour; else the modality's own largest}, score_caption,
// selected {modality, unit}, caption, concepts {modality: {unit: [concept, ...]}}. Items that
// carry the instance they show (the Explorer's) send it with a click ({modality, unit,
// instance}): a click on an instance the kernel has moved past is then told apart from one on
// the unit of that index in the instance shown now.
// Every unit element carries data-modality, data-unit and data-score (String(v) of the value as
// received, "" when there is no score) and data-concepts (the unit's concepts joined by "; ", ""
// for none; a named unit also has the class mvz-named, drawn with a dashed purple border); the root carries data-render-count, incremented after
// each DOM update, so tests and benchmarks can wait on it.
//
// Strings from data (tokens, column names, captions) are only ever set through textContent.
// The root's data-kernel-link says whether the kernel answers (lib/kernel_link.js).
//
// Every unit is a button for the keyboard too: focusable (tabindex 0, role "button", its
// name in aria-label, aria-current when selected), Enter or Space choose it as a click does,
// and the one focused from the keyboard has a blue ring (beside the selection's orange
// outline). Its Enter and Space are taken (preventDefault: JupyterLab skips keys already
// handled, so Enter does not open the cell for editing) and every other key, Ctrl+S included,
// still reaches JupyterLab's shortcuts (but the arrow keys, Home and End inside a grid, below). The superpixel canvas is for the pointer; its
// segment chips are the keyboard's way to the same units. A chip too long to show (at most
// 40ch) is cut with an ellipsis, and its title then starts with its whole text.
//
// A grid of units (an image's patches, a series' windows) is one tab stop, not one per unit
// (64 patches on easy-VQA, 196 on a 14 x 14 grid): a group named for the screen reader whose
// one focusable unit (tabindex 0; the others -1) is the last one focused there, else the
// first; a selection made elsewhere (a click on the heatmap, the kernel) moves it to the
// selected unit unless the focus is in that grid. The arrow keys move the focus inside the
// grid (Home / End: the row's ends; Ctrl+Home / Ctrl+End: the grid's), and are taken
// (preventDefault) so that JupyterLab does not move to another cell meanwhile.

import { watchKernelLink } from "./lib/kernel_link.js";

const CSS = `
.mvz-input { font-family: var(--jp-ui-font-family, sans-serif); font-size: 13px; color: var(--jp-ui-font-color1, #222); }
.mvz-input .mvz-caption { font-weight: 600; margin: 2px 0 6px 0; min-height: 1em; }
.mvz-input .mvz-modality { margin: 4px 0 10px 0; }
.mvz-input .mvz-mname { font-size: 11px; color: var(--jp-ui-font-color2, #666); margin-bottom: 3px; }
.mvz-input .mvz-image { position: relative; display: inline-block; line-height: 0; }
.mvz-input .mvz-image img { image-rendering: pixelated; display: block; }
.mvz-input .mvz-grid { position: absolute; inset: 0; display: grid; }
.mvz-input .mvz-patch { box-sizing: border-box; border: 1px solid rgba(255,255,255,0.08); cursor: pointer; }
.mvz-input .mvz-patch:hover { border-color: rgba(0,0,0,0.5); }
.mvz-input .mvz-unit.mvz-named { border: 1px dashed #8e24aa; }
.mvz-input .mvz-patch.mvz-named { border-width: 2px; }
.mvz-input .mvz-unit.mvz-selected { outline: 2px solid #ff9800; outline-offset: -2px; }
.mvz-input .mvz-tokens { display: flex; flex-wrap: wrap; gap: 4px; }
.mvz-input .mvz-token { padding: 2px 6px; border-radius: 4px; border: 1px solid rgba(0,0,0,0.15); cursor: pointer; white-space: pre; max-width: 40ch; overflow: hidden; text-overflow: ellipsis; }
.mvz-input .mvz-token.mvz-selected { outline-offset: 1px; }
.mvz-input table.mvz-table { border-collapse: collapse; }
.mvz-input table.mvz-table td, .mvz-input table.mvz-table th { border: 1px solid rgba(0,0,0,0.12); padding: 2px 6px; text-align: right; }
.mvz-input table.mvz-table th { font-weight: 500; text-align: left; }
.mvz-input table.mvz-table td.mvz-unit { cursor: pointer; }
.mvz-input .mvz-series { display: grid; gap: 1px; align-items: stretch; }
.mvz-input .mvz-series .mvz-rowname { font-size: 11px; padding-right: 6px; align-self: center; white-space: nowrap; }
.mvz-input .mvz-series .mvz-cell { color: #333; position: relative; height: 34px; min-width: 14px; cursor: pointer; border: 1px solid rgba(0,0,0,0.08); box-sizing: border-box; }
.mvz-input .mvz-series .mvz-cell.mvz-named { border: 1px dashed #8e24aa; }  /* after the cell's own border */
.mvz-input .mvz-series svg { position: absolute; inset: 0; width: 100%; height: 100%; pointer-events: none; }
.mvz-input .mvz-unit:focus-visible { box-shadow: 0 0 0 1px #fff, 0 0 0 4px #1565c0; position: relative; z-index: 1; }
.mvz-input .mvz-unit:focus-visible:not(.mvz-selected) { outline: none; }  /* the ring instead */
.mvz-input .mvz-legend { display: flex; align-items: center; gap: 6px; font-size: 11px; color: var(--jp-ui-font-color2, #666); margin-top: 2px; }
.mvz-input .mvz-legend .mvz-bar { width: 120px; height: 8px; background: linear-gradient(to right, rgb(33,102,172), rgb(247,247,247), rgb(178,24,43)); border: 1px solid rgba(0,0,0,0.1); }
`;

const SVG_NS = "http://www.w3.org/2000/svg";

// Diverging colour for v in [-1, 1] (already scaled): blue (negative) .. white .. red (positive).
function diverging(t) {
  const a = Math.max(-1, Math.min(1, t));
  const white = [247, 247, 247];
  const end = a >= 0 ? [178, 24, 43] : [33, 102, 172];
  const s = Math.abs(a);
  const c = white.map((w, i) => Math.round(w + (end[i] - w) * s));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

// Overlay colour (for patches over an image): transparent at 0, at most 0.6 opaque at the
// extremes, so that the picture under the strongest patches (the shape a question is about)
// stays visible (0.75 hid it).
const OVERLAY_MAX_ALPHA = 0.6;
function overlay(t) {
  const a = Math.max(-1, Math.min(1, t));
  const end = a >= 0 ? [178, 24, 43] : [33, 102, 172];
  return `rgba(${end[0]},${end[1]},${end[2]},${(OVERLAY_MAX_ALPHA * Math.abs(a)).toFixed(3)})`;
}

function isNum(v) {
  return typeof v === "number" && Number.isFinite(v);
}

function scaleOf(values) {
  let m = 0;
  for (const v of values) if (isNum(v)) m = Math.max(m, Math.abs(v));
  return m;
}

// A score: 3 significant digits; exponent form only below 1e-3 and from 1e4 up (toPrecision
// alone writes 1234 as "1.23e+3").
function fmt(v) {
  if (!isNum(v)) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
  if (a >= 1000) return v.toFixed(0);
  return v.toPrecision(3);
}

// An input value (a table's cell): as the data has it, a whole number in full below 1e9 and
// others to 7 significant digits, what a float32 holds (a year 2023 stays 2023, 123.456 is not
// cut to 123, nor 1234567 shown as 1234570).
function fmtValue(v) {
  if (!isNum(v)) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-4 || a >= 1e9)) return v.toExponential(5).replace(/\.?0+e/, "e");
  if (Number.isInteger(v)) return String(v);          // 1234567, not 1234570
  return String(Number(v.toPrecision(7)));            // a float32's digits: 123456.7
}

function el_(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

// Background by score, with white text on the saturated end of the scale.
function paintCell(e, t) {
  e.style.background = t === null ? "" : diverging(t);
  e.style.color = t !== null && Math.abs(t) > 0.6 ? "#fff" : "";
}

function render({ model, el }) {
  const root = el_("div", "mvz-input");
  const style = document.createElement("style");
  style.textContent = CSS;
  root.appendChild(style);
  const caption = el_("div", "mvz-caption");
  root.appendChild(caption);
  const body = el_("div", "mvz-body");
  root.appendChild(body);
  const legend = el_("div", "mvz-legend");
  root.appendChild(legend);
  el.appendChild(root);
  const unwatch = watchKernelLink(model, root);

  let renderCount = 0;
  // modality name -> {kind, units: Map(unit -> [elements]), paint(el, scaled, value)}
  let byModality = new Map();

  function bump() {
    renderCount += 1;
    root.dataset.renderCount = String(renderCount);
  }

  // the instance the units drawn now belong to (items' "instance"; undefined: not said)
  let drawnInstance;

  function select(modality, unit) {
    const selected = { modality, unit };
    if (drawnInstance !== undefined && drawnInstance !== null) selected.instance = drawnInstance;
    model.set("selected", selected);
    model.save_changes();
  }

  // A clickable unit; name: what it is called to a screen reader (its word, its patch's
  // label, its column and value), set as an attribute (text, never markup).
  function addUnit(entry, modality, unit, element, name) {
    element.classList.add("mvz-unit");
    element.dataset.modality = modality;
    element.dataset.unit = String(unit);
    element.dataset.score = "";
    element.dataset.concepts = "";
    element._mvzLabel = element.title || "";
    element._mvzScore = null;
    element._mvzConcepts = [];
    element._mvzText = "";             // a chip's whole text, put in its title when cut
    element._mvzCut = false;
    element.tabIndex = 0;
    // a table cell keeps its cell role (a screen reader then still says its row and column)
    if (element.tagName !== "TD") element.setAttribute("role", "button");
    element.setAttribute("aria-label", String(name || element._mvzLabel || `${modality} ${unit}`));
    element.setAttribute("aria-current", "false");
    element.addEventListener("click", (ev) => {
      ev.stopPropagation();
      select(modality, unit);
    });
    element.addEventListener("keydown", (ev) => {
      if (ev.isComposing || ev.altKey || ev.metaKey) return;
      if (ev.shiftKey && ev.key === "Enter") return;   // JupyterLab's "run cell"
      if (element._mvzGrid && moveInGrid(element, ev)) return;
      if (ev.ctrlKey) return;
      if (ev.key !== "Enter" && ev.key !== " " && ev.key !== "Spacebar") return;
      ev.preventDefault();             // no page scroll on Space, no notebook shortcut
      ev.stopPropagation();
      select(modality, unit);
    });
    if (element.classList.contains("mvz-token")) {
      // a chip cut by its max-width says its whole text on hover and on focus
      element._mvzText = element.textContent;
      const check = () => {
        const cut = element.scrollWidth > element.clientWidth + 1;
        if (cut !== element._mvzCut) { element._mvzCut = cut; setTitle(element); }
      };
      element.addEventListener("mouseenter", check);
      element.addEventListener("focus", check);
    }
    if (!entry.units.has(unit)) entry.units.set(unit, []);
    entry.units.get(unit).push(element);
  }

  // Make `cells` (row-major, rows x cols) one tab stop: see the header.
  function rovingGrid(container, cells, rows, cols, label) {
    container.setAttribute("role", "group");
    container.setAttribute("aria-label", label);
    const grid = { cells, rows, cols };
    cells.forEach((e, i) => {
      e._mvzGrid = grid;
      e._mvzCell = i;
      e.tabIndex = i === 0 ? 0 : -1;
      e.addEventListener("focus", () => makeTabStop(e));
    });
  }

  function makeTabStop(e) {
    for (const other of e._mvzGrid.cells) if (other !== e) other.tabIndex = -1;
    e.tabIndex = 0;
  }

  // An arrow, Home or End key on a grid's unit: focus its neighbour; true when the key was one.
  function moveInGrid(e, ev) {
    const { cells, rows, cols } = e._mvzGrid;
    const r = Math.floor(e._mvzCell / cols), c = e._mvzCell % cols;
    const to = {
      ArrowLeft: [r, c - 1], ArrowRight: [r, c + 1], ArrowUp: [r - 1, c], ArrowDown: [r + 1, c],
      Home: ev.ctrlKey ? [0, 0] : [r, 0],
      End: ev.ctrlKey ? [rows - 1, cols - 1] : [r, cols - 1],
    }[ev.key];
    if (!to || (ev.ctrlKey && ev.key !== "Home" && ev.key !== "End")) return false;
    ev.preventDefault();               // no page scroll, no move to another notebook cell
    ev.stopPropagation();
    const clamp = (v, n) => Math.max(0, Math.min(n - 1, v));
    const next = cells[clamp(to[0], rows) * cols + clamp(to[1], cols)];
    if (next && next !== e) {
      makeTabStop(next);
      next.focus();
    }
    return true;
  }

  function buildImage(item, box, entry) {
    const rows = item.rows, cols = item.cols;
    const wrap = el_("div", "mvz-image");
    const img = document.createElement("img");
    img.src = item.src; // a data: URL built in Python from the pixels
    img.width = item.display_width;
    img.height = item.display_height;
    img.alt = item.name;
    wrap.appendChild(img);
    const grid = el_("div", "mvz-grid");
    // Patches at the image's edge may be partial: size tracks by pixels covered.
    const colSizes = [], rowSizes = [];
    for (let c = 0; c < cols; c++) colSizes.push(Math.min(item.patch, item.width - c * item.patch) + "fr");
    for (let r = 0; r < rows; r++) rowSizes.push(Math.min(item.patch, item.height - r * item.patch) + "fr");
    grid.style.gridTemplateColumns = colSizes.join(" ");
    grid.style.gridTemplateRows = rowSizes.join(" ");
    const cells = [];
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const u = r * cols + c;
        const p = el_("div", "mvz-patch");
        p.title = item.labels && item.labels[u] ? item.labels[u] : `patch ${u}`;
        addUnit(entry, item.name, u, p, `${item.name}: ${p.title}`);
        grid.appendChild(p);
        cells.push(p);
      }
    }
    rovingGrid(grid, cells, rows, cols,
      `${item.name}: ${rows} x ${cols} patches, arrow keys move between them`);
    wrap.appendChild(grid);
    box.appendChild(wrap);
    entry.paint = (e, t) => { e.style.background = t === null ? "transparent" : overlay(t); };
  }

  function buildSegments(item, box, entry) {
    // Superpixels: a canvas overlay coloured per pixel, plus a clickable legend of segments.
    const wrap = el_("div", "mvz-image");
    const img = document.createElement("img");
    img.src = item.src;
    img.width = item.display_width;
    img.height = item.display_height;
    img.alt = item.name;
    wrap.appendChild(img);
    const canvas = document.createElement("canvas");
    canvas.width = item.width;
    canvas.height = item.height;
    canvas.style.position = "absolute";
    canvas.style.inset = "0";
    canvas.style.width = item.display_width + "px";
    canvas.style.height = item.display_height + "px";
    canvas.style.imageRendering = "pixelated";
    canvas.style.cursor = "pointer";
    wrap.appendChild(canvas);
    canvas.addEventListener("click", (ev) => {
      const r = canvas.getBoundingClientRect();
      // clamped: a click on the right or bottom edge is the last pixel, not the next row's first
      const at = (pos, start, size, n) =>
        Math.max(0, Math.min(n - 1, Math.floor(((pos - start) / size) * n)));
      const x = at(ev.clientX, r.left, r.width, item.width);
      const y = at(ev.clientY, r.top, r.height, item.height);
      const u = item.segments[y * item.width + x];
      if (u !== undefined) select(item.name, u);
    });
    box.appendChild(wrap);
    const chips = el_("div", "mvz-tokens");
    for (let u = 0; u < item.n_units; u++) {
      const chip = el_("span", "mvz-token", item.labels ? item.labels[u] : `segment ${u}`);
      chip.title = chip.textContent;          // the hover text's label (not " — 0.12")
      addUnit(entry, item.name, u, chip, `${item.name}: ${chip.textContent}`);
      chips.appendChild(chip);
    }
    box.appendChild(chips);
    entry.paint = paintCell;
    entry.repaint = (scaled) => {
      const ctx = canvas.getContext("2d");
      const data = ctx.createImageData(item.width, item.height);
      for (let i = 0; i < item.segments.length; i++) {
        const t = scaled ? scaled[item.segments[i]] : null;
        if (t === null || t === undefined) continue;
        const a = Math.max(-1, Math.min(1, t));
        const end = a >= 0 ? [178, 24, 43] : [33, 102, 172];
        data.data[4 * i] = end[0];
        data.data[4 * i + 1] = end[1];
        data.data[4 * i + 2] = end[2];
        data.data[4 * i + 3] = Math.round(255 * OVERLAY_MAX_ALPHA * Math.abs(a));
      }
      ctx.putImageData(data, 0, 0);
    };
  }

  // Clickable chips, one per unit: the tokens of a text, or the unit labels of any other kind.
  function buildChips(item, box, entry) {
    const chips = el_("div", "mvz-tokens");
    const words = item.tokens || Array.from({ length: item.n_units || 0 },
      (_, u) => (item.labels ? item.labels[u] : `unit ${u}`));
    words.forEach((word, u) => {
      const chip = el_("span", "mvz-token", word);
      const seen = item.model_tokens ? item.model_tokens[u] : null;
      chip.title = seen !== null && seen !== undefined && seen !== word ? `model sees: ${seen}` : `${item.tokens ? "token" : "unit"} ${u}`;
      addUnit(entry, item.name, u, chip, `${item.name}: ${word}`);
      chips.appendChild(chip);
    });
    box.appendChild(chips);
    entry.paint = paintCell;
  }

  function buildTabular(item, box, entry) {
    const table = el_("table", "mvz-table");
    const head = document.createElement("tr");
    const body = document.createElement("tr");
    head.appendChild(el_("th", null, "column"));
    body.appendChild(el_("th", null, "value"));
    item.columns.forEach((name, c) => {
      head.appendChild(el_("th", null, name));
      const td = el_("td", null, fmtValue(item.values[c]));
      const u = item.units[c];
      td.title = item.unit_labels ? item.unit_labels[u] : name;
      addUnit(entry, item.name, u, td, `${item.name}: ${td.title} = ${td.textContent}`);
      body.appendChild(td);
    });
    table.appendChild(head);
    table.appendChild(body);
    box.appendChild(table);
    entry.paint = paintCell;
  }

  function buildSeries(item, box, entry) {
    const G = item.group_names.length, W = item.n_windows;
    const grid = el_("div", "mvz-series");
    const T = item.values.length;
    // each window as wide as the steps it holds: a last, partial window (3 steps of 5) is
    // narrower, so that the strip's time axis is not stretched there
    const steps = Array.from({ length: W },
      (_, w) => Math.max(1, Math.min(T, (w + 1) * item.window) - w * item.window));
    grid.style.gridTemplateColumns =
      `max-content ${steps.map(n => `minmax(14px, ${n}fr)`).join(" ")}`;
    const cells = [];                      // row-major: group g, window w at g * W + w
    item.group_names.forEach((gname, g) => {
      grid.appendChild(el_("div", "mvz-rowname", gname));
      const chans = item.groups[g];
      // Per-row value range, so each row's sparkline fills its strip.
      let lo = Infinity, hi = -Infinity;
      for (let t = 0; t < T; t++) for (const c of chans) { const v = item.values[t][c]; if (isNum(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); } }
      if (!(hi > lo)) { lo -= 1; hi += 1; }
      for (let w = 0; w < W; w++) {
        const u = w * G + g;
        const cell = el_("div", "mvz-cell");
        const t0 = w * item.window, t1 = Math.min(T, (w + 1) * item.window);
        cell.title = item.labels ? item.labels[u] : `${gname} t${t0}-${t1 - 1}`;
        const svg = document.createElementNS(SVG_NS, "svg");
        svg.setAttribute("viewBox", `0 0 ${Math.max(1, t1 - t0 - 1)} 100`);
        svg.setAttribute("preserveAspectRatio", "none");
        for (const c of chans) {
          const pts = [];
          for (let t = t0; t < t1; t++) {
            const v = item.values[t][c];
            if (isNum(v)) pts.push(`${t - t0},${(95 - 90 * (v - lo) / (hi - lo)).toFixed(2)}`);
          }
          if (pts.length === 1) pts.push(pts[0].replace(/^0,/, "1,"));
          const line = document.createElementNS(SVG_NS, "polyline");
          line.setAttribute("points", pts.join(" "));
          line.setAttribute("fill", "none");
          line.setAttribute("stroke", "currentColor");
          line.setAttribute("stroke-width", "1.2");
          line.setAttribute("vector-effect", "non-scaling-stroke");
          svg.appendChild(line);
        }
        cell.appendChild(svg);
        addUnit(entry, item.name, u, cell, `${item.name}: ${cell.title}`);
        grid.appendChild(cell);
        cells.push(cell);
      }
    });
    rovingGrid(grid, cells, G, W,
      `${item.name}: ${G} x ${W} windows, arrow keys move between them`);
    box.appendChild(grid);
    entry.paint = paintCell;
  }

  function build() {
    body.replaceChildren();
    byModality = new Map();
    drawnInstance = ((model.get("items") || [])[0] || {}).instance;
    for (const item of model.get("items") || []) {
      const box = el_("div", "mvz-modality");
      box.dataset.section = item.name;
      box.dataset.kind = item.kind;
      box.appendChild(el_("div", "mvz-mname", item.name));
      const entry = { kind: item.kind, units: new Map(), paint: null, repaint: null };
      if (item.kind === "image" && item.segments) buildSegments(item, box, entry);
      else if (item.kind === "image") buildImage(item, box, entry);
      else if (item.kind === "text") buildChips(item, box, entry);
      else if (item.kind === "tabular") buildTabular(item, box, entry);
      else if (item.kind === "timeseries") buildSeries(item, box, entry);
      else buildChips(item, box, entry);
      byModality.set(item.name, entry);
      body.appendChild(box);
    }
  }

  function paintScores() {
    const scores = model.get("scores") || {};
    const scales = model.get("scales") || {};
    const shown = [];                      // [modality, its scale] of the modalities with scores
    for (const [name, entry] of byModality) {
      const vals = Array.isArray(scores[name]) ? scores[name] : null;
      const m = vals ? (isNum(scales[name]) && scales[name] > 0 ? scales[name] : scaleOf(vals)) : 0;
      const scaled = vals ? vals.map((v) => (isNum(v) ? (m > 0 ? v / m : 0) : null)) : null;
      if (vals && m > 0) shown.push([name, m]);       // none computed: no scale to state
      for (const [u, elements] of entry.units) {
        const v = vals ? vals[u] : undefined;
        for (const e of elements) {
          e.dataset.score = isNum(v) ? String(v) : "";
          entry.paint(e, scaled && scaled[u] !== undefined ? scaled[u] : null);
          e._mvzScore = isNum(v) ? v : null;
          setTitle(e);
        }
      }
      if (entry.repaint) entry.repaint(scaled);
    }
    legend.replaceChildren();
    legend.title = "";
    if (shown.length) {
      // one bar; each modality's full-colour value in words (a unit's interactions come on
      // the heatmap's scale, the attributions on their own)
      legend.appendChild(el_("span", null, "\u2212"));
      legend.appendChild(el_("span", "mvz-bar"));
      legend.appendChild(el_("span", null, "+"));
      legend.appendChild(el_("span", "mvz-scales",
        shown.map(([name, m]) => `${name} \u00b1${fmt(m)}`).join(", ")));
      legend.title = "colour scale symmetric around 0: full blue / red at the value shown for " +
        "each modality (" + shown.map(([name, m]) => `${name}: ${fmt(m)}`).join(", ") + ")";
    }
    // the caption shows without scores too: "computing ...", or why nothing was computed
    legend.appendChild(el_("span", "mvz-score-caption", model.get("score_caption") || ""));
  }

  // The text shown when the pointer rests on a unit: its label, score and concepts (a title
  // attribute is text: a concept is never read as HTML).
  function setTitle(e) {
    let t = e._mvzScore === null ? e._mvzLabel : `${e._mvzLabel} \u2014 ${fmt(e._mvzScore)}`;
    if (e._mvzCut) t = `${e._mvzText}\n${t}`;
    if (e._mvzConcepts.length) t += `\nconcepts: ${e._mvzConcepts.join("; ")}`;
    e.title = t;
  }

  function paintConcepts() {
    const all = model.get("concepts") || {};
    for (const [name, entry] of byModality) {
      const named = all[name] || {};
      for (const [u, elements] of entry.units) {
        const list = Array.isArray(named[String(u)]) ? named[String(u)].map(String) : [];
        for (const e of elements) {
          e._mvzConcepts = list;
          e.dataset.concepts = list.join("; ");
          e.classList.toggle("mvz-named", list.length > 0);
          setTitle(e);
        }
      }
    }
  }

  function paintSelected() {
    const sel = model.get("selected") || {};
    for (const [name, entry] of byModality) {
      for (const [u, elements] of entry.units) {
        const on = sel.modality === name && sel.unit === u;
        for (const e of elements) {
          e.classList.toggle("mvz-selected", on);
          e.setAttribute("aria-current", on ? "true" : "false");
          // Tab into the grid lands on the selection, unless the focus is in the grid (its
          // unit keeps the stop: Tab then leaves the grid in one press)
          if (on && e._mvzGrid && !e._mvzGrid.cells.includes(document.activeElement)) {
            makeTabStop(e);
          }
        }
      }
    }
  }

  function paintCaption() {
    caption.textContent = model.get("caption") || "";
  }

  function full() {
    build();
    paintScores();
    paintConcepts();
    paintSelected();
    paintCaption();
    bump();
  }
  const onScores = () => { paintScores(); bump(); };
  const onSelected = () => { paintSelected(); bump(); };
  const onCaption = () => { paintCaption(); bump(); };
  const onConcepts = () => { paintConcepts(); bump(); };

  model.on("change:items", full);
  model.on("change:scores", onScores);
  model.on("change:score_caption", onScores);
  model.on("change:scales", onScores);
  model.on("change:selected", onSelected);
  model.on("change:caption", onCaption);
  model.on("change:concepts", onConcepts);
  full();

  return () => {
    unwatch();
    model.off("change:items", full);
    model.off("change:scores", onScores);
    model.off("change:score_caption", onScores);
    model.off("change:scales", onScores);
    model.off("change:selected", onSelected);
    model.off("change:caption", onCaption);
    model.off("change:concepts", onConcepts);
  };
}

export default { render };
