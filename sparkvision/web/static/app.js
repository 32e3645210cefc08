"use strict";
// sparkvision web UI: plain JS, no build step. Talks only to this server's /api.

const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const fmt = (v, d = 3) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(d)) : (v ?? "—"));

const tokenInput = $("#token");
tokenInput.value = localStorage.getItem("sparkvision-token") || "";
tokenInput.addEventListener("change", () => localStorage.setItem("sparkvision-token", tokenInput.value));

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (tokenInput.value) headers["Authorization"] = "Bearer " + tokenInput.value;
  const res = await fetch(path, Object.assign({}, opts, {headers}));
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) throw new Error((body && body.error) || `${res.status} ${res.statusText}`);
  return body;
}

function showError(el, err) {
  if (!err) { el.hidden = true; el.textContent = ""; return; }
  el.hidden = false; el.textContent = err.message || String(err);
}

// ------------------------------------------------------------------ tabs
const tabs = document.querySelectorAll("nav button");
function openTab(name) {
  tabs.forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".tab").forEach((s) => s.classList.toggle("active", s.id === "tab-" + name));
  if (name === "detect") loadDetectors();
  if (name === "jobs") refreshJobs();
  if (name === "models") loadModels();
  if (name === "tables") loadTables();
  location.hash = name;
}
tabs.forEach((b) => b.addEventListener("click", () => openTab(b.dataset.tab)));

// ------------------------------------------------------------------ drop zones
function dropZone(zone, input, onFiles) {
  zone.addEventListener("click", (e) => { if (e.target === zone) input.click(); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); onFiles([...e.dataTransfer.files]); });
  input.addEventListener("change", () => { onFiles([...input.files]); input.value = ""; });
}

// ------------------------------------------------------------------ classify
async function classify(files) {
  const out = $("#classify-results");
  showError($("#classify-error"), null);
  if (!files.length) return;
  const fd = new FormData();
  files.forEach((f) => fd.append("files", f, f.name));
  out.innerHTML = '<p class="muted">classifying…</p>';
  try {
    const k = Math.max(1, parseInt($("#topk").value || "3", 10));
    const res = await api(`/api/classify?top_k=${k}`, {method: "POST", body: fd});
    out.innerHTML = "";
    res.results.forEach((r, i) => {
      const card = document.createElement("div");
      card.className = "card result";
      const probs = r.top_k.map((t) => `<span>${esc(t.label)}<div class="bar"><span style="width:${(100 * t.prob).toFixed(1)}%"></span></div></span><span>${(100 * t.prob).toFixed(1)}%</span>`).join("");
      card.innerHTML = `<img alt=""><div class="label" data-testid="label">${esc(r.label)}</div><div class="muted">${esc(r.filename)}</div><div class="prob">${probs}</div>`;
      card.querySelector("img").src = URL.createObjectURL(files[i]);
      out.appendChild(card);
    });
    const lat = document.createElement("p");
    lat.className = "muted latency";
    lat.textContent = `${res.results.length} image(s) in ${res.latency_ms} ms (model ${res.model})`;
    out.appendChild(lat);
  } catch (err) { out.innerHTML = ""; showError($("#classify-error"), err); }
}
dropZone($("#drop"), $("#classify-files"), classify);

// ------------------------------------------------------------------ detect
// The image is shown as uploaded; an <svg> over it, its viewBox the image's own pixels, holds one
// <rect> per detection at the server's coordinates, so the boxes scale with the picture.
const SVG_NS = "http://www.w3.org/2000/svg";
let detectUrl = null;

async function loadDetectors() {
  const sel = $("#detect-model");
  try {
    const res = await api("/api/models");
    const dets = res.models.filter((m) => m.config && m.config.task === "detection");
    const keep = sel.value;
    sel.innerHTML = dets.map((m) => `<option value="${esc(m.name)}">${esc(m.name)} (${esc(m.config.model)})</option>`).join("")
      || '<option value="" selected>none under the data roots: train one with a train-detector job</option>';
    if (dets.some((m) => m.name === keep)) sel.value = keep;
  } catch (err) { showError($("#detect-error"), err); }
}

