// Laneway on-call console. Polls the API every POLL_MS and renders what it reads.
// Every value goes into the page through textContent or setAttribute, never innerHTML:
// prompts are user input. The admin token lives in this tab's sessionStorage only.
"use strict";

const POLL_MS = 2000;
const HISTORY_N = 150; // depth samples kept per lane: 5 minutes at POLL_MS
const AUDIT_N = 30;
const JOBS_N = 12;
const TOKEN_KEY = "laneway.admin_token";
const ACTOR_KEY = "laneway.actor";
const SVG_NS = "http://www.w3.org/2000/svg";

const ACTIONS = {
  promote: "make the canary the stable version for all traffic",
  pause: "hold the rollout at its current weight",
  resume: "continue the rollout's steps",
  abort: "send all traffic back to the stable version",
  rollback: "abort the model's rollout, or make its previous version stable",
};

const depthHistory = new Map(); // "engine/tier" -> recent depths, oldest first
const thumbnails = new Map(); // job id -> Promise of a blob: URL
const rendered = new Map(); // tbody id -> JSON of what it shows (skip identical re-renders)
let pending = null; // the action waiting for its confirmation: {action, model}

const $ = (id) => document.getElementById(id);

// -- DOM helpers ---------------------------------------------------------------------

function text(tag, value, className) {
  const node = document.createElement(tag);
  node.textContent = value === null || value === undefined ? "—" : String(value);
  if (className) node.className = className;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell);
    else td.textContent = cell === null || cell === undefined ? "—" : String(cell);
    tr.append(td);
  }
  return tr;
}

