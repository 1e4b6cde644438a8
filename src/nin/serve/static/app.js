// The nin serve page: choose, drop or draw an image; show what the network sees, the top-k classes
// (from POST /v1/predict, the same answer an API client gets) and the class activation map of the
// chosen class (POST /v1/cam?format=json).  A server holding several models (GET /v1/models) gets a
// model menu: uploads then go to POST /v1/models/{name}/predict and /v1/cam?model={name}.
// No framework, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
// models: GET /v1/models' list; model: the chosen one's description; seq: the latest upload's number
const state = { models: [], model: null, key: sessionStorage.getItem("nin-api-key") || "", last: null, cam: null,
  seq: 0 };

async function api(path, body) {
  const headers = state.key ? { "X-API-Key": state.key } : {};
  const res = await fetch(path, body ? { method: "POST", body, headers } : { headers });
  if (res.status === 401) { $("key-card").hidden = false; }
  const data = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
  return data;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// the test accuracy the model's description records with its own TTA (GET /v1/models), if it does
function accuracyText(m) {
  if (typeof m.accuracy !== "number" || !Number.isFinite(m.accuracy)) return "";
  return `${(100 * m.accuracy).toFixed(2)}%` +
    (m.accuracy_tta && m.accuracy_tta !== "none" ? ` (${m.accuracy_tta} TTA)` : "");
}

async function loadModel() {
  try {
    const { models } = await api("/v1/models");  // the first is the server's default (/v1/predict's)
    $("key-card").hidden = true;
    const chosen = state.model && models.find((m) => m.name === state.model.name);
    state.models = models;
    const select = $("model");
    select.replaceChildren(...models.map((m) => {
      const acc = accuracyText(m);
      return new Option(acc ? `${m.name} · ${acc}` : m.name, m.name);
    }));
    select.value = (chosen || models[0]).name;
    select.disabled = models.length < 2;  // one model: no menu, the page as it always was
    $("model-choice").hidden = models.length < 2;
    showModel(chosen || models[0]);
  } catch (e) {
    $("model-info").textContent = "model unavailable";
    showError(e.message);
  }
}

function chooseModel(name) {
  const m = state.models.find((x) => x.name === name);
  if (!m || m === state.model) return;
  state.seq++;  // an answer still on its way is the previous model's: it is not shown
  state.lastBlob = null;  // changing topk or invert later does not resend the previous image
  clearPrediction();
  showModel(m);
}

// several models: each at /v1/models/{name}/predict; one: /v1/predict, as before
function routes(m) {
  if (state.models.length < 2) return { predict: "/v1/predict", cam: "/v1/cam?" };
  const name = encodeURIComponent(m.name);
  return { predict: `/v1/models/${name}/predict`, cam: `/v1/cam?model=${name}&` };
}

// the header names the chosen model; the drawing and the class maps follow what it can do
function showModel(m) {
  state.model = m;
  const [c, h, w] = m.input_size;
  const acc = accuracyText(m);
  const parts = [m.weights && m.weights !== m.model ? `${m.model} · ${m.weights}` : m.model,
    `${m.classes.length} classes`, `input ${c}×${h}×${w}`, m.backend];
  const info = $("model-info");
  info.replaceChildren();
  parts.forEach((text, i) => {
    if (i) info.append(" · ");
    if (i === 0) { const b = document.createElement("b"); b.textContent = text; info.append(b); } else info.append(text);
  });
  if (acc) {
    const b = document.createElement("b"); b.id = "model-accuracy"; b.textContent = `test accuracy ${acc}`;
    info.append(" · ", b);
  }
  $("draw-card").hidden = !(c === 1 && h === 28 && w === 28);
  $("cam-figure").hidden = !m.cam;
  $("bars-hint").hidden = !m.cam;
  showError("");
}

async function classify(blob, name) {
  if (!state.model) await loadModel();
  if (!state.model) return;
  const k = $("topk").value, inv = $("invert").checked;
  const form = () => { const f = new FormData(); f.append("file", blob, name); return f; };
  const query = `topk=${k}&invert=${inv}`;
  const model = state.model, route = routes(model), seq = ++state.seq;
  const current = () => seq === state.seq;  // a later upload or another model: this answer is not shown
  document.body.classList.add("busy");
  try {
    const pred = await api(`${route.predict}?${query}&preview=true`, form());
    if (!current()) return;
    state.last = pred;
    state.cam = null;
    showError("");
    showPrediction(pred, name);
    if (model.cam) {
      const cam = await api(`${route.cam}${query}&format=json`, form());
      if (!current()) return;
      state.cam = cam;
      drawCam(pred.top[0].class);
    }
  } catch (e) {
    if (!current()) return;
    clearPrediction();  // the previous image's answer must not stay beside this one's error
    // the server's messages about the image already start with its name: say it once
    showError(e.message.startsWith(`${name}:`) ? e.message : `${name}: ${e.message}`);
  } finally {
    document.body.classList.remove("busy");
  }
}

function clearPrediction() {
  state.last = null;
  state.cam = null;
  state.seen = null;
  $("result").hidden = true;
  $("empty").hidden = false;
  $("file-name").textContent = "";
  $("top-class").textContent = "";
  $("top-prob").textContent = "";
  $("cam-class").textContent = "";
  $("bars").replaceChildren();
}

function showPrediction(pred, name) {
  $("empty").hidden = true;
  $("result").hidden = false;
  $("file-name").textContent = name ? `· ${name}` : "";
  const best = pred.top[0];
  $("top-class").textContent = best.class;
  $("top-prob").textContent = `${(100 * best.prob).toFixed(1)}%`;
  const [, h, w] = state.model.input_size;
  $("seen-size").textContent = `${w}×${h}`;
  const img = new Image();
  img.onload = () => {
    const cv = $("seen"), ctx = cv.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, cv.width, cv.height);
    ctx.drawImage(img, 0, 0, cv.width, cv.height);
    state.seen = img;
    if (state.cam) drawCam(state.camClass);
  };
  img.src = pred.input;
  const bars = $("bars");
  bars.replaceChildren();
  pred.top.forEach((t, i) => {
    const li = document.createElement("li");
    li.dataset.cls = t.class;
    if (i === 0) li.classList.add("chosen");
    const nameEl = document.createElement("span"); nameEl.className = "name"; nameEl.textContent = t.class;
    const track = document.createElement("span"); track.className = "track";
    const fill = document.createElement("span"); fill.className = "fill";
    fill.style.width = `${Math.max(0.5, 100 * t.prob).toFixed(1)}%`;
    track.append(fill);
    const pct = document.createElement("span"); pct.className = "pct"; pct.textContent = `${(100 * t.prob).toFixed(1)}%`;
    li.append(nameEl, track, pct);
    li.addEventListener("click", () => drawCam(t.class));
    bars.append(li);
  });
}

