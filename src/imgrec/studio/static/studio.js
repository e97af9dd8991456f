// imgrec studio's page: one client of the /v1/studio/ API. No framework, no CDN.
"use strict";
const API = "/v1/studio/projects";
const $ = (id) => document.getElementById(id);
let current = null;      // the open project's name
let stream = null;       // the webcam's MediaStream
let polling = null;      // the training poll timer
let liveTest = null;     // the live webcam test timer

function say(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function call(path, options = {}) {
  const r = await fetch(path, options);
  if (r.status === 204) return null;
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const message = (body.error && body.error.message) || `HTTP ${r.status}`;
    say(message, true);
    throw new Error(message);
  }
  return body;
}

const json = (body) => ({method: "POST", headers: {"Content-Type": "application/json"},
                         body: JSON.stringify(body)});
const enc = encodeURIComponent;
const here = () => `${API}/${enc(current)}`;

// -- projects ----------------------------------------------------------------------------
async function loadProjects() {
  const list = await call(API);
  const ul = $("projects");
  ul.replaceChildren();
  for (const p of list) {
    const li = document.createElement("li");
    li.className = p.name === current ? "current" : "";
    const open = document.createElement("button");
    open.className = "open"; open.textContent = p.name; open.type = "button";
    open.onclick = () => openProject(p.name);
    const rename = document.createElement("button");
    rename.textContent = "Rename"; rename.type = "button"; rename.className = "rename-project";
    rename.onclick = async () => {
      const name = prompt(`Rename project “${p.name}” to:`, p.name);
      if (!name || name === p.name) return;
      await call(`${API}/${enc(p.name)}/rename`, json({name}));
      if (current === p.name) return openProject(name);
      loadProjects();
    };
    const del = document.createElement("button");
    del.textContent = "Delete"; del.type = "button"; del.className = "delete-project";
    del.onclick = async () => {
      if (!confirm(`Delete project “${p.name}”? It is moved to the studio's trash folder.`)) return;
      await call(`${API}/${enc(p.name)}`, {method: "DELETE"});
      if (current === p.name) { current = null; $("project").hidden = true; }
      loadProjects();
    };
    li.append(open, rename, del);
    ul.append(li);
  }
}

$("project-form").onsubmit = async (e) => {
  e.preventDefault();
  const name = $("project-name").value.trim();
  await call(API, json({name}));
  $("project-name").value = "";
  say(`project ${name} created`);
  await loadProjects();
  openProject(name);
};

async function openProject(name) {
  current = name;
  $("project").hidden = false;
  $("project-title").textContent = name;
  $("download").href = `${here()}/bundle.zip`;
  $("download-int8").href = `${here()}/bundle.zip?int8=true`;
  $("report").href = `${here()}/report/index.html`;
  await Promise.all([loadProjects(), loadClasses(), pollTraining()]);
}

// -- classes and images --------------------------------------------------------------------
$("class-form").onsubmit = async (e) => {
  e.preventDefault();
  await call(`${here()}/classes`, json({name: $("class-name").value.trim()}));
  $("class-name").value = "";
  loadClasses();
};

async function loadClasses() {
  const project = await call(here());
  const box = $("classes");
  box.replaceChildren();
  for (const c of project.classes) box.append(classCard(c));
  showCommands(project);
  markWarnings();
}

// imgrec doctor's findings (tiny, rotated, near duplicates...) beside the photos they concern
async function markWarnings() {
  const found = await call(`${here()}/warnings`);
  for (const w of found) {
    const [cls, file] = w.path.split("/");
    const card = [...document.querySelectorAll(".class-card")].find((c) => c.dataset.class === cls);
    const img = card && [...card.querySelectorAll(".thumbs img")].find((i) => i.alt === file);
    if (!img) continue;
    img.classList.add("warn");
    img.title = `${w.kind}: ${w.detail}\n` + img.title;
  }
}

function classCard(c) {
  const card = $("class-template").content.firstElementChild.cloneNode(true);
  card.dataset.class = c.name;
  card.querySelector(".name").textContent = c.name;
  card.querySelector(".count").textContent = `(${c.count})`;
  const base = `${here()}/classes/${enc(c.name)}`;
  const thumbs = card.querySelector(".thumbs");
  for (const f of c.images.slice(-200)) {
    const img = document.createElement("img");
    img.loading = "lazy"; img.alt = f; img.src = `${base}/images/${enc(f)}`;
    img.title = "click to move this photo to the trash"; img.tabIndex = 0;
    img.onclick = async () => {
      if (!confirm("Move this photo to the project's trash?")) return;
      await call(`${base}/images/${enc(f)}`, {method: "DELETE"});
      loadClasses();
    };
    thumbs.append(img);
  }
  card.querySelector(".file-input").onchange = (e) => upload(c.name, [...e.target.files]);
  card.querySelector(".rename-class").onclick = async () => {
    const name = prompt(`Rename class “${c.name}” to:`, c.name);
    if (!name || name === c.name) return;
    await call(`${base}/rename`, json({name}));
    loadClasses();
  };
  card.addEventListener("pointerdown", () => { pasteTarget = c.name; markPasteTarget(); });
  if (pasteTarget === c.name) card.classList.add("paste-target");
  card.querySelector(".delete-class").onclick = async () => {
    if (!confirm(`Delete class “${c.name}”? Its photos go to the project's trash.`)) return;
    await call(base, {method: "DELETE"});
    loadClasses();
  };
  card.ondragover = (e) => { e.preventDefault(); card.classList.add("dragging"); };
  card.ondragleave = () => card.classList.remove("dragging");
  card.ondrop = (e) => {
    e.preventDefault(); card.classList.remove("dragging");
    upload(c.name, [...e.dataTransfer.files]);
  };
  holdToCapture(card.querySelector(".capture"), c.name);
  return card;
}

