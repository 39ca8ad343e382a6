// vitkit serve: the page. Plain JS, no build step. Every number drawn here comes from the server's JSON.
"use strict";

const $ = (id) => document.getElementById(id);
const VIEW = 384; // the canvas side in screen pixels
const state = { info: null, image: null, base: null, overlay: null, query: null, heat: new Map() };

const LABELS = {
  none: "prediction only", attention: "attention of a pixel", rollout: "attention rollout",
  cam: "CAM / Grad-CAM", gradcat: "GradCAT path", distance: "attention distance per head",
};

function message(text, error = false) {
  $("message").textContent = text;
  $("message").className = error ? "error" : "";
}

async function call(url, options) {
  const r = await fetch(url, options);
  let body = null;
  try { body = await r.json(); } catch (e) { body = { error: `${r.status} ${r.statusText}` }; }
  if (!r.ok) {
    const retry = r.headers.get("Retry-After");
    throw new Error((body && body.error) || `${r.status}` + (retry ? ` (retry in ${retry} s)` : ""));
  }
  return body;
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = reject;
    img.src = src;
  });
}

// a grey map (0..255 = 0..max) coloured with a jet-like ramp, as an offscreen canvas at the input's size;
// for attention, zero stays clear, so a family's geometry (a NesT block, a HaloNet window) shows as the painted area
function jet(v) {
  const t = v / 255;
  const c = (x) => Math.round(255 * Math.max(0, Math.min(1, 1.5 - Math.abs(4 * t - x))));
  return [c(3), c(2), c(1)];
}

async function colour(png, clearZero) {
  const key = `${clearZero}:${png}`;
  if (state.heat.has(key)) return state.heat.get(key);
  const img = await loadImage(png);
  const cv = document.createElement("canvas");
  cv.width = img.width; cv.height = img.height;
  const ctx = cv.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, cv.width, cv.height);
  for (let i = 0; i < d.data.length; i += 4) {
    const [r, g, b] = jet(d.data[i]);
    d.data[i + 3] = clearZero && d.data[i] === 0 ? 0 : 255; // exactly 0: not attended, the image shows
    d.data[i] = r; d.data[i + 1] = g; d.data[i + 2] = b;
  }
  ctx.putImageData(d, 0, 0);
  if (state.heat.size > 64) state.heat.clear();
  state.heat.set(key, cv);
  return cv;
}

function scale() {
  const [h, w] = state.image.size;
  return VIEW / Math.max(h, w);
}

function cross(ctx, y, x, s, colourName) {
  ctx.strokeStyle = colourName; ctx.lineWidth = 2;
  const cx = (x + 0.5) * s, cy = (y + 0.5) * s;
  ctx.beginPath();
  ctx.moveTo(cx - 8, cy); ctx.lineTo(cx + 8, cy); ctx.moveTo(cx, cy - 8); ctx.lineTo(cx, cy + 8);
  ctx.stroke();
}

async function draw() {
  const view = $("view"), ctx = view.getContext("2d");
  ctx.clearRect(0, 0, view.width, view.height);
  if (!state.image) return;
  const s = scale(), [h, w] = state.image.size;
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(state.base, 0, 0, w * s, h * s);
  const alpha = $("opacity").value / 100;
  const o = state.overlay;
  let drawn = "";
  if (state.image.mask) {
    ctx.globalAlpha = alpha;
    ctx.drawImage(await loadImage(state.image.mask), 0, 0, w * s, h * s);
    ctx.globalAlpha = 1;
    drawn = "mask";
  }
  if (o && o.map) {
    ctx.globalAlpha = alpha;
    ctx.drawImage(await colour(o.map.png, o.kind === "attention"), 0, 0, w * s, h * s);
    ctx.globalAlpha = 1;
    drawn = o.kind;
  }
  if (o && o.kind === "gradcat") {
    o.boxes.forEach(([y0, x0, y1, x1], i) => {
      ctx.strokeStyle = ["#ff3b30", "#ff9500", "#ffcc00", "#fff"][Math.min(i, 3)];
      ctx.lineWidth = Math.max(1, 4 - i);
      ctx.strokeRect(x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s);
    });
  }
  if (o && o.peak) cross(ctx, o.peak[0], o.peak[1], s, "#00e5ff");
  if (state.image.boxes) {
    const min = $("score").value / 100;
    ctx.font = "12px system-ui"; ctx.lineWidth = 2;
    for (const d of state.image.boxes.filter((b) => b.score >= min)) {
      const [x0, y0, x1, y1] = d.box;
      ctx.strokeStyle = ctx.fillStyle = "#ff2d55";
      ctx.strokeRect(x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s);
      ctx.fillText(`${d.label} ${d.score.toFixed(2)}`, x0 * s + 2, y0 * s + 12);
    }
    drawn = drawn || "boxes";
  }
  if (o && o.kind === "attention" && state.query) cross(ctx, state.query[0], state.query[1], s, "#fff");
  view.dataset.overlay = drawn;
}

