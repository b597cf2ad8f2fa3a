// The page: draw a digit (or drop an image), see the top classes, what the model looked at (a
// heat map over the image, by occlusion or Grad-CAM), every convolution and pooling layer's
// feature maps, the first layer's filters and the parameter table, for any model of the
// repository. Plain JavaScript against the REST API; nothing from the network.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: "", busy: false, again: false, file: null, drawn: false, body: null };
const TOP_K = 5;

// viridis at 5 points (feature maps: 0 dark, the map's maximum bright)
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
// blue < 0 < red (filters, one scale for the layer)
const DIVERGING = [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]];

function colour(anchors, t) {
  const x = Math.min(Math.max(t, 0), 1) * (anchors.length - 1);
  const i = Math.min(Math.floor(x), anchors.length - 2);
  const f = x - i;
  return anchors[i].map((v, c) => Math.round(v + f * (anchors[i + 1][c] - v)));
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// A server with --auth-token-file wants `Authorization: Bearer <token>` on every API call. The
// page takes the token from its address's fragment (#token=..., never sent to the server) or from
// the field it shows after a 401, and keeps it for this tab only.
const TOKEN_KEY = "cnnserve-token";
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.has("token")) {
  sessionStorage.setItem(TOKEN_KEY, fragment.get("token"));
  history.replaceState(null, "", location.pathname + location.search);
}

class Unauthenticated extends Error {}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = new Headers(options.headers || {});
  if (token) headers.set("Authorization", `Bearer ${token}`);
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  const message = body.error || `${response.status} ${response.statusText}`;
  if (response.status === 401) throw new Unauthenticated(message);
  if (!response.ok) throw new Error(message);
  return body;
}

function askForToken(message) {
  status(`${message}: enter the server's bearer token`, true);
  $("token-form").hidden = false;
  $("token").focus();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("token-form").hidden = true;
  start();
});

// {dtype, shape, base64} -> {shape, data: Float32Array | Uint8Array} (little-endian, C order)
function decode(tensor) {
  const raw = atob(tensor.base64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  const data = tensor.dtype === "uint8" ? bytes : new Float32Array(bytes.buffer);
  return { shape: tensor.shape, data };
}

// One channel of an [H, W, C] tensor as a canvas, coloured by `pick(value)`.
function channelCanvas(t, channel, pick) {
  const [h, w, c] = t.shape;
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const [r, g, b] = pick(t.data[(y * w + x) * c + channel]);
      const o = (y * w + x) * 4;
      img.data[o] = r; img.data[o + 1] = g; img.data[o + 2] = b; img.data[o + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
  return canvas;
}

// ------------------------------------------------------------------ drawing pad

const pad = $("pad");
const ink = pad.getContext("2d");

function clearPad() {
  ink.fillStyle = "#000";
  ink.fillRect(0, 0, pad.width, pad.height);
  state.file = null;
  state.drawn = false;
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * (pad.width / box.width),
          (event.clientY - box.top) * (pad.height / box.height)];
}

let last = null;
pad.addEventListener("pointerdown", (event) => {
  pad.setPointerCapture(event.pointerId);
  state.file = null;
  state.drawn = true;
  last = point(event);
  ink.fillStyle = "#fff";
  ink.beginPath();
  ink.arc(last[0], last[1], 16, 0, 2 * Math.PI);
  ink.fill();
});
pad.addEventListener("pointermove", (event) => {
  if (last === null) return;
  const next = point(event);
  ink.strokeStyle = "#fff";
  ink.lineWidth = 32;
  ink.lineCap = "round";
  ink.beginPath();
  ink.moveTo(last[0], last[1]);
  ink.lineTo(next[0], next[1]);
  ink.stroke();
  last = next;
});
const endStroke = () => {
  if (last === null) return;
  last = null;
  look();
};
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

function useFile(file) {
  if (!file) return;
  state.file = file;
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    clearPad();
    state.file = file;
    const s = Math.min(pad.width / img.width, pad.height / img.height);
    ink.drawImage(img, (pad.width - img.width * s) / 2, (pad.height - img.height * s) / 2,
                  img.width * s, img.height * s);
    URL.revokeObjectURL(url);
  };
  img.src = url;
  look();
}
pad.addEventListener("dragover", (event) => event.preventDefault());
pad.addEventListener("drop", (event) => {
  event.preventDefault();
  useFile(event.dataTransfer.files[0]);
});
$("file").addEventListener("change", (event) => useFile(event.target.files[0]));
$("clear").addEventListener("click", () => {
  clearPad();
  $("prediction").textContent = "";
  $("bars").replaceChildren();
  $("maps").replaceChildren();
  state.body = null;
  $("heat").getContext("2d").clearRect(0, 0, $("heat").width, $("heat").height);
  $("heat-caption").textContent = "";
});