function svgEl(name, attrs) {
  const el = document.createElementNS(SVG_NS, name);
  Object.entries(attrs).forEach(([k, v]) => el.setAttribute(k, v));
  return el;
}

async function detect(files) {
  showError($("#detect-error"), null);
  if (!files.length) return;
  const f = files[0];
  const model = $("#detect-model").value;
  if (!model) { showError($("#detect-error"), new Error("choose a detector first")); return; }
  const fd = new FormData();
  fd.append("file", f, f.name);
  const q = new URLSearchParams({model, min_score: $("#detect-min-score").value || "0.5", max_detections: $("#detect-max").value || "10"});
  try {
    const res = await api(`/api/detect?${q}`, {method: "POST", body: fd});
    await showDetections(f, res);
  } catch (err) { $("#detect-result").hidden = true; showError($("#detect-error"), err); }
}

async function showDetections(file, res) {
  const img = $("#detect-image"), svg = $("#detect-boxes");
  if (detectUrl) URL.revokeObjectURL(detectUrl);
  detectUrl = URL.createObjectURL(file);
  $("#detect-result").hidden = false;
  await new Promise((resolve) => { img.onload = resolve; img.onerror = resolve; img.src = detectUrl; });
  svg.setAttribute("viewBox", `0 0 ${res.width} ${res.height}`);
  svg.replaceChildren();
  const unit = res.width / (img.clientWidth || res.width); // image pixels per screen pixel
  res.detections.forEach((d, i) => {
    const g = svgEl("g", {"data-i": i});
    g.appendChild(svgEl("rect", {x: d.x1, y: d.y1, width: d.x2 - d.x1, height: d.y2 - d.y1, "vector-effect": "non-scaling-stroke"}));
    const t = svgEl("text", {x: d.x1 + 2 * unit, y: d.y1 + 12 * unit, "font-size": 11 * unit, "stroke-width": 3 * unit});
    t.textContent = String(i + 1);
    g.appendChild(t);
    svg.appendChild(g);
  });
  $("#detect-table tbody").innerHTML = res.detections.map((d, i) => `<tr data-i="${i}"><td>${i + 1}</td><td>${esc(d.label_name ?? d.label)}</td>
    <td>${fmt(d.score, 3)}</td>${["x1", "y1", "x2", "y2"].map((k) => `<td>${d[k].toFixed(1)}</td>`).join("")}</tr>`).join("")
    || '<tr><td colspan="7" class="muted">no detection at or above the minimum score</td></tr>';
  document.querySelectorAll("#detect-table tbody tr[data-i]").forEach((tr) => {
    const g = svg.querySelector(`g[data-i="${tr.dataset.i}"]`);
    tr.addEventListener("mouseenter", () => g.classList.add("hot"));
    tr.addEventListener("mouseleave", () => g.classList.remove("hot"));
  });
  $("#detect-caption").textContent = `${file.name}: ${res.detections.length} detection(s) with score ≥ ${res.min_score} · ${res.width}×${res.height} px · ${res.latency_ms} ms (${res.model})`;
}
dropZone($("#detect-drop"), $("#detect-file"), detect);

// ------------------------------------------------------------------ search
async function search(files) {
  showError($("#search-error"), null);
  if (!files.length) return;
  const f = files[0];
  $("#search-query").innerHTML = `<img alt="query"> <span class="muted">${esc(f.name)}</span>`;
  $("#search-query img").src = URL.createObjectURL(f);
  const fd = new FormData();
  fd.append("file", f, f.name);
  const grid = $("#search-results");
  grid.innerHTML = '<p class="muted">searching…</p>';
  try {
    const k = Math.max(1, parseInt($("#search-k").value || "8", 10));
    const res = await api(`/api/search?k=${k}`, {method: "POST", body: fd});
    grid.innerHTML = res.neighbours.map((h) => `<div class="cell">${h.thumb ? `<img src="${h.thumb}" alt="">` : ""}
      <b>#${h.rank}</b> ${fmt(h.score, 3)}<br>${esc(h.label_name || "")}<br><span class="muted">${esc((h.path || "").split("/").slice(-2).join("/"))}</span></div>`).join("")
      || '<p class="muted">no neighbours</p>';
  } catch (err) { grid.innerHTML = ""; showError($("#search-error"), err); }
}
dropZone($("#search-drop"), $("#search-file"), search);

