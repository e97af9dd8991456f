// imgrec web page: choose, drop or paste an image, or (for a one-channel, MNIST-style model)
// draw a digit; show the image and its top-k labels as bars.
// Plain JavaScript, no CDN, no build step: the page must work on offline machines.
"use strict";

const $ = (id) => document.getElementById(id);
const fileInput = $("file-input");
const dropZone = $("drop-zone");
const statusLine = $("status");
const list = $("predictions");
let previewUrl = null;
// What the labels are about: the last file, or the drawing (re-sent when top-k changes).
let lastSource = null;
// Each request gets a number; an answer that arrives after a newer request was sent is
// dropped, so the bars always show the latest drawing.
let requestSeq = 0;

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

async function loadModel() {
  try {
    const r = await api("/v1/model");
    const m = await r.json();
    if (!r.ok) throw new Error(m.error ? m.error.message : r.statusText);
    $("model-info").textContent =
      `Model ${m.model}: ${m.classes} classes, input ${m.input_size}×${m.input_size} px` +
      ` (${m.channels === 1 ? "greyscale" : "colour"}).`;
    if (m.channels === 1) setupDrawing();
  } catch (e) {
    $("model-info").textContent = `Cannot describe the model: ${e.message}`;
  }
}

function showPreview(file) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("preview").src = previewUrl;
  $("preview-name").textContent = file.name || "pasted image";
  $("preview-figure").hidden = false;
}

function showPredictions(preds) {
  list.replaceChildren();
  for (const p of preds) {
    const pct = (p.probability * 100).toFixed(1);
    const li = document.createElement("li");
    li.className = "prediction";
    const row = document.createElement("div");
    row.className = "prediction-row";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const prob = document.createElement("span");
    prob.className = "probability";
    prob.textContent = `${pct}%`;
    row.append(label, prob);
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("role", "meter");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    bar.setAttribute("aria-valuenow", pct);
    bar.setAttribute("aria-label", `${p.label}: ${pct} percent`);
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0.5, p.probability * 100)}%`;
    bar.append(fill);
    li.append(row, bar);
    list.append(li);
  }
}

// aria-busy on the list: true from the moment a new answer is due until it is shown
function setBusy(busy) {
  list.setAttribute("aria-busy", busy ? "true" : "false");
}

async function send(blob, name, seq = ++requestSeq) {
  setBusy(true);
  const form = new FormData();
  form.append("file", blob, name);
  try {
    const r = await api(`/v1/predict?top_k=${$("top-k").value}`, { method: "POST", body: form });
    const body = await r.json();
    if (seq !== requestSeq) return; // a newer request is on its way
    if (!r.ok) {
      list.replaceChildren();
      setStatus(body.error ? `Error: ${body.error.message}` : `Error ${r.status}`, true);
      return;
    }
    setStatus(`${body.predictions[0].label} (${body.elapsed_ms.toFixed(0)} ms)`);
    showPredictions(body.predictions);
  } catch (e) {
    if (seq === requestSeq) setStatus(`Error: ${e.message}`, true);
  } finally {
    if (seq === requestSeq && drawTimer === null) setBusy(false);
  }
}

async function classify(file) {
  if (!file) return;
  lastSource = file;
  showPreview(file);
  list.replaceChildren();
  setStatus("Classifying…");
  await send(file, file.name || "pasted.png");
}

// -- drawing (one-channel models) ---------------------------------------------------------------
const canvas = $("draw-canvas");
const ctx = canvas.getContext("2d");
let drawTimer = null;
let lastPoint = null;
let inked = false;

function clearCanvas() {
  // Dark ink on white, like paper: the model's contract (fit "digit") inverts it, finds the
  // ink and frames it as MNIST did.
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  inked = false;
}

function canvasPoint(e) {
  const box = canvas.getBoundingClientRect();
  return {
    x: ((e.clientX - box.left) / box.width) * canvas.width,
    y: ((e.clientY - box.top) / box.height) * canvas.height,
  };
}

function strokeTo(p) {
  ctx.beginPath();
  ctx.moveTo(lastPoint.x, lastPoint.y);
  ctx.lineTo(p.x, p.y);
  ctx.stroke();
  lastPoint = p;
  inked = true;
}

function sendDrawing() {
  clearTimeout(drawTimer);
  drawTimer = null;
  if (!inked) return;
  lastSource = "drawing";
  const seq = ++requestSeq; // numbered now: an older answer arriving meanwhile is stale
  setBusy(true);
  canvas.toBlob((blob) => blob && send(blob, "drawing.png", seq), "image/png");
}

function scheduleDrawing() {
  // debounce: classify ~150 ms after the last stroke movement, and at most that often
  setBusy(true);
  if (drawTimer === null) drawTimer = setTimeout(sendDrawing, 150);
}

function setupDrawing() {
  $("draw-zone").hidden = false;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.strokeStyle = "#000000";
  ctx.lineWidth = 18;
  clearCanvas();
  canvas.addEventListener("pointerdown", (e) => {
    if (e.button !== 0 && e.pointerType === "mouse") return;
    e.preventDefault();
    canvas.setPointerCapture(e.pointerId);
    lastPoint = canvasPoint(e);
    strokeTo({ x: lastPoint.x + 0.01, y: lastPoint.y }); // a tap leaves a dot
    $("preview-figure").hidden = true;
    scheduleDrawing();
  });
  canvas.addEventListener("pointermove", (e) => {
    if (lastPoint === null) return;
    e.preventDefault();
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
    for (const ev of events.length ? events : [e]) strokeTo(canvasPoint(ev));
    scheduleDrawing();
  });
  const end = () => {
    if (lastPoint === null) return;
    lastPoint = null;
    sendDrawing(); // the finished stroke is classified at once
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  $("clear-button").addEventListener("click", () => {
    clearCanvas();
    clearTimeout(drawTimer);
    drawTimer = null;
    requestSeq++; // an answer still on its way is for the old drawing
    setBusy(false);
    if (lastSource === "drawing") {
      lastSource = null;
      list.replaceChildren();
      setStatus("");
    }
  });
}

fileInput.addEventListener("change", () => classify(fileInput.files[0]));
for (const type of ["dragenter", "dragover"]) {
  dropZone.addEventListener(type, (e) => {
    e.preventDefault();
    dropZone.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  dropZone.addEventListener(type, () => dropZone.classList.remove("dragging"));
}
dropZone.addEventListener("drop", (e) => {
  e.preventDefault();
  const file = e.dataTransfer && e.dataTransfer.files[0];
  if (file) classify(file);
});
document.addEventListener("paste", (e) => {
  const items = (e.clipboardData && e.clipboardData.items) || [];
  for (const item of items) {
    if (item.kind === "file") {
      classify(item.getAsFile());
      e.preventDefault();
      return;
    }
  }
});
$("top-k").addEventListener("change", () => {
  if (lastSource === "drawing") sendDrawing();
  else if (lastSource) classify(lastSource);
});

loadModel();