// ------------------------------------------------------------------ what the model makes of it

// A drawing framed as MNIST frames its digits: the strokes' box scaled to 20/28 of the image
// and centred, on black. The server then only resizes; without this a digit drawn across the
// whole pad reaches the edges, which no training digit does.
function padBlob() {
  const { data, width, height } = ink.getImageData(0, 0, pad.width, pad.height);
  let x0 = width, y0 = height, x1 = -1, y1 = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (data[(y * width + x) * 4] > 0) {
        x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
      }
    }
  }
  const framed = document.createElement("canvas");
  framed.width = width;
  framed.height = height;
  const ctx = framed.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, width, height);
  if (x1 >= 0) {
    const w = x1 - x0 + 1, h = y1 - y0 + 1;
    const s = (width * 20) / 28 / Math.max(w, h);
    ctx.drawImage(pad, x0, y0, w, h, (width - w * s) / 2, (height - h * s) / 2, w * s, h * s);
  }
  return new Promise((resolve) => framed.toBlob(resolve, "image/png"));
}

// One request at a time; strokes made meanwhile are looked at once it answers.
async function look() {
  if (!state.model || !(state.drawn || state.file)) return;
  if (state.busy) { state.again = true; return; }
  state.busy = true;
  try {
    const body = state.file || await padBlob();
    status("computing...");
    const started = performance.now();
    const answer = await api(
      `/v1/models/${encodeURIComponent(state.model)}/feature-maps?top_k=${TOP_K}`,
      { method: "POST", body, headers: { "Content-Type": "application/octet-stream" } });
    showPrediction(answer);
    showMaps(answer.layers.map((layer) => ({ ...layer, values: decode(layer.values) })));
    showSeen(decode(answer.image));
    state.body = body;
    await explain();
    status(`${answer.model} v${answer.version}: ${Math.round(performance.now() - started)} ms`);
  } catch (error) {
    status(error.message, true);
  } finally {
    state.busy = false;
    if (state.again) { state.again = false; look(); }
  }
}

// The heat map of the last image for the best class, by the chosen method, over the image in
// grey: blue < 0 < red on a scale symmetric about 0 (white: no effect). A method the model
// cannot answer (Grad-CAM without a convolution: 409) says why under the map.
async function explain() {
  if (!state.body) return;
  const method = $("method").value;
  const caption = $("heat-caption");
  const canvas = $("heat");
  try {
    const answer = await api(
      `/v1/models/${encodeURIComponent(state.model)}/explain?method=${method}`,
      { method: "POST", body: state.body, headers: { "Content-Type": "application/octet-stream" } });
    showHeat(decode(answer.image), decode(answer.heat));
    canvas.dataset.method = answer.method;
    canvas.dataset.label = answer.label;
    const how = answer.method === "occlusion"
      ? `a ${answer.patch}×${answer.patch} black patch at ${answer.images - 1} positions (stride ` +
        `${answer.stride}), one batch: red where covering the image lowers the probability of ` +
        `${answer.label}`
      : `Grad-CAM on ${answer.layer}: its activation maps weighted by the gradient of ` +
        `${answer.label}'s score, red where they add to it`;
    caption.textContent = how;
    caption.className = "";
  } catch (error) {
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    canvas.dataset.method = "";
    caption.textContent = error.message;
    caption.className = "error";
  }
}
$("method").addEventListener("change", () => explain());