// ------------------------------------------------------------------ jobs
let kinds = [];
let selectedJob = null;

function example(schema) {
  const out = {};
  for (const name of schema.required || []) out[name] = "";
  for (const [name, p] of Object.entries(schema.properties || {})) {
    if (!(name in out) && p.default !== undefined && p.default !== null && typeof p.default !== "object") out[name] = p.default;
  }
  return out;
}

async function loadKinds() {
  const res = await api("/api/jobs/kinds");
  kinds = res.kinds;
  const sel = $("#job-kind");
  sel.innerHTML = kinds.map((k) => `<option value="${esc(k.kind)}" ${k.available ? "" : "disabled"}>${esc(k.kind)}${k.available ? "" : " (not in this build)"}</option>`).join("");
  sel.addEventListener("change", kindChanged);
  kindChanged();
  const dk = kinds.find((k) => k.kind === "detect"); // the detect page starts from the job's defaults
  if (dk) {
    $("#detect-min-score").value = dk.schema.properties.min_score.default;
    $("#detect-max").value = dk.schema.properties.max_detections.default;
  }
}
function kindChanged() {
  const k = kinds.find((x) => x.kind === $("#job-kind").value);
  if (!k) return;
  $("#job-params").value = JSON.stringify(example(k.schema), null, 1);
  $("#job-kind-help").textContent = k.description + (k.inputs.length ? ` Paths (${[...k.inputs, ...k.outputs].join(", ")}) are relative to the data root.` : "");
}

$("#job-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  showError($("#job-error"), null);
  let params;
  try { params = JSON.parse($("#job-params").value || "{}"); } catch (err) { showError($("#job-error"), new Error("parameters are not valid JSON: " + err.message)); return; }
  try {
    const job = await api("/api/jobs", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({kind: $("#job-kind").value, params})});
    selectedJob = job.id;
    await refreshJobs();
  } catch (err) { showError($("#job-error"), err); }
});

function metricsText(m) {
  if (!m) return "";
  const keys = ["epoch", "loss", "images_per_s", "rows_written", "rows", "accuracy", "test_acc"];
  return keys.filter((k) => m[k] !== undefined && m[k] !== null).map((k) => `${k} ${fmt(m[k])}`).join(" · ");
}

async function refreshJobs() {
  try {
    const res = await api("/api/jobs?limit=50");
    $("#jobs-table tbody").innerHTML = res.jobs.map((j) => `<tr data-id="${esc(j.id)}" class="job-row">
      <td><code>${esc(j.id)}</code></td><td>${esc(j.kind)}</td><td><span class="state ${esc(j.state)}" data-testid="state">${esc(j.state)}</span></td>
      <td style="min-width:120px"><div class="bar"><span style="width:${j.progress}%"></span></div>${fmt(j.progress, 1)}%</td>
      <td class="muted">${esc(metricsText(j.metrics))}</td><td class="muted">${esc((j.created_at || "").replace("T", " ").replace("Z", ""))}</td>
      <td>${["queued", "running"].includes(j.state) ? "…" : ""}</td></tr>`).join("");
    document.querySelectorAll(".job-row").forEach((tr) => tr.addEventListener("click", () => { selectedJob = tr.dataset.id; refreshDetail(); }));
    if (selectedJob) await refreshDetail();
  } catch (err) { showError($("#job-error"), err); }
}

