// The buildpool dashboard: renders the pool view from /api/events and a live tail of each
// running job from /api/jobs/ID/tail. No dependencies; works offline.
"use strict";

const TAIL_LINES = 200;
const tails = new Map(); // job id -> { source, text, pre }

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function seconds(s) {
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function since(unixMs) {
  return seconds(Math.max(0, (Date.now() - unixMs) / 1000));
}

function time(unixMs) {
  return new Date(unixMs).toLocaleTimeString();
}

function fill(table, rows, columns, empty) {
  const body = document.querySelector(`#${table} tbody`);
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: columns }, empty))]));
}

function renderAgents(agents) {
  document.getElementById("agent-count").textContent = `(${agents.length})`;
  fill("agents", agents.map((a) => {
    const share = a.slots_total ? (100 * a.slots_used) / a.slots_total : 0;
    const disk = a.disk_budget_bytes ? `${bytes(a.disk_used_bytes)} of ${bytes(a.disk_budget_bytes)}` : "no budget";
    const state = el("td", {});
    if (a.draining) state.append(el("span", { class: "badge warn" }, "draining"));
    // The embedded agent runs the developer's own jobs in their environment by design.
    if (a.local) state.append(el("span", { class: "badge" }, "embedded local agent"));
    else state.append(el("span", { class: a.sandboxed ? "badge" : "badge warn" }, a.sandboxed ? "sandboxed" : "unsandboxed"));
    return el("tr", { "data-agent-id": a.id },
      el("td", { class: "mono", title: a.address }, a.id),
      el("td", {}, el("span", { class: "bar" }, el("span", { style: `width:${share}%` })), `${a.slots_used}/${a.slots_total}`),
      el("td", {}, a.labels.join(", ")),
      el("td", { class: "mono" }, a.system),
      el("td", {}, disk),
      el("td", { title: new Date(a.connected_since_unix_ms).toString() }, `${time(a.connected_since_unix_ms)} (${since(a.connected_since_unix_ms)})`),
      state);
  }), 7, "No agent connected");
}

function renderQueue(queued) {
  document.getElementById("queue-count").textContent = `(${queued.length})`;
  fill("queue", queued.map((j) => el("tr", { "data-job-id": j.job_id, "data-job-state": "queued" },
    el("td", { class: "mono" }, `#${j.job_id}`),
    el("td", {}, j.kind),
    el("td", { class: "mono" }, j.worktree),
    el("td", { class: "mono" }, j.cargo_args.join(" ")),
    el("td", {}, since(j.submitted_unix_ms)))), 5, "Nothing queued");
}

function renderRunning(running) {
  document.getElementById("running-count").textContent = `(${running.length})`;
  const container = document.getElementById("running");
  const ids = new Set(running.map((j) => j.job_id));
  for (const [id, tail] of tails) {
    if (!ids.has(id)) { tail.source.close(); tails.delete(id); }
  }
  container.replaceChildren(...running.map((j) => {
    const tail = tails.get(j.job_id) || openTail(j.job_id);
    return el("div", { class: "job", "data-job-id": j.job_id, "data-job-state": "running" },
      el("div", { class: "head" },
        el("strong", { class: "mono" }, `#${j.job_id} cargo ${j.kind} ${j.cargo_args.join(" ")}`),
        el("span", { class: "run" }, `running on ${j.agent_id}, attempt ${j.attempt}`),
        el("span", { class: "mono" }, j.worktree),
        el("span", {}, `submitted ${since(j.submitted_unix_ms)} ago`),
        el("a", { href: `/jobs/${j.job_id}/log`, target: "_blank" }, "full log")),
      tail.pre);
  }));
  if (!running.length) container.replaceChildren(el("div", { class: "empty" }, "Nothing running"));
}

function openTail(id) {
  const pre = el("pre", { "data-job-tail": id });
  const tail = { source: new EventSource(`/api/jobs/${id}/tail`), text: "", pre };
  tail.source.addEventListener("output", (event) => {
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    const lines = (tail.text + JSON.parse(event.data)).split("\n");
    tail.text = lines.slice(-TAIL_LINES).join("\n");
    pre.textContent = tail.text;
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  });
  tail.source.addEventListener("end", () => tail.source.close());
  tails.set(id, tail);
  return tail;
}

function renderFinished(finished) {
  document.getElementById("finished-count").textContent = `(${finished.length})`;
  fill("finished", finished.map((j) => el("tr", { "data-job-id": j.job_id, "data-job-state": "finished", "data-outcome": j.outcome },
    el("td", { class: "mono" }, `#${j.job_id}`),
    el("td", {}, j.kind),
    el("td", { class: "mono" }, j.worktree),
    el("td", { class: "mono" }, j.branch || "(detached)"),
    el("td", {}, j.agent_id ? (j.local ? `${j.agent_id} (local)` : j.agent_id) : "never ran"),
    el("td", {}, j.attempt),
    el("td", { class: j.outcome, title: j.end }, `${j.outcome} (${j.end})`),
    el("td", {}, seconds(j.queue_secs)),
    el("td", {}, seconds(j.run_secs)),
    el("td", {}, time(j.finished_unix_ms)),
    el("td", {}, el("a", { href: `/jobs/${j.job_id}/log`, target: "_blank" }, "log")))), 11, "No job finished yet");
}

function render(view) {
  document.getElementById("repository").textContent = view.repository;
  renderAgents(view.agents);
  renderRunning(view.running);
  renderQueue(view.queued);
  renderFinished(view.finished);
}

function connect() {
  const badge = document.getElementById("connection");
  const source = new EventSource("/api/events");
  source.addEventListener("state", (event) => {
    badge.textContent = "live";
    badge.dataset.connection = "live";
    render(JSON.parse(event.data));
  });
  source.onerror = () => {
    badge.textContent = "reconnecting…";
    badge.dataset.connection = "lost";
  };
}

connect();