function showHeat(image, heat) {
  const [h, w] = heat.shape;
  const c = image.shape[2];
  const canvas = $("heat");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  let bound = 0;
  for (const v of heat.data) bound = Math.max(bound, Math.abs(v));
  bound = bound || 1;
  for (let i = 0; i < h * w; i++) {
    let grey = 0;
    for (let k = 0; k < c; k++) grey += image.data[i * c + k] / c;
    const tint = colour(DIVERGING, 0.5 + heat.data[i] / (2 * bound));
    for (let k = 0; k < 3; k++) img.data[4 * i + k] = Math.round(0.4 * grey + 0.6 * tint[k]);
    img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

function showPrediction(answer) {
  const best = answer.top[0];
  $("prediction").textContent = `${best.label}  ${(100 * best.score).toFixed(1)} %`;
  $("bars").replaceChildren(...answer.top.map((entry, i) => {
    const row = document.createElement("div");
    row.className = i === 0 ? "bar best" : "bar";
    const label = document.createElement("span");
    label.textContent = entry.label;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${(100 * entry.score).toFixed(1)}%`;
    track.append(fill);
    const score = document.createElement("span");
    score.textContent = entry.score.toFixed(3);
    row.append(label, track, score);
    return row;
  }));
}

function showSeen(image) {
  const [h, w, c] = image.shape;
  const canvas = $("seen");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    for (let k = 0; k < 3; k++) img.data[4 * i + k] = image.data[i * c + (c === 1 ? 0 : k)];
    img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

// Each map on its own scale (0 .. its maximum): a faint detector still shows its pattern.
function showMaps(layers) {
  $("maps").replaceChildren(...layers.map((layer) => {
    const [h, w, c] = layer.values.shape;
    const section = document.createElement("div");
    section.className = "layer";
    section.dataset.layer = layer.name;
    const title = document.createElement("h3");
    title.textContent = `${layer.name} `;
    const what = document.createElement("span");
    what.textContent = `${layer.kind}, ${h}×${w}×${c}`;
    title.append(what);
    const grid = document.createElement("div");
    grid.className = "grid";
    for (let ch = 0; ch < c; ch++) {
      let low = 0, high = 0;
      for (let i = ch; i < layer.values.data.length; i += c) {
        low = Math.min(low, layer.values.data[i]);
        high = Math.max(high, layer.values.data[i]);
      }
      const span = high - low || 1;
      const tile = channelCanvas(layer.values, ch, (v) => colour(VIRIDIS, (v - low) / span));
      tile.title = `${layer.name} channel ${ch}: max ${high.toFixed(3)}`;
      grid.append(tile);
    }
    section.append(title, grid);
    return section;
  }));
}

// ------------------------------------------------------------------ the model itself

async function showFilters(model) {
  const answer = await api(`/v1/models/${encodeURIComponent(model)}/filters`);
  const kernels = decode(answer.kernels);
  const [k1, k2, cin, cout] = kernels.shape;
  // [K, K, in, out] -> one [K, K, 1] tile per output, the mean over the inputs
  let bound = 0;
  const tiles = [];
  for (let o = 0; o < cout; o++) {
    const data = new Float32Array(k1 * k2);
    for (let p = 0; p < k1 * k2; p++) {
      let sum = 0;
      for (let i = 0; i < cin; i++) sum += kernels.data[(p * cin + i) * cout + o];
      data[p] = sum / cin;
      bound = Math.max(bound, Math.abs(data[p]));
    }
    tiles.push({ shape: [k1, k2, 1], data });
  }
  bound = bound || 1;
  $("filters").replaceChildren(...tiles.map((t, o) => {
    const tile = channelCanvas(t, 0, (v) => colour(DIVERGING, 0.5 + v / (2 * bound)));
    tile.title = `${answer.layer} filter ${o}`;
    return tile;
  }));
  $("filters-caption").textContent =
    `${answer.layer}: ${cout} kernels of ${k1}×${k2}×${cin}` +
    (cin > 1 ? ` (mean over ${cin} inputs)` : "") + `, blue < 0 < red, |w| ≤ ${bound.toFixed(3)}`;
}

async function showSummary(model) {
  const s = await api(`/v1/models/${encodeURIComponent(model)}/summary`);
  const head = ["Layer", "Kind", "Output shape", "Output size", "Params", "How"];
  const rows = s.layers.map((l) => [
    l.name, l.kind, `(${l.output_shape.join(", ")})`, l.output_size_formula,
    l.parameters.toLocaleString("en"), l.formula,
  ]);
  const table = $("summary");
  table.replaceChildren();
  const tr = table.createTHead().insertRow();
  head.forEach((h) => { const th = document.createElement("th"); th.textContent = h; tr.append(th); });
  const body = table.createTBody();
  rows.forEach((cells) => {
    const row = body.insertRow();
    cells.forEach((text, i) => {
      const td = row.insertCell();
      td.textContent = text;
      if (i === 3 || i === 5) td.className = "formula";
    });
  });
  $("totals").textContent =
    `Total params: ${s.total_parameters.toLocaleString("en")}. One dense neuron over the raw ` +
    `${s.input_shape.join("×")} input would need ${s.dense_neuron_formula} weights.`;
}

// A rollout (models/<name>/rollout.yaml): its state, agreement, and the latest digits the two
// versions answered differently, each with both answers (stable's black, candidate's red).
async function showRollout(model) {
  const r = await api(`/v1/models/${encodeURIComponent(model)}/rollout`);
  const p = r.policy;
  $("rollout-section").hidden = !p.candidate;
  if (!p.candidate) return;
  const how = p.mode === "canary" ? `canary ${p.canary_percent}%` : "shadow";
  $("rollout-state").textContent =
    `${p.state}: stable v${p.stable}, candidate v${p.candidate} (${how})` + (p.reason ? `: ${p.reason}` : "");
  $("rollout-figures").textContent = r.compared
    ? `${r.compared.toLocaleString("en")} images compared: top-1 agreement ${(100 * r.agreement).toFixed(1)}%, ` +
      `mean |difference| of the probabilities ${r.mean_abs_diff.toFixed(4)}; ` +
      r.versions.map((v) => `v${v.version} ${v.role} p99 ${v.p99_ms.toFixed(2)} ms, errors ${(100 * v.error_rate).toFixed(2)}%`).join("; ")
    : "no images compared yet";
  $("disagreements").replaceChildren(...r.disagreements.map((d) => {
    const cell = document.createElement("div");
    cell.className = "disagreement";
    const image = decode(d.image);
    cell.append(channelCanvas(image, 0, (v) => [v, v, v]));
    for (const [who, answer] of [["stable", d.stable], ["candidate", d.candidate]]) {
      const line = document.createElement("div");
      line.className = who;
      line.textContent = `v${who === "stable" ? p.stable : p.candidate}: ${answer.label}`;
      cell.append(line);
    }
    return cell;
  }));
}

async function choose(model) {
  state.model = model;
  status(`loading ${model}...`);
  try {
    await Promise.all([showSummary(model), showFilters(model), showRollout(model)]);
    status(`${model}: draw something`);
  } catch (error) {
    status(error.message, true);
  }
  look();
}

async function start() {
  clearPad();
  try {
    const { models } = await api("/v1/models");
    const ready = models.filter((m) => m.default_version > 0);
    if (!ready.length) { status("no model is ready", true); return; }
    $("model").replaceChildren(...ready.map((m) => new Option(`${m.name} (v${m.default_version}, ${m.precision || "fp32"})`, m.name)));
    const wanted = new URLSearchParams(location.search).get("model");
    if (wanted && ready.some((m) => m.name === wanted)) $("model").value = wanted;
    $("model").onchange = () => choose($("model").value);  // start() may run again
    await choose($("model").value);
    document.body.dataset.ready = "1";
  } catch (error) {
    if (error instanceof Unauthenticated) askForToken(error.message);
    else status(error.message, true);
  }
}

start();