async function refreshDetail() {
  if (!selectedJob) return;
  const box = $("#job-detail");
  box.hidden = false;
  try {
    const j = await api(`/api/jobs/${encodeURIComponent(selectedJob)}`);
    $("#jd-id").textContent = j.id + " · " + j.kind;
    const st = $("#jd-state"); st.textContent = j.state; st.className = "state " + j.state;
    $("#jd-result").textContent = j.result_location || "";
    showError($("#jd-error"), j.error ? new Error(j.error) : null);
    $("#jd-log").textContent = (j.log_tail || []).join("\n");
    $("#jd-summary").textContent = JSON.stringify(j.result || j.metrics || {}, null, 1);
    $("#jd-cancel").disabled = !["queued", "running", "interrupted"].includes(j.state);
    $("#jd-resume").disabled = !["interrupted", "failed", "cancelled"].includes(j.state);
    const kd = kinds.find((k) => k.kind === j.kind);
    if (kd && (kd.reports_epochs || kd.evaluates)) {
      const m = await api(`/api/jobs/${encodeURIComponent(selectedJob)}/metrics`);
      drawCurves(m.history || []);
      $("#jd-confusion").innerHTML = m.confusion ? confusionTable(m.confusion) : "";
    } else { $("#jd-charts").hidden = true; $("#jd-confusion").innerHTML = ""; }
    await showPlan(j);
  } catch (err) { showError($("#jd-error"), err); }
}

// A plan job: the choice, the runners-up, why the rest lost, and the fitted curves (curves.png).
async function showPlan(j) {
  const box = $("#jd-plan");
  if (j.kind !== "plan" || !["succeeded", "failed"].includes(j.state)) { box.hidden = true; box.innerHTML = ""; return; }
  let p;
  try { p = await api(`/api/jobs/${encodeURIComponent(j.id)}/plan`); } catch (err) { box.hidden = true; return; }
  const unit = p.cost_unit === "money" ? "cost" : "core-s";
  const row = (name, o) => `<tr><th>${esc(name)}</th><td>${o.workers}</td><td>${o.threads_per_rank}</td><td>${o.batch_size}</td><td>${o.epochs}</td><td>${fmt(o.time_s, 1)}</td><td>${fmt(o.accuracy, 4)}</td><td>${fmt(o.cost, 1)}</td></tr>`;
  const rows = (p.choice ? [row("choice", p.choice)] : []).concat((p.runners_up || []).map((o, i) => row("runner-up " + (i + 1), o)));
  const m = p.measured;
  box.innerHTML = `<h4>Plan</h4>` + (p.message ? `<p class="muted">${esc(p.message)}</p>` : "") +
    (p.warning ? `<p data-testid="plan-warning"><strong>warning:</strong> ${esc(p.warning)}</p>` : "") +
    `<table class="plan"><tr><th></th><th>workers</th><th>threads</th><th>batch</th><th>epochs</th><th>time (s)</th><th>accuracy</th><th>${unit}</th></tr>${rows.join("")}</table>` +
    (m ? `<p data-testid="plan-measured">--run measured: ${fmt(m.time_s, 1)} s, accuracy ${fmt(m.accuracy, 4)}, ${unit} ${fmt(m.cost, 1)} (target ${m.target_met ? "met" : "missed"})</p>` : "") +
    `<img alt="fitted curves" data-testid="plan-curves" src="/api/jobs/${encodeURIComponent(j.id)}/curves.png?t=${Date.now()}">` +
    `<details><summary>ruled out (${(p.ruled_out || []).length})</summary><ul>${(p.ruled_out || []).map((r) => `<li>${esc(r)}</li>`).join("")}</ul></details>`;
  box.hidden = false;
}
$("#jd-cancel").addEventListener("click", async () => {
  try { await api(`/api/jobs/${selectedJob}/cancel`, {method: "POST"}); refreshJobs(); } catch (err) { showError($("#jd-error"), err); }
});
$("#jd-resume").addEventListener("click", async () => {
  try { await api(`/api/jobs/${selectedJob}/resume`, {method: "POST"}); refreshJobs(); } catch (err) { showError($("#jd-error"), err); }
});