// matplotlib's "jet", as `nin cam` colours its maps
function jet(v) {
  const r = Math.min(Math.max(1.5 - Math.abs(4 * v - 3), 0), 1);
  const g = Math.min(Math.max(1.5 - Math.abs(4 * v - 2), 0), 1);
  const b = Math.min(Math.max(1.5 - Math.abs(4 * v - 1), 0), 1);
  return [255 * r, 255 * g, 255 * b];
}

function drawCam(cls) {
  if (!state.cam || !state.seen) { state.camClass = cls; return; }
  const entry = state.cam.top.find((t) => t.class === cls);
  if (!entry) return;
  state.camClass = cls;
  document.querySelectorAll("#bars li").forEach((li) => li.classList.toggle("chosen", li.dataset.cls === cls));
  $("cam-class").textContent = cls;
  const cv = $("cam"), ctx = cv.getContext("2d");
  // the image in grey underneath
  ctx.imageSmoothingEnabled = false;
  ctx.filter = "grayscale(1)";
  ctx.drawImage(state.seen, 0, 0, cv.width, cv.height);
  ctx.filter = "none";
  // the map, min-max scaled, coloured, 45% opaque, smoothly upsampled
  const map = entry.map, mh = map.length, mw = map[0].length;
  let lo = Infinity, hi = -Infinity;
  for (const row of map) for (const v of row) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const small = document.createElement("canvas");
  small.width = mw; small.height = mh;
  const sctx = small.getContext("2d"), px = sctx.createImageData(mw, mh);
  for (let y = 0; y < mh; y++) for (let x = 0; x < mw; x++) {
    const v = hi > lo ? (map[y][x] - lo) / (hi - lo) : 0, [r, g, b] = jet(v), i = 4 * (y * mw + x);
    px.data[i] = r; px.data[i + 1] = g; px.data[i + 2] = b; px.data[i + 3] = 255;
  }
  sctx.putImageData(px, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.globalAlpha = 0.45;
  ctx.drawImage(small, 0, 0, cv.width, cv.height);
  ctx.globalAlpha = 1;
}

function setUpDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    const f = e.target.files[0];
    if (f) classify(f, f.name);
    e.target.value = "";
  });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const f = e.dataTransfer.files[0];
    if (f) classify(f, f.name);
  });
  const again = () => { if (state.lastBlob) classify(...state.lastBlob); };
  $("topk").addEventListener("change", again);
  $("model").addEventListener("change", (e) => chooseModel(e.target.value));
  $("invert").addEventListener("change", again);
}

function setUpDrawing() {
  const cv = $("draw"), ctx = cv.getContext("2d");
  const clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, cv.width, cv.height); };
  clear();
  ctx.strokeStyle = "#fff"; ctx.lineWidth = 22; ctx.lineCap = "round"; ctx.lineJoin = "round";
  let drawing = false;
  const at = (e) => { const r = cv.getBoundingClientRect(); return [(e.clientX - r.left) * cv.width / r.width, (e.clientY - r.top) * cv.height / r.height]; };
  cv.addEventListener("pointerdown", (e) => { drawing = true; cv.setPointerCapture(e.pointerId); ctx.beginPath(); ctx.moveTo(...at(e)); ctx.lineTo(...at(e)); ctx.stroke(); });
  cv.addEventListener("pointermove", (e) => { if (drawing) { ctx.lineTo(...at(e)); ctx.stroke(); } });
  const end = () => {
    if (!drawing) return;
    drawing = false;
    cv.toBlob((b) => classify(b, "drawing.png"), "image/png");
  };
  cv.addEventListener("pointerup", end);
  cv.addEventListener("pointercancel", end);
  $("clear").addEventListener("click", clear);
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = state.key;
  $("key-save").addEventListener("click", () => {
    state.key = $("key").value.trim();
    sessionStorage.setItem("nin-api-key", state.key);
    loadModel();
  });
  const original = classify;
  classify = (blob, name) => { state.lastBlob = [blob, name]; return original(blob, name); };
  setUpDrop();
  setUpDrawing();
  loadModel();
});