async function upload(cls, files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name || "capture.jpg");
  const out = await call(`${here()}/classes/${enc(cls)}/images`, {method: "POST", body: form});
  const notes = out.rejected.map((r) => `${r.filename}: ${r.error}`).join("; ");
  say(`${cls}: ${out.added} added` + (out.duplicates ? `, ${out.duplicates} already there` : "")
      + (notes ? ` — refused ${notes}` : ""), !!notes);
  await loadClasses();
}

$("empty-trash").onclick = async () => {
  if (!confirm("Erase the photos in this project's trash for good?")) return;
  await call(`${here()}/trash`, {method: "DELETE"});
  say("trash emptied");
};

// -- the webcam ----------------------------------------------------------------------------
async function startWebcam() {
  if (stream) return stream;
  stream = await navigator.mediaDevices.getUserMedia({video: {width: 320, height: 240}});
  $("webcam").srcObject = stream;
  $("webcam").hidden = false;
  $("webcam-toggle").textContent = "Stop webcam";
  await $("webcam").play().catch(() => {});
  return stream;
}

function stopWebcam() {
  if (stream) stream.getTracks().forEach((t) => t.stop());
  stream = null;
  $("webcam").hidden = true;
  $("webcam-toggle").textContent = "Start webcam";
}

$("webcam-toggle").onclick = () => (stream ? stopWebcam() : startWebcam().catch(
  (e) => say(`no webcam: ${e.message}`, true)));

function frame() {
  const video = $("webcam");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth || 320; canvas.height = video.videoHeight || 240;
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
}

function holdToCapture(button, cls) {
  let timer = null, frames = [];
  const start = async (e) => {
    e.preventDefault();
    try { await startWebcam(); } catch (err) { say(`no webcam: ${err.message}`, true); return; }
    button.classList.add("active");
    frames = [];
    const grab = async () => { const b = await frame(); if (b) frames.push(new File([b], `webcam-${Date.now()}-${frames.length}.jpg`, {type: "image/jpeg"})); };
    grab();
    timer = setInterval(grab, 200);  // five frames a second while held
  };
  const stop = async () => {
    if (timer === null) return;
    clearInterval(timer); timer = null;
    button.classList.remove("active");
    await upload(cls, frames);
  };
  button.addEventListener("pointerdown", start);
  button.addEventListener("pointerup", stop);
  button.addEventListener("pointerleave", stop);
  button.addEventListener("keydown", (e) => { if (e.key === " " && timer === null) start(e); });
  button.addEventListener("keyup", (e) => { if (e.key === " ") stop(); });
}

// -- training --------------------------------------------------------------------------------
$("train").onclick = async () => {
  const options = {backbone: $("backbone").value, augment_views: Number($("views").value || 0),
                   val_fraction: Number($("val-share").value || 0.34)};
  if ($("epochs").value) options.epochs = Number($("epochs").value);
  await call(`${here()}/train`, json(options));
  pollTraining();
};

async function pollTraining() {
  clearTimeout(polling);
  if (!current) return;
  const s = await call(`${here()}/train`);
  showTraining(s);
  if (s.state === "running" && window.EventSource) { watchTraining(); return; }
  if (s.state === "running") { waitedForFigures = 0; polling = setTimeout(pollTraining, 1000); }
  else if (s.state === "done" && !s.validation && waitedForFigures++ < 30) {
    polling = setTimeout(pollTraining, 1000);  // the confusion matrix follows the model
  }
  if (s.state === "done" && waitedForFigures <= 1) loadClasses();
}

// live progress: the server pushes each change (server-sent events) until the run is over,
// then one more look settles the page (polling is the fallback)
let events = null;
function watchTraining() {
  if (events) events.close();
  const project = current;
  events = new EventSource(`${here()}/train/events`);
  events.onmessage = (e) => { if (current === project) showTraining(JSON.parse(e.data)); };
  events.onerror = () => {
    events.close(); events = null;
    waitedForFigures = 0;
    if (current === project) pollTraining();
  };
}