// A small line chart on <canvas>: one or more series over epochs.
function lineChart(canvas, series, opts = {}) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 44, R = 10, T = 10, B = 26;
  ctx.clearRect(0, 0, W, H);
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) { ctx.fillStyle = "#888"; ctx.fillText("no data yet", W / 2 - 25, H / 2); return; }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = opts.min ?? Math.min(...ys), y1 = opts.max ?? Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => L + (W - L - R) * (x - x0) / (x1 - x0), Y = (y) => H - B - (H - T - B) * (y - y0) / (y1 - y0);
  ctx.strokeStyle = "#ccd"; ctx.fillStyle = "#556"; ctx.font = "10px sans-serif"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4; ctx.beginPath(); ctx.moveTo(L, Y(y)); ctx.lineTo(W - R, Y(y)); ctx.stroke();
    ctx.fillText(Math.abs(y) >= 100 ? y.toFixed(0) : y.toFixed(3), 2, Y(y) + 3);
  }
  ctx.fillText("epoch " + x0, L, H - 8); ctx.fillText(String(x1), W - R - 14, H - 8);
  series.forEach((s) => {
    ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 2; ctx.beginPath();
    s.points.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1])))); ctx.stroke();
    s.points.forEach((p) => { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 2.5, 0, 7); ctx.fill(); });
  });
  series.forEach((s, i) => { ctx.fillStyle = s.color; ctx.fillText(s.name, W - R - 80, T + 10 + 12 * i); });
}
function drawCurves(history) {
  $("#jd-charts").hidden = !history.length;
  const pts = (key) => history.filter((h) => h[key] !== null && h[key] !== undefined).map((h) => [h.epoch, h[key]]);
  lineChart($("#chart-loss"), [{name: "train loss", color: "#2864c7", points: pts("train_loss")}, {name: "test loss", color: "#d9822b", points: pts("test_loss")}]);
  lineChart($("#chart-acc"), [{name: "test acc", color: "#137333", points: pts("test_acc")}, {name: "mAP@0.5", color: "#b5453f", points: pts("map_50")}], {min: 0});
  lineChart($("#chart-ips"), [{name: "images/s", color: "#7b3fb5", points: pts("images_per_s")}], {min: 0});
}
function confusionTable(c) {
  const names = c.class_names || c.matrix.map((_, i) => String(i));
  const head = names.map((n) => `<th>${esc(n)}</th>`).join("");
  const rows = c.matrix.map((row, i) => {
    const tot = row.reduce((a, b) => a + b, 0) || 1;
    return `<tr><th>${esc(names[i])}</th>` + row.map((v) => {
      const a = v / tot; return `<td style="background:rgba(40,100,199,${a.toFixed(3)});color:${a > 0.5 ? "#fff" : "#123"}">${v}</td>`;
    }).join("") + "</tr>";
  }).join("");
  return `<h4>Confusion matrix ${c.split ? "(" + esc(c.split) + ")" : ""} · accuracy ${fmt(c.accuracy, 4)}</h4><p class="muted">rows: true class, columns: predicted</p><table class="cm"><tr><th></th>${head}</tr>${rows}</table>`;
}

// ------------------------------------------------------------------ models
async function loadModels() {
  try {
    const res = await api("/api/models");
    $("#models-table tbody").innerHTML = res.models.map((m, i) => `<tr data-i="${i}"><td>${esc(m.name)}</td><td>${esc(m.config.model)}</td>
      <td>${(m.classes || []).length}</td><td>${esc((m.preprocess.size || []).join("×"))} × ${esc(m.preprocess.channels)}</td>
      <td>${fmt(m.metrics.test_acc, 4)}</td><td>${m.evaluation ? "acc " + fmt(m.evaluation.accuracy, 4) : "—"}</td></tr>`).join("")
      || '<tr><td colspan="6" class="muted">no models under the data roots</td></tr>';
    document.querySelectorAll("#models-table tbody tr[data-i]").forEach((tr) => tr.addEventListener("click", () => {
      const m = res.models[+tr.dataset.i];
      let html = `<h3>${esc(m.name)}</h3><div class="charts"><figure><figcaption>Loss</figcaption><canvas id="m-loss" width="340" height="200"></canvas></figure>
        <figure><figcaption>Test accuracy</figcaption><canvas id="m-acc" width="340" height="200"></canvas></figure></div>`;
      if (m.evaluation && m.evaluation.confusion_matrix) html += confusionTable({class_names: m.evaluation.class_names, matrix: m.evaluation.confusion_matrix, accuracy: m.evaluation.accuracy, split: m.evaluation.split});
      html += `<pre>${esc(JSON.stringify(m.metrics, null, 1))}</pre>`;
      $("#model-detail").innerHTML = html;
      const h = m.history || [];
      lineChart($("#m-loss"), [{name: "train loss", color: "#2864c7", points: h.map((r) => [r.epoch, r.train_loss])}]);
      lineChart($("#m-acc"), [{name: "test acc", color: "#137333", points: h.filter((r) => r.test_acc != null).map((r) => [r.epoch, r.test_acc])}]);
    }));
  } catch (err) { $("#model-detail").innerHTML = `<div class="error">${esc(err.message)}</div>`; }
}

