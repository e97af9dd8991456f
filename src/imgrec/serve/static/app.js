// imgrec web page: choose, drop or paste an image; show it and its top-k labels as bars.
// Plain JavaScript, no CDN, no build step: the page must work on offline machines.
"use strict";

const $ = (id) => document.getElementById(id);
const fileInput = $("file-input");
const dropZone = $("drop-zone");
const statusLine = $("status");
const list = $("predictions");
let previewUrl = null;

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

async function loadModel() {
  try {
    const r = await fetch("/v1/model");
    const m = await r.json();
    if (!r.ok) throw new Error(m.error ? m.error.message : r.statusText);
    $("model-info").textContent =
      `Model ${m.model}: ${m.classes} classes, input ${m.input_size}×${m.input_size} px` +
      ` (${m.channels === 1 ? "greyscale" : "colour"}).`;
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

async function classify(file) {
  if (!file) return;
  showPreview(file);
  list.replaceChildren();
  setStatus("Classifying…");
  const form = new FormData();
  form.append("file", file, file.name || "pasted.png");
  try {
    const r = await fetch(`/v1/predict?top_k=${$("top-k").value}`, { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) {
      setStatus(body.error ? `Error: ${body.error.message}` : `Error ${r.status}`, true);
      return;
    }
    setStatus(`${body.predictions[0].label} (${body.elapsed_ms.toFixed(0)} ms)`);
    showPredictions(body.predictions);
  } catch (e) {
    setStatus(`Error: ${e.message}`, true);
  }
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
  if (fileInput.files[0]) classify(fileInput.files[0]);
});

loadModel();