function showPrediction(res) {
  const list = $("predictions");
  list.innerHTML = "";
  const p = res.prediction;
  const rows = p.top ? p.top.map((t) => [t.class, t.prob])
    : p.classes ? Object.entries(p.classes).sort((a, b) => b[1] - a[1])
    : (res.boxes || []).filter((b) => b.score >= $("score").value / 100).map((b) => [b.label, b.score]);
  $("results-title").textContent = p.top ? "Top classes" : p.classes ? "Pixels per class" : "Detections";
  for (const [name, prob] of rows) {
    const li = document.createElement("li");
    li.innerHTML = `<span class="name"></span><span class="bar"></span><span class="prob"></span>`;
    li.querySelector(".name").textContent = name;
    li.querySelector(".bar").style.width = `${Math.round(120 * prob)}px`;
    li.querySelector(".prob").textContent = prob.toFixed(3);
    list.appendChild(li);
  }
  $("truth").textContent = res.label !== undefined ? `held-out image ${res.index}, labelled ${res.label}` : "";
}

function plotDistance(d) {
  const cv = $("plot"), ctx = cv.getContext("2d");
  cv.classList.remove("hidden");
  ctx.clearRect(0, 0, cv.width, cv.height);
  const vals = d.pixels.flat().filter((v) => v !== null);
  const top = Math.max(1, ...vals) * 1.1, L = d.pixels.length;
  const X = (l) => 50 + ((l + 0.5) / L) * (cv.width - 70), Y = (v) => cv.height - 40 - (v / top) * (cv.height - 60);
  ctx.strokeStyle = "#555"; ctx.fillStyle = "#333"; ctx.font = "11px system-ui";
  ctx.beginPath(); ctx.moveTo(50, 10); ctx.lineTo(50, cv.height - 40); ctx.lineTo(cv.width - 10, cv.height - 40); ctx.stroke();
  ctx.fillText("layer", cv.width / 2, cv.height - 8);
  ctx.save(); ctx.translate(12, cv.height / 2 + 60); ctx.rotate(-Math.PI / 2);
  ctx.fillText("mean attention distance (px)", 0, 0); ctx.restore();
  for (let k = 0; k <= 4; k++) ctx.fillText((top * k / 4).toFixed(0), 24, Y(top * k / 4) + 4);
  d.pixels.forEach((heads, l) => {
    ctx.fillStyle = "#333"; ctx.fillText(String(l), X(l) - 3, cv.height - 26);
    heads.forEach((v, h) => {
      if (v === null) return;
      ctx.fillStyle = `hsl(${(h * 67) % 360} 70% 45%)`;
      ctx.beginPath(); ctx.arc(X(l) + (h - heads.length / 2) * 3, Y(v), 3.5, 0, 2 * Math.PI); ctx.fill();
    });
  });
  cv.dataset.points = String(vals.length);
}

function headMap() {
  const o = state.overlay, h = Number($("head").value);
  return h >= o.heads.length ? o.mean : o.heads[h];
}

function updateControls() {
  const m = $("method").value, info = state.info;
  $("layer-row").classList.toggle("hidden", m !== "attention");
  $("head-row").classList.toggle("hidden", m !== "attention");
  $("target-row").classList.toggle("hidden", !(m === "cam" || m === "gradcat"));
  $("score-row").classList.toggle("hidden", !(info && info.task === "detection"));
  $("plot").classList.toggle("hidden", m !== "distance");
  const layer = info && info.layers[Number($("layer").value)];
  if (layer) {
    $("layer-label").textContent = `${$("layer").value}: ${layer.name}`;
    $("head").max = String(layer.heads);
    const h = Number($("head").value);
    $("head-label").textContent = h >= layer.heads ? "mean of heads" : `${h} of ${layer.heads}`;
  }
  $("score-label").textContent = ($("score").value / 100).toFixed(2);
}