// ------------------------------------------------------------------ tables
let rowsState = {name: null, offset: 0, limit: 24, total: 0};
async function loadTables() {
  try {
    const res = await api("/api/tables");
    $("#tables-table tbody").innerHTML = res.tables.map((t) => `<tr data-name="${esc(t.name)}"><td>${esc(t.name)}</td><td>${esc(t.kind)}</td><td>${t.rows}</td><td class="muted">${esc(t.columns.join(", "))}</td></tr>`).join("")
      || '<tr><td colspan="4" class="muted">no tables under the data roots</td></tr>';
    document.querySelectorAll("#tables-table tbody tr[data-name]").forEach((tr) => tr.addEventListener("click", () => { rowsState = {name: tr.dataset.name, offset: 0, limit: 24, total: 0}; loadRows(); }));
  } catch (err) { $("#rows-view").hidden = false; $("#rows-grid").innerHTML = `<div class="error">${esc(err.message)}</div>`; }
}
async function loadRows() {
  $("#rows-view").hidden = false;
  $("#rows-title").textContent = rowsState.name;
  const src = $("#rows-source").value.trim();
  try {
    const q = `offset=${rowsState.offset}&limit=${rowsState.limit}` + (src ? `&source=${encodeURIComponent(src)}` : "");
    const res = await api(`/api/tables/${rowsState.name.split("/").map(encodeURIComponent).join("/")}/rows?${q}`);
    rowsState.total = res.total;
    $("#rows-range").textContent = `${res.total ? res.offset + 1 : 0}–${res.offset + res.rows.length} of ${res.total}`;
    $("#rows-grid").innerHTML = res.rows.map((r) => {
      let text = "";
      if (r.pred_name !== undefined) {
        const ok = r.label_name == null ? "" : (r.label_name === r.pred_name ? "right" : "wrong");
        text = `<span class="${ok}">${esc(r.pred_name ?? r.error ?? "")}</span> ${fmt(r.confidence, 2)}<br><span class="muted">true: ${esc(r.label_name ?? "?")}</span>`;
      } else {
        text = `${esc(r.label_name ?? "")} <span class="muted">${esc(r.split ?? "")}</span><br><span class="muted">${esc(r.width && r.height ? r.width + "×" + r.height : "")}</span>`;
      }
      return `<div class="cell">${r.thumb ? `<img src="${r.thumb}" alt="">` : '<div class="muted">(no image)</div>'}${text}</div>`;
    }).join("");
  } catch (err) { $("#rows-grid").innerHTML = `<div class="error">${esc(err.message)}</div>`; }
}
$("#rows-prev").addEventListener("click", () => { rowsState.offset = Math.max(0, rowsState.offset - rowsState.limit); loadRows(); });
$("#rows-next").addEventListener("click", () => { if (rowsState.offset + rowsState.limit < rowsState.total) { rowsState.offset += rowsState.limit; loadRows(); } });
$("#rows-source").addEventListener("change", () => rowsState.name && loadRows());

// ------------------------------------------------------------------ start
(async function init() {
  try {
    const h = await api("/api/health");
    $("#classify-model").textContent = h.model || "none (start with --model DIR)";
    $("#search-index").textContent = h.index || "none (start with --index DIR)";
  } catch (err) { /* shown on first use */ }
  loadKinds().catch((err) => showError($("#job-error"), err));
  setInterval(() => { if ($("#tab-jobs").classList.contains("active")) refreshJobs(); }, 1000);
  const start = (location.hash || "#classify").slice(1);
  if (document.getElementById("tab-" + start)) openTab(start);
})();