function showTraining(s) {
  $("train-progress").value = s.progress;
  $("train-state").textContent = `${s.state}${s.message ? ": " + s.message : ""}` +
    (s.seconds != null && s.state !== "running" ? ` (${s.seconds} s)` : "");
  $("train-state").dataset.state = s.state;
  $("val-accuracy").textContent = s.val_accuracy == null ? "–" : `${(100 * s.val_accuracy).toFixed(1)}%`;
  $("train").disabled = s.state === "running";
  showValidation(s.validation);
}

let waitedForFigures = 0;

// per-class accuracy and the confusion matrix on the validation photos (rows: true class)
function showValidation(v) {
  const box = $("validation");
  box.replaceChildren();
  if (!v) return;
  const table = document.createElement("table");
  table.className = "confusion";
  const head = table.createTHead().insertRow();
  head.insertCell().textContent = "true \\ predicted";
  for (const l of v.labels) head.insertCell().textContent = l;
  head.insertCell().textContent = "accuracy";
  const body = table.createTBody();
  v.labels.forEach((l, i) => {
    const row = body.insertRow();
    row.insertCell().textContent = l;
    v.confusion_matrix[i].forEach((n, j) => {
      const cell = row.insertCell();
      cell.textContent = n;
      if (i === j) cell.className = "diagonal";
    });
    const acc = v.per_class_accuracy[l];
    row.insertCell().textContent = acc === null ? "no photo" : `${(100 * acc).toFixed(1)}%`;
  });
  const caption = table.createCaption();
  caption.textContent = "Validation photos: rows are the true class";
  box.append(table);
}

// -- testing ---------------------------------------------------------------------------------
async function classify(blob, name) {
  const form = new FormData();
  form.append("file", blob, name);
  const out = await call(`${here()}/predict`, {method: "POST", body: form});
  const ul = $("test-results");
  ul.replaceChildren();
  for (const p of out.predictions) {
    const li = document.createElement("li");
    const pct = (100 * p.probability).toFixed(1);
    li.innerHTML = `<span class="label"></span><div role="meter" aria-valuemin="0" aria-valuemax="100"><div class="bar"></div></div><span class="pct"></span>`;
    li.querySelector(".label").textContent = p.label;
    li.querySelector("[role=meter]").setAttribute("aria-valuenow", pct);
    li.querySelector(".bar").style.width = `${pct}%`;
    li.querySelector(".pct").textContent = `${pct}%`;
    ul.append(li);
  }
  say(`${out.predictions[0].label} (${(100 * out.predictions[0].probability).toFixed(1)}%)`);
}

$("test-file").onchange = (e) => {
  const f = e.target.files[0];
  if (!f) return;
  $("test-preview").src = URL.createObjectURL(f);
  $("test-preview").hidden = false;
  classify(f, f.name);
};

$("test-webcam").onclick = async () => {
  if (liveTest) { clearInterval(liveTest); liveTest = null; $("test-webcam").textContent = "Classify the webcam live"; return; }
  await startWebcam();
  $("test-webcam").textContent = "Stop live test";
  let busy = false;
  liveTest = setInterval(async () => {
    if (busy) return;
    busy = true;
    try { await classify(await frame(), "webcam.jpg"); } catch (e) { /* shown in #status */ }
    busy = false;
  }, 300);
};

// -- export ----------------------------------------------------------------------------------
function showCommands(project) {
  const origin = location.origin;
  $("commands").textContent = project.has_model ?
    `unzip ${project.name}-model.zip -d ${project.name}-model\n` +
    `imgrec serve ${project.name}-model --port 8000\n` +
    `curl -F file=@photo.jpg http://localhost:8000/v1/predict\n` +
    `# with the int8 download: unzip ${project.name}-model-int8.zip, then serve it with --int8\n\n` +
    `# or, from this studio:\ncurl -F file=@photo.jpg ${origin}${here()}/predict` :
    "Train the project first.";
}

// pasted images go to the class card clicked last, else to the test panel
let pasteTarget = null;
function markPasteTarget() {
  for (const card of document.querySelectorAll(".class-card")) {
    card.classList.toggle("paste-target", card.dataset.class === pasteTarget);
  }
}
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData ? e.clipboardData.files : [])];
  if (!files.length || !current) return;
  e.preventDefault();
  if (pasteTarget) upload(pasteTarget, files);
  else classify(files[0], files[0].name || "pasted.png");
});
$("test-panel").addEventListener("pointerdown", () => { pasteTarget = null; markPasteTarget(); });

$("serve-here").onclick = async () => {
  await call(`${here()}/serve`, {method: "POST"});
  $("serving").textContent = `served: curl -F file=@photo.jpg ${location.origin}/v1/predict`;
  say(`${current}'s model answers ${location.origin}/v1/predict`);
};

loadProjects();