// Replace a table body's rows, unless it already shows exactly `data` (keeps buttons
// and focus stable between polls).
function fill(bodyId, data, makeRows, emptyText) {
  const key = JSON.stringify(data);
  if (rendered.get(bodyId) === key) return;
  rendered.set(bodyId, key);
  const body = $(bodyId);
  const rows = makeRows(data);
  if (rows.length === 0) {
    const td = text("td", emptyText, "muted");
    td.colSpan = body.closest("table").tHead.rows[0].cells.length;
    const tr = document.createElement("tr");
    tr.append(td);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

function seconds(value) {
  return value === null || value === undefined ? "—" : `${Number(value).toFixed(1)} s`;
}

function clock(iso) {
  const when = new Date(iso);
  return Number.isNaN(when.getTime()) ? iso : when.toLocaleTimeString();
}

// -- API calls -----------------------------------------------------------------------

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function headers(withBody) {
  const out = {};
  if (token()) out.Authorization = `Bearer ${token()}`;
  const actor = sessionStorage.getItem(ACTOR_KEY);
  if (actor) out["X-Laneway-Actor"] = actor;
  if (withBody) out["Content-Type"] = "application/json";
  return out;
}

async function call(method, path, body) {
  const response = await fetch(path, {
    method, cache: "no-store", headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      const error = (await response.json()).error;
      message = `${response.status} ${error.code}: ${error.message}`;
    } catch (_) { /* not the API's error shape; the status says enough */ }
    throw new Error(message);
  }
  return response;
}

async function getJson(path) {
  return (await call("GET", path)).json();
}

// Runs `work`; shows its error in the section's problem line, or clears the line.
async function section(problemId, work) {
  try {
    await work();
    $(problemId).textContent = "";
  } catch (error) {
    $(problemId).textContent = error.message;
  }
}

// -- lanes, workers, deployments (GET /v1/status) ------------------------------------

function sparkline(depths) {
  const width = 150, height = 24;
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const max = Math.max(1, ...depths);
  const step = width / (HISTORY_N - 1);
  const left = width - (depths.length - 1) * step; // the newest sample sits at the right
  const points = depths.map((depth, i) =>
    `${(left + i * step).toFixed(1)},${(height - 1 - (depth / max) * (height - 2)).toFixed(1)}`);
  const line = document.createElementNS(SVG_NS, "polyline");
  line.setAttribute("points", points.join(" "));
  const baseline = document.createElementNS(SVG_NS, "line"); // where depth 0 is drawn
  for (const [name, value] of [["x1", 0], ["y1", height - 1], ["x2", width], ["y2", height - 1]]) {
    baseline.setAttribute(name, value);
  }
  const title = document.createElementNS(SVG_NS, "title");
  title.textContent = `peak ${Math.max(0, ...depths)} over the last ${depths.length} samples`;
  svg.append(title, baseline, line);
  return svg;
}

function recordDepths(lanes) {
  for (const lane of lanes) {
    const key = `${lane.engine}/${lane.tier}`;
    const depths = depthHistory.get(key) || [];
    depths.push(lane.depth);
    if (depths.length > HISTORY_N) depths.shift();
    depthHistory.set(key, depths);
  }
}

function laneRows(lanes) {
  return lanes.map((lane) => row([
    lane.engine, lane.tier, lane.depth, seconds(lane.oldest_age_s),
    sparkline(depthHistory.get(`${lane.engine}/${lane.tier}`) || []),
  ]));
}

function workerRows(workers) {
  return workers.map((worker) => {
    const slots = document.createElement("div");
    for (const [engine, s] of Object.entries(worker.slots)) {
      slots.append(text("div", `${engine} ${s.busy}/${s.total}`, s.busy >= s.total ? "full" : ""));
    }
    return row([worker.name, worker.device, slots, seconds(worker.last_heartbeat_s)]);
  });
}

function actionButton(action, model) {
  const button = text("button", action, "action");
  button.type = "button";
  button.dataset.action = action;
  button.dataset.model = model;
  button.addEventListener("click", () => askToConfirm(action, model));
  return button;
}

function deploymentRows({ deployments, rollouts }) {
  return Object.values(deployments).map((deployment) => {
    const rollout = rollouts.find((r) => r.model === deployment.model);
    const active = rollout && (rollout.phase === "progressing" || rollout.phase === "paused");
    const actions = document.createElement("div");
    if (active) {
      actions.append(actionButton("promote", deployment.model));
      actions.append(actionButton(rollout.phase === "paused" ? "resume" : "pause",
        deployment.model));
      actions.append(actionButton("abort", deployment.model));
    }
    actions.append(actionButton("rollback", deployment.model));
    const about = rollout ? `${rollout.phase} ${rollout.canary}: ${rollout.message}` : null;
    return row([deployment.model, deployment.stable, deployment.canary,
      deployment.canary ? `${deployment.canary_weight}%` : null, about, actions]);
  });
}

async function refreshStatus() {
  const status = await getJson("/v1/status");
  $("policy-version").textContent = `policy ${status.policy_version}`;
  recordDepths(status.lanes);
  const lanes = status.lanes.map((lane) => ({
    ...lane, history: depthHistory.get(`${lane.engine}/${lane.tier}`) }));
  fill("lanes-body", lanes, laneRows, "no lanes");
  const deferred = status.deferred;
  $("deferred").textContent = `deferred: ${deferred.depth}, oldest ${seconds(deferred.oldest_age_s)}`;
  if (status.workers === undefined) return; // a tenant's view: lanes only
  fill("workers-body", status.workers, workerRows, "no live workers");
  fill("deployments-body", { deployments: status.deployments, rollouts: status.rollouts },
    deploymentRows, "no deployments");
}

// -- recent jobs and audit (admin token) ---------------------------------------------

function thumbnail(job) {
  if (job.images.length === 0) return text("span", null, "muted");
  const img = document.createElement("img");
  img.className = "thumb";
  img.alt = `first image of ${job.id}`;
  if (!thumbnails.has(job.id)) {
    const path = `/v1/admin/jobs/${encodeURIComponent(job.id)}/images/0`;
    thumbnails.set(job.id, call("GET", path)
      .then((response) => response.blob())
      .then((blob) => URL.createObjectURL(blob)));
  }
  thumbnails.get(job.id).then((url) => { img.src = url; },
    () => { thumbnails.delete(job.id); img.alt = "image unavailable"; });
  return img;
}

function forgetThumbnails(keepIds) {
  for (const [id, url] of thumbnails) {
    if (keepIds.has(id)) continue;
    thumbnails.delete(id);
    url.then((u) => URL.revokeObjectURL(u), () => {});
  }
}

function verdict(verification) {
  const action = verification.action && verification.action !== "none"
    ? ` (${verification.action})` : "";
  return text("span", `${verification.status}${action}`, `verdict-${verification.status}`);
}

function jobRows(jobs) {
  return jobs.map((job) => {
    const prompt = text("span", job.prompt, "prompt");
    prompt.title = job.prompt;
    return row([thumbnail(job), job.id, clock(job.created_at), job.route,
      text("span", job.status, `status-${job.status}`), verdict(job.verification), prompt]);
  });
}

function auditRows(entries) {
  return entries.map((entry) => row([clock(entry.at), entry.actor, entry.action,
    entry.target, entry.reason]));
}

async function refreshJobs() {
  const jobs = await getJson(`/v1/admin/jobs?limit=${JOBS_N}`);
  forgetThumbnails(new Set(jobs.map((job) => job.id)));
  fill("jobs-body", jobs, jobRows, "no jobs yet");
}

async function refreshAudit() {
  const entries = await getJson(`/v1/admin/audit?limit=${AUDIT_N}`);
  fill("audit-body", entries.reverse(), auditRows, "no audit entries");
}

function needToken(problemId, bodyId) {
  $(problemId).textContent = "Type the admin token above to see this.";
  rendered.delete(bodyId);
  $(bodyId).replaceChildren();
}

async function refresh() {
  const work = [section("lanes-problem", refreshStatus)];
  if (token()) {
    work.push(section("jobs-problem", refreshJobs), section("audit-problem", refreshAudit));
  } else {
    needToken("jobs-problem", "jobs-body");
    needToken("audit-problem", "audit-body");
  }
  await Promise.all(work);
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

function poll() {
  refresh().finally(() => setTimeout(poll, POLL_MS));
}

// -- actions: a second step with a required reason -----------------------------------

function askToConfirm(action, model) {
  pending = { action, model };
  $("confirm-what").textContent = `${action} ${model}: ${ACTIONS[action]}.`;
  $("confirm-reason").value = "";
  $("confirm-go").disabled = true;
  $("confirm-go").textContent = `Confirm ${action}`;
  $("confirm").hidden = false;
  $("confirm-reason").focus();
}

function closeConfirm() {
  pending = null;
  $("confirm").hidden = true;
}

function describe(action, model, result) {
  if (action !== "rollback") return `${action} ${model}: rollout is now ${result.phase}`;
  const aborted = result.aborted_canary ? `, aborted canary ${result.aborted_canary}` : "";
  return `rolled back ${model}: stable ${result.stable_before} → ${result.stable_after}${aborted}`;
}

async function confirmAction() {
  const reason = $("confirm-reason").value.trim();
  if (!pending || !reason) return;
  const { action, model } = pending;
  const name = encodeURIComponent(model);
  const path = action === "rollback"
    ? `/v1/admin/models/${name}/rollback` : `/v1/admin/rollouts/${name}/${action}`;
  closeConfirm();
  try {
    const result = await (await call("POST", path, { reason })).json();
    $("action-result").textContent = describe(action, model, result);
  } catch (error) {
    $("action-result").textContent = `${action} ${model} failed: ${error.message}`;
  }
  await refresh();
}

// -- token ---------------------------------------------------------------------------

function showTokenState() {
  $("token-state").textContent = token() ? "token set (this tab only)" : "no token";
  $("actor").value = sessionStorage.getItem(ACTOR_KEY) || "";
}

function init() {
  $("token-save").addEventListener("click", () => {
    if ($("token").value) sessionStorage.setItem(TOKEN_KEY, $("token").value);
    const actor = $("actor").value.trim();
    if (actor) sessionStorage.setItem(ACTOR_KEY, actor);
    else sessionStorage.removeItem(ACTOR_KEY);
    $("token").value = "";
    showTokenState();
    refresh();
  });
  $("token-clear").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
    refresh();
  });
  $("confirm-reason").addEventListener("input", () => {
    $("confirm-go").disabled = $("confirm-reason").value.trim() === "";
  });
  $("confirm-reason").addEventListener("keydown", (event) => {
    if (event.key === "Enter") confirmAction();
  });
  $("confirm-go").addEventListener("click", confirmAction);
  $("confirm-cancel").addEventListener("click", closeConfirm);
  showTokenState();
  poll();
}

init();