async function explain() {
  const m = $("method").value, img = state.image;
  updateControls();
  if (!img) return;
  const base = `/api/images/${img.id}`;
  const target = $("target").value === "" ? "" : `?target=${$("target").value}`;
  try {
    if (m === "attention") {
      if (!state.query) { state.overlay = null; message("Click a pixel to see where it attends."); }
      else {
        const [y, x] = state.query;
        const a = await call(`${base}/attention?layer=${$("layer").value}&y=${y}&x=${x}`);
        state.overlay = { kind: "attention", heads: a.heads, mean: a.mean };
        state.overlay.map = headMap();
        message(`pixel (${y}, ${x}), ${a.name}: peak ${state.overlay.map.max.toPrecision(3)} per key token`);
      }
    } else if (m === "rollout") {
      const r = await call(`${base}/rollout`);
      state.overlay = { kind: "rollout", map: r.map };
      message("attention rollout of the class token");
    } else if (m === "cam") {
      const r = await call(`${base}/cam${target}`);
      state.overlay = { kind: "cam", map: r.map, peak: r.peak };
      message(`${r.kind} of class ${r.class}`);
    } else if (m === "gradcat") {
      const r = await call(`${base}/gradcat${target}`);
      state.overlay = { kind: "gradcat", map: r.map, boxes: r.boxes, peak: r.peak };
      message(`GradCAT of class ${r.class}: one block per level, leaf peak marked`);
    } else if (m === "distance") {
      const r = await call(`${base}/distance`);
      state.overlay = null;
      plotDistance(r);
      message("mean attention distance per layer (x) and head (colour)");
    } else {
      state.overlay = null;
      message("");
    }
  } catch (e) {
    state.overlay = null;
    message(e.message, true);
  }
  await draw();
}

async function show(res) {
  state.image = res;
  state.base = await loadImage(res.input);
  state.query = null;
  state.overlay = null;
  showPrediction(res);
  message(`${res.size[0]}x${res.size[1]} input; click a pixel to see where it attends`);
  await explain();
}

async function upload(file) {
  if (!file) return;
  const most = state.info.limits.max_bytes;
  if (file.size > most) {
    message(`${file.name}: ${file.size} bytes; this server takes at most ${most}`, true);
    return;
  }
  message(`uploading ${file.name}...`);
  try {
    await show(await call("/api/images", { method: "POST", body: file }));
  } catch (e) {
    message(`${file.name}: ${e.message}`, true);
  }
}

async function pick() {
  try {
    await show(await call(`/api/held-out/${Number($("held-out").value)}`));
  } catch (e) {
    message(e.message, true);
  }
}

async function init() {
  const info = (state.info = await call("/api/info"));
  $("model").textContent = `${info.model} (${info.task}, input ${info.input_size.join("x")}; ${info.source})`;
  const method = $("method");
  for (const m of ["none", ...info.methods]) method.add(new Option(LABELS[m] || m, m));
  if (info.methods.includes("attention")) method.value = "attention";
  $("layer").max = String(Math.max(0, info.layers.length - 1));
  $("layer").value = $("layer").max;
  $("target").add(new Option("the prediction", ""));
  info.classes.forEach((c, i) => $("target").add(new Option(c, String(i))));
  if (info.held_out > 0) {
    $("held-out-row").classList.remove("hidden");
    $("held-out").max = String(info.held_out - 1);
    $("held-out-count").textContent = `0 to ${info.held_out - 1}`;
  }
  const off = Object.entries(info.unavailable).map(([m, why]) => `${LABELS[m] || m}: ${why}`);
  $("note").textContent = off.length ? `Not for this model: ${off.join("; ")}` : "";
  updateControls();
  document.body.dataset.ready = "1";
}

$("file").addEventListener("change", (e) => upload(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files[0]); });
$("pick").addEventListener("click", pick);
$("method").addEventListener("change", explain);
$("target").addEventListener("change", explain);
$("layer").addEventListener("input", () => { updateControls(); if (state.query) explain(); });
$("head").addEventListener("input", () => {
  updateControls();
  if (state.overlay && state.overlay.kind === "attention") { state.overlay.map = headMap(); draw(); }
});
$("opacity").addEventListener("input", draw);
$("score").addEventListener("input", () => { updateControls(); if (state.image) showPrediction(state.image); draw(); });
$("view").addEventListener("click", (e) => {
  if (!state.image || !state.info.methods.includes("attention")) return;
  const s = scale(), [h, w] = state.image.size;
  const y = Math.min(h - 1, Math.floor(e.offsetY / s)), x = Math.min(w - 1, Math.floor(e.offsetX / s));
  state.query = [y, x];
  $("method").value = "attention";
  explain();
});
init().catch((e) => message(`could not reach the server: ${e.message}`, true));
