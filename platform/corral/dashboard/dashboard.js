// Corral's jobs dashboard: lists the signed-in tenant's jobs, and for the selected one its
// loss and validation-loss curve, checkpoints and log tail; polls every 2 s while a job is
// unfinished. Everything from the server goes into the page as text (textContent,
// attributes through the DOM), never as HTML.
"use strict";

(() => {
  const POLL_ACTIVE_MS = 2000;
  const POLL_IDLE_MS = 15000;
  const LOG_TAIL_LINES = 200;
  const JOBS_PAGE = 100;
  const METRICS_PAGE = 1000;
  const MAX_METRIC_PAGES_PER_POLL = 20;
  const MAX_MARKED_POINTS = 1000; // beyond this a series is drawn as a line only
  const UNFINISHED = new Set(["scheduled", "running"]);
  const TRAINING_KINDS = new Set(["supervised_fine_tune", "preference_optimize"]);
  const SERIES = [
    { name: "loss", label: "loss" },
    { name: "validation_loss", label: "validation loss" },
  ];
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    jobs: [],
    selected: null, // job_uuid
    details: new Map(), // job_uuid -> {metrics: Map(step -> row), settled: bool}
    timer: null,
    generation: 0, // a restart makes the running poll's successor obsolete
  };

  const byId = (id) => document.getElementById(id);

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function svg(tag, attributes) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      node.setAttribute(name, String(value));
    }
    return node;
  }

  async function getJson(path) {
    const response = await fetch(path, {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    if (response.status === 401) {
      window.location.assign("/dashboard/login");
      throw new Error("the session ended");
    }
    if (!response.ok) {
      let message = `${response.status}`;
      try {
        const body = await response.json();
        if (body && body.error && body.error.message) message += ` ${body.error.message}`;
      } catch (_) {
        // not JSON: the status says enough
      }
      throw new Error(`${path}: ${message}`);
    }
    return response.json();
  }

  const jobPath = (uuid) => `/jobs/${encodeURIComponent(uuid)}`;

  function when(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
  }

  function number(value) {
    return typeof value === "number" && Number.isFinite(value) ? value.toPrecision(4) : "";
  }

  // ---------------------------------------------------------------- the job list

  function queueText(job) {
    const parts = [];
    if (typeof job.queue_position === "number") parts.push(`#${job.queue_position}`);
    if (job.queue_reason) parts.push(String(job.queue_reason));
    return parts.join(" · ");
  }

  function progressText(job) {
    const progress = job.progress;
    if (!progress) return "";
    return progress.total_steps ? `${progress.step} / ${progress.total_steps}` : `${progress.step}`;
  }

  function renderJobs() {
    const body = document.querySelector("#jobs tbody");
    const rows = state.jobs.map((job) => {
      const row = element("tr");
      row.dataset.jobUuid = job.job_uuid;
      row.dataset.status = job.status;
      if (job.job_uuid === state.selected) row.classList.add("selected");
      const name = element("td");
      const open = element("button", job.job_uuid, "link");
      open.type = "button";
      name.append(open);
      const status = element("td", job.status, `state state-${job.status}`);
      status.dataset.status = job.status;
      row.append(
        name,
        element("td", job.kind),
        status,
        element("td", queueText(job), "queue"),
        element("td", progressText(job)),
        element("td", number(job.progress && job.progress.loss)),
        element("td", job.checkpoints),
        element("td", when(job.scheduled_at)),
        element("td", when(job.completed_at)),
      );
      row.addEventListener("click", () => select(job.job_uuid));
      return row;
    });
    body.replaceChildren(...rows);
    byId("no-jobs").hidden = state.jobs.length > 0;
  }

  function select(uuid) {
    state.selected = uuid;
    history.replaceState(null, "", `#job=${encodeURIComponent(uuid)}`);
    renderJobs();
    restart();
  }

  // ---------------------------------------------------------------- one job

  function detailsOf(uuid) {
    if (!state.details.has(uuid)) state.details.set(uuid, { metrics: new Map(), settled: false });
    return state.details.get(uuid);
  }

  async function fetchMetrics(uuid, details) {
    // A step's training and validation figures arrive apart: read the last known step
    // again (from after the one before it) and merge by step.
    const steps = [...details.metrics.keys()].sort((a, b) => a - b);
    let after = steps.length >= 2 ? steps[steps.length - 2] : null;
    for (let page = 0; page < MAX_METRIC_PAGES_PER_POLL; page += 1) {
      const query = new URLSearchParams({ limit: String(METRICS_PAGE) });
      if (after !== null) query.set("after_step", String(after));
      const body = await getJson(`${jobPath(uuid)}/metrics?${query}`);
      for (const row of body.data) details.metrics.set(row.step, row);
      if (body.next_after_step === null || body.next_after_step === undefined) return;
      after = body.next_after_step;
    }
  }

  async function refreshDetail(job) {
    const details = detailsOf(job.job_uuid);
    if (details.settled) return; // finished, and read once since it finished
    const finished = !UNFINISHED.has(job.status);
    const [logs, artifacts] = await Promise.all([
      getJson(`${jobPath(job.job_uuid)}/logs`),
      TRAINING_KINDS.has(job.kind)
        ? getJson(`/post_training/job/artifacts?job_uuid=${encodeURIComponent(job.job_uuid)}`)
        : Promise.resolve({ checkpoints: [] }),
      fetchMetrics(job.job_uuid, details),
    ]);
    details.logs = logs.log_lines;
    details.checkpoints = artifacts.checkpoints;
    details.settled = finished;
  }

  function renderDetail(job) {
    const section = byId("detail");
    if (!job) {
      section.hidden = true;
      return;
    }
    section.hidden = false;
    section.dataset.jobUuid = job.job_uuid;
    const details = detailsOf(job.job_uuid);
    byId("job-title").textContent = `${job.job_uuid} (${job.kind})`;
    const status = byId("job-state");
    status.textContent = job.status;
    status.className = `state state-${job.status}`;
    status.dataset.status = job.status;
    byId("job-queue").textContent = queueText(job);
    const error = byId("job-error");
    error.textContent = job.error || "";
    error.hidden = !job.error;
    renderCurve(details);
    renderCheckpoints(details.checkpoints || []);
    const lines = details.logs || [];
    const tail = lines.slice(-LOG_TAIL_LINES);
    const log = byId("log-tail");
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = tail.join("\n");
    log.dataset.lines = String(tail.length);
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function renderCheckpoints(checkpoints) {
    const list = byId("checkpoints");
    const items = checkpoints.map((checkpoint) => {
      const item = element("li");
      item.append(element("span", `step ${checkpoint.iters}: `));
      let link = null;
      try {
        const url = new URL(checkpoint.path);
        if (url.protocol === "https:" || url.protocol === "http:") {
          link = element("a", checkpoint.path);
          link.href = url.href;
          link.rel = "noopener noreferrer";
        }
      } catch (_) {
        // not a URL: shown as text
      }
      item.append(link || element("span", checkpoint.path));
      return item;
    });
    if (items.length === 0) items.push(element("li", "none yet", "hint"));
    list.replaceChildren(...items);
    list.dataset.count = String(checkpoints.length);
  }

  // ---------------------------------------------------------------- the curve

  function renderCurve(details) {
    const rows = [...details.metrics.values()].sort((a, b) => a.step - b.step);
    const series = SERIES.map((s) => ({
      ...s,
      points: rows
        .filter((row) => typeof (row.values || {})[s.name] === "number")
        .map((row) => ({ step: row.step, value: row.values[s.name] })),
    }));
    const width = 720;
    const height = 280;
    const pad = { left: 56, right: 16, top: 28, bottom: 36 };
    const chart = svg("svg", {
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-label": "loss and validation loss by step",
      class: "loss-curve",
      "data-steps": rows.length,
    });
    for (const s of series) chart.setAttribute(`data-${s.name.replace("_", "-")}-points`, s.points.length);

    const all = series.flatMap((s) => s.points);
    if (all.length === 0) {
      chart.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }));
      chart.lastChild.textContent = "no metrics yet";
    } else {
      const steps = all.map((p) => p.step);
      const values = all.map((p) => p.value);
      let [x0, x1] = [Math.min(...steps), Math.max(...steps)];
      let [y0, y1] = [Math.min(...values), Math.max(...values)];
      if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
      if (y0 === y1) [y0, y1] = [y0 - 0.5, y1 + 0.5];
      const margin = (y1 - y0) * 0.05;
      // Losses are not negative: the margin below never takes the axis under zero.
      [y0, y1] = [y0 >= 0 ? Math.max(0, y0 - margin) : y0 - margin, y1 + margin];
      const x = (step) => pad.left + ((step - x0) / (x1 - x0)) * (width - pad.left - pad.right);
      const y = (value) => height - pad.bottom - ((value - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);

      for (let i = 0; i <= 4; i += 1) {
        const value = y0 + ((y1 - y0) * i) / 4;
        chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(value), y2: y(value), class: "grid" }));
        const label = svg("text", { x: pad.left - 6, y: y(value) + 4, "text-anchor": "end", class: "label" });
        label.textContent = value.toPrecision(3);
        chart.append(label);
      }
      chart.append(svg("line", { x1: pad.left, x2: pad.left, y1: pad.top, y2: height - pad.bottom, class: "axis" }));
      chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: height - pad.bottom, y2: height - pad.bottom, class: "axis" }));
      for (const [step, anchor] of [[x0, "start"], [x1, "end"]]) {
        const label = svg("text", { x: x(step), y: height - pad.bottom + 16, "text-anchor": anchor, class: "label" });
        label.textContent = `step ${Math.round(step)}`;
        chart.append(label);
      }

      series.forEach((s, index) => {
        const key = svg("line", { x1: pad.left + index * 150, x2: pad.left + index * 150 + 20, y1: 14, y2: 14, class: `series key ${s.name}` });
        const text = svg("text", { x: pad.left + index * 150 + 26, y: 18, class: "label" });
        text.textContent = `${s.label} (${s.points.length})`;
        chart.append(key, text);
        if (s.points.length === 0) return;
        const line = svg("polyline", {
          points: s.points.map((p) => `${x(p.step).toFixed(1)},${y(p.value).toFixed(1)}`).join(" "),
          class: `series ${s.name}`,
          "data-points": s.points.length,
        });
        chart.append(line);
        if (s.points.length > MAX_MARKED_POINTS) return;
        for (const p of s.points) {
          const mark = svg("circle", {
            cx: x(p.step).toFixed(1),
            cy: y(p.value).toFixed(1),
            r: 3,
            class: `point ${s.name}`,
            "data-series": s.name,
            "data-step": p.step,
            "data-value": p.value,
          });
          const title = svg("title");
          title.textContent = `step ${p.step}: ${s.label} ${number(p.value)}`;
          mark.append(title);
          chart.append(mark);
        }
      });
    }
    byId("curve").replaceChildren(chart);
    const count = byId("metric-count");
    count.dataset.count = String(rows.length);
    count.textContent = `${rows.length} steps recorded`;
  }

  // ---------------------------------------------------------------- polling

  async function refresh() {
    const listed = await getJson(`/jobs?limit=${JOBS_PAGE}`);
    state.jobs = listed.data;
    if (state.selected === null && state.jobs.length > 0) state.selected = state.jobs[0].job_uuid;
    renderJobs();
    if (state.selected === null) {
      renderDetail(null);
      return;
    }
    let job = state.jobs.find((j) => j.job_uuid === state.selected);
    if (!job) {
      try {
        job = await getJson(jobPath(state.selected)); // beyond the first page
      } catch (error) {
        state.selected = null; // e.g. an address naming a job this tenant does not have
        history.replaceState(null, "", window.location.pathname);
        renderDetail(null);
        throw error;
      }
    }
    await refreshDetail(job);
    renderDetail(job);
    return job;
  }

  function restart() {
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = null;
    state.generation += 1;
    tick();
  }

  async function tick() {
    const generation = state.generation;
    let selected;
    try {
      selected = await refresh();
      byId("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
      document.body.dataset.loaded = "true";
    } catch (error) {
      byId("status").textContent = `update failed: ${error.message}`;
    }
    const active =
      state.jobs.some((job) => UNFINISHED.has(job.status)) ||
      (selected !== undefined && UNFINISHED.has(selected.status));
    if (generation !== state.generation) return; // restarted meanwhile: that poll goes on
    document.body.dataset.polling = active ? "active" : "idle";
    state.timer = setTimeout(tick, active ? POLL_ACTIVE_MS : POLL_IDLE_MS);
  }

  async function start() {
    const match = /^#job=(.+)$/.exec(window.location.hash);
    if (match) state.selected = decodeURIComponent(match[1]);
    try {
      const session = await getJson("/dashboard/session");
      byId("tenant").textContent = `tenant ${session.tenant}`;
      byId("logout").hidden = !session.sign_in;
    } catch (error) {
      byId("status").textContent = `update failed: ${error.message}`;
    }
    tick();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
