// crystal-monitor shadow model page: how the candidate model compares with the live one on
// the same crops (/api/shadow). Plain JavaScript; no library, nothing loaded from outside
// this server. Reloads every 10 s with the filters set.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
// The dashboard's class colours, in the manifest's class order (dashboard.js).
const CLASS_COLOURS = ["#4ea1ff", "#d29bff", "#2ec4b6", "#e6e9ec", "#8fd16a", "#a0785a"];
const POLL_MS = 10000;
const CHECK_TEXT = {
  enough_windows: "enough full windows",
  enough_labels: "enough labelled crops",
  not_worse_on_labels: "not worse on labelled crops",
  better_on_labels: "better on labelled crops (McNemar)",
  fractions_agree: "class fractions agree",
};

let timer = null;
let generation = 0;  // the newest load; an older answer arriving late is dropped

// -- small helpers ------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function notice(message, isError = false) {
  const box = document.getElementById("notice");
  box.textContent = message;
  box.className = isError ? "notice error" : "notice";
  box.hidden = false;
}

function clearNotice() {
  document.getElementById("notice").hidden = true;
}

function connection(text, ok) {
  const node = document.getElementById("connection");
  node.textContent = text;
  node.className = ok ? "connection live" : "connection lost";
}

function known(value) {
  return value !== null && value !== undefined;
}

// A fraction as a percentage: 0.1234 -> "12.3 %".
function pct(value, digits = 1) {
  return known(value) ? `${(value * 100).toFixed(digits)} %` : "–";
}

// A difference of fractions in percentage points, signed: 0.2 -> "+20.0".
function points(value) {
  if (!known(value)) return "–";
  const text = (value * 100).toFixed(1);
  return value >= 0 && !text.startsWith("-") ? `+${text}` : text;
}

function differenceText(figures) {
  if (!known(figures.difference)) return "–";
  const [low, high] = figures.difference_ci || [null, null];
  const interval = known(low) && known(high) ? ` [${points(low)}, ${points(high)}]` : "";
  return `${points(figures.difference)} pp${interval}`;
}

function pValue(value) {
  if (!known(value)) return "–";
  return value < 0.001 ? value.toExponential(1) : value.toPrecision(3);
}

function epochS(value) {
  if (!known(value)) return null;
  return typeof value === "number" ? value : Date.parse(value) / 1000;
}

const pad = (n) => String(n).padStart(2, "0");

// A time of day in the browser's zone; seconds only when there are some.
function clockText(date) {
  const seconds = date.getSeconds() ? `:${pad(date.getSeconds())}` : "";
  return `${pad(date.getHours())}:${pad(date.getMinutes())}${seconds}`;
}

function dateText(date) {
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
}

// A window as the browser's clock shows it: "2026-12-03 14:00–14:05".
function spanText(start, end) {
  const from = new Date(epochS(start) * 1000);
  const to = new Date(epochS(end) * 1000);
  const sameDay = dateText(from) === dateText(new Date(to - 1));  // ends at the next midnight
  return `${dateText(from)} ${clockText(from)}–${sameDay ? "" : `${dateText(to)} `}${clockText(to)}`;
}

function count(n, noun) {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

function durationText(seconds) {
  if (!known(seconds)) return "–";
  if (seconds % 3600 === 0) return `${seconds / 3600} h`;
  if (seconds % 60 === 0) return `${seconds / 60} min`;
  return `${seconds} s`;
}

function classColour(classes, name) {
  const index = classes.indexOf(name);
  return CLASS_COLOURS[(index < 0 ? 0 : index) % CLASS_COLOURS.length];
}

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  if (response.status === 401) {
    window.location.assign("/login");
    throw new Error("not logged in");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

// -- the filters --------------------------------------------------------------------

function filterQuery() {
  const params = new URLSearchParams();
  const value = (id) => document.getElementById(id).value;
  if (value("filter-candidate")) params.set("candidate", value("filter-candidate"));
  if (value("filter-window")) params.set("window", value("filter-window"));
  for (const [id, name] of [["filter-since", "since"], ["filter-until", "until"]]) {
    // datetime-local is the browser's local time; the API takes ISO 8601 UTC.
    if (value(id)) params.set(name, new Date(value(id)).toISOString());
  }
  return params.toString();
}

function fillCandidates(report) {
  const select = document.getElementById("filter-candidate");
  const running = report.running ? report.running.candidate : null;
  const labels = [...(report.candidates || [])];
  if (running && !labels.includes(running)) labels.push(running);
  const chosen = select.value;
  select.replaceChildren(el("option", "", "newest"));
  select.firstChild.value = "";
  for (const label of labels.reverse()) {
    const option = el("option", "", label === running ? `${label} (running)` : label);
    option.value = label;
    select.append(option);
  }
  select.value = labels.includes(chosen) ? chosen : "";
}

// -- the verdict ----------------------------------------------------------------------

function renderVerdict(report) {
  const box = document.getElementById("verdict");
  box.replaceChildren();
  if (!report.candidate) {
    box.className = "verdict waiting";
    box.dataset.promote = "";
    box.append(el("h2", "", "No comparison yet"));
    box.append(el("p", "", report.note
      ? `${report.note}: the candidate's first frames are compared as they arrive.`
      : "The candidate's first frames are compared as they arrive."));
    return;
  }
  const verdict = report.verdict;
  box.className = verdict.promote ? "verdict promote" : "verdict hold";
  box.dataset.promote = String(verdict.promote);
  const head = el("div", "verdict-head");
  head.append(el("span", "verdict-word", verdict.promote ? "PROMOTE: YES" : "PROMOTE: NOT YET"));
  head.append(el("span", "verdict-models",
    `${report.candidate} against ${(report.live_models || []).join(", ") || "the live model"}`));
  box.append(head);
  const reasons = el("ul", "reasons");
  for (const reason of verdict.reasons) reasons.append(el("li", "reason", reason));
  box.append(reasons);
  const checks = el("div", "checks");
  for (const [name, ok] of Object.entries(verdict.checks || {})) {
    const check = el("span", ok ? "check ok" : "check failed", `${ok ? "✓" : "✗"} ${CHECK_TEXT[name] || name}`);
    check.dataset.check = name;
    checks.append(check);
  }
  const rule = report.rule || {};
  checks.append(el("span", "muted rule",
    `${verdict.full_windows} full windows (≥ ${rule.min_window_crops} crops; ${rule.min_full_windows} needed), ` +
    `${verdict.differing_windows} differing`));
  box.append(checks);
}

// -- what runs and the labelled crops ------------------------------------------------------

function fact(list, name, value, help) {
  const term = el("dt", "", name);
  if (help) {
    term.title = help;
    term.classList.add("help");
  }
  const figure = el("dd", "", value);
  figure.dataset.fact = name;
  list.append(term, figure);
}

function renderRunning(report) {
  const box = document.getElementById("running");
  box.replaceChildren(el("h2", "", "What runs"));
  const running = report.running;
  const list = el("dl", "facts");
  if (running) {
    fact(list, "Candidate", running.candidate || "not loaded");
    fact(list, "Model", running.path);
    fact(list, "Share", `${pct(running.share, 0)} of the frames`,
      "model.shadow.share: the share of the classified frames the candidate also classifies");
    fact(list, "Windows", durationText(running.window_s), "model.shadow.window");
    fact(list, "Compared", count(running.compared, "frame"));
    fact(list, "Skipped", count(running.skipped, "frame"),
      "left out of the comparison while the candidate fell behind (model.shadow.queue_size)");
    fact(list, "Failed", count(running.failed, "frame"), "the candidate failed on these frames");
    fact(list, "Labelled scored", count(running.labelled_scored, "crop"));
  } else {
    box.append(el("p", "muted", "No shadow runs now: these figures are from the record. " +
      "Set [model.shadow] path in the config and reload to run one."));
  }
  if (report.candidate) {
    fact(list, "In this range", `${count(report.frames, "frame")}, ${count(report.crops, "crop")}`);
    fact(list, "Agreement", pct(report.agreement),
      "crops on which both models reached the same call (the same class, or both unsure)");
  }
  box.append(list);
  box.dataset.running = running ? "yes" : "no";
}

function renderLabelled(report) {
  const box = document.getElementById("labelled");
  box.replaceChildren(el("h2", "", "Labelled crops"));
  const labelled = report.labelled;
  if (!labelled) {
    box.append(el("p", "muted", "–"));
    return;
  }
  const figures = el("div", "figures accuracy");
  for (const [name, value, key] of [
    ["Live model", labelled.live_accuracy, "live"],
    ["Candidate", labelled.candidate_accuracy, "candidate"],
  ]) {
    const figure = el("div", "figure");
    figure.dataset.model = key;
    figure.append(el("div", "name", `${name} right`), el("div", "value", pct(value)));
    figures.append(figure);
  }
  box.append(figures);
  const alpha = report.rule ? report.rule.alpha : 0.05;
  const list = el("dl", "facts");
  fact(list, "Scored by both", count(labelled.crops, "crop"), "review crops labelled as a class on /label");
  fact(list, "Only live right", String(labelled.only_live_right));
  fact(list, "Only candidate right", String(labelled.only_candidate_right));
  fact(list, "McNemar p", pValue(labelled.mcnemar_p),
    `exact test on the crops where exactly one model was right; below ${alpha}: a real difference`);
  box.append(list);
  if (labelled.crops === 0) box.append(el("p", "muted", "Label crops on /label to score both models."));
}

// -- the charts ---------------------------------------------------------------------------

function byProbe(windows) {
  const probes = new Map();
  for (const window of windows) {
    if (!probes.has(window.probe)) probes.set(window.probe, []);
    probes.get(window.probe).push(window);
  }
  return probes;
}

// One small chart: a class's fraction under both models in each window of one probe.
function chart(probe, name, windows, colour) {
  const width = 420;
  const height = 170;
  const margin = { left: 46, right: 12, top: 12, bottom: 26 };
  const plotW = width - margin.left - margin.right;
  const plotH = height - margin.top - margin.bottom;
  const t0 = Math.min(...windows.map((w) => epochS(w.start)));
  const t1 = Math.max(...windows.map((w) => epochS(w.end)));
  const values = windows.flatMap((w) => [w.classes[name].live, w.classes[name].candidate]).filter(known);
  const top = Math.max(0.1, Math.ceil(Math.max(0, ...values) * 10 + 0.0001) / 10);
  const x = (w) => margin.left + ((epochS(w.start) + epochS(w.end)) / 2 - t0) / (t1 - t0) * plotW;
  const y = (v) => margin.top + plotH - (v / top) * plotH;
  const node = svg("svg", {
    class: "shadow-chart", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `${probe}: ${name} live against candidate`,
  });
  node.dataset.probe = probe;
  node.dataset.class = name;
  for (const v of [0, top / 2, top]) {
    node.append(svg("line", { class: "gridline", x1: margin.left, x2: margin.left + plotW, y1: y(v), y2: y(v) }));
    node.append(svg("text", { x: margin.left - 6, y: y(v) + 4, "text-anchor": "end" }, pct(v, 0)));
  }
  const first = new Date(t0 * 1000);
  const last = new Date(t1 * 1000);
  node.append(svg("text", { x: margin.left, y: height - 6 }, clockText(first)));
  node.append(svg("text", { x: margin.left + plotW, y: height - 6, "text-anchor": "end" }, clockText(last)));
  // The candidate's points are rings drawn first, the live model's dots inside them: a
  // window where both agree shows a dot in its ring.
  for (const model of ["candidate", "live"]) {
    const shown = windows.filter((w) => known(w.classes[name][model]));
    if (shown.length > 1) {
      node.append(svg("polyline", {
        class: `series ${model}`, stroke: colour,
        points: shown.map((w) => `${x(w).toFixed(1)},${y(w.classes[name][model]).toFixed(1)}`).join(" "),
      }));
    }
    for (const w of shown) {
      const point = svg("circle", {
        class: `point ${model}${w.classes[name].significant ? " significant" : ""}`,
        cx: x(w).toFixed(1), cy: y(w.classes[name][model]).toFixed(1), r: model === "live" ? 3.5 : 6,
        fill: colour, stroke: colour,  // a candidate's point is hollow (shadow.css)
        "data-value": String(w.classes[name][model]),
      });
      point.append(svg("title", {}, `${name} ${model} ${pct(w.classes[name][model])}, ${spanText(w.start, w.end)}`));
      node.append(point);
    }
  }
  return node;
}

function renderCharts(report) {
  const box = document.getElementById("charts");
  box.replaceChildren();
  const windows = report.windows || [];
  if (!windows.length) {
    box.append(el("p", "muted", "No compared frames in this range."));
    return;
  }
  const legend = el("div", "legend");
  const item = (className, text) => {
    const entry = el("span", "");
    entry.append(el("span", `swatch ${className}`), document.createTextNode(text));
    return entry;
  };
  legend.append(item("live", "live model (a dot per window)"), item("candidate", "candidate (a ring)"),
    item("significant", "red: the difference is significant"));
  box.append(legend);
  const grid = el("div", "chart-grid");
  for (const [probe, list] of byProbe(windows)) {
    for (const name of report.classes) {
      const figure = el("figure", "chart");
      const caption = el("figcaption", "", "");
      const swatch = el("span", "class-swatch");
      swatch.style.background = classColour(report.classes, name);
      caption.append(swatch, document.createTextNode(`${probe} · ${name}`));
      figure.append(caption, chart(probe, name, list, classColour(report.classes, name)));
      grid.append(figure);
    }
  }
  box.append(grid);
}

// -- the table ----------------------------------------------------------------------------

function renderTable(report) {
  const table = document.getElementById("windows");
  table.replaceChildren();
  const classes = report.classes || [];
  const windows = report.windows || [];
  const head = el("thead");
  const top = el("tr");
  for (const name of ["Probe", "Window", "Frames", "Crops", "Agreement"]) {
    const cell = el("th", "", name);
    cell.rowSpan = 2;
    top.append(cell);
  }
  const sub = el("tr");
  for (const name of classes) {
    const group = el("th", "class-group", name);
    group.colSpan = 3;
    group.style.borderBottomColor = classColour(classes, name);
    top.append(group);
    sub.append(el("th", "num", "live"), el("th", "num", "candidate"), el("th", "num", "Δ [95 % CI]"));
  }
  head.append(top, sub);
  table.append(head);
  const body = el("tbody");
  const minCrops = report.rule ? report.rule.min_window_crops : 0;
  for (const window of windows) {
    const row = el("tr", "window-row");
    row.dataset.probe = window.probe;
    row.dataset.start = window.start;
    const full = window.crops >= minCrops && window.frames >= 2;
    if (!full) {
      row.classList.add("partial");
      row.title = `not a full window: fewer than ${minCrops} compared crops`;
    }
    row.append(
      el("td", "probe", window.probe),
      el("td", "when", spanText(window.start, window.end)),
      el("td", "num", String(window.frames)),
      el("td", "num", String(window.crops)),
      el("td", "num", pct(window.agreement)),
    );
    let differs = false;
    for (const name of classes) {
      const figures = window.classes[name] || {};
      const difference = el("td", "num difference", differenceText(figures));
      difference.dataset.class = name;
      if (figures.significant) {
        difference.classList.add("significant");
        difference.title = "the interval excludes 0: the models disagree on this class's share";
        differs = true;
      }
      row.append(el("td", "num", pct(figures.live)), el("td", "num", pct(figures.candidate)), difference);
    }
    if (differs) row.classList.add("differs");
    body.append(row);
  }
  if (!windows.length) {
    const row = el("tr");
    const cell = el("td", "muted", report.candidate ? "No compared frames in this range." : "No comparison yet.");
    cell.colSpan = 5 + 3 * classes.length;
    row.append(cell);
    body.append(row);
  }
  table.append(body);
}

// -- loading ------------------------------------------------------------------------------

function render(report) {
  fillCandidates(report);
  renderVerdict(report);
  renderRunning(report);
  renderLabelled(report);
  renderCharts(report);
  renderTable(report);
  const now = report.now ? new Date(epochS(report.now) * 1000) : new Date();
  document.getElementById("updated").textContent = `as of ${dateText(now)} ${clockText(now)}`;
  document.body.dataset.state = report.candidate ? "report" : "waiting";
}

function renderNoShadow(message) {
  const box = document.getElementById("verdict");
  box.className = "verdict waiting";
  box.dataset.promote = "";
  box.replaceChildren(el("h2", "", "No shadow model"), el("p", "", message));
  for (const id of ["running", "labelled", "charts", "windows"]) {
    document.getElementById(id).replaceChildren();
  }
  document.body.dataset.state = "none";
}

async function load() {
  clearTimeout(timer);
  const query = filterQuery();
  const mine = ++generation;
  try {
    const report = await api(`/api/shadow${query ? "?" : ""}${query}`);
    if (mine !== generation) return;
    render(report);
    clearNotice();
    connection("live", true);
  } catch (error) {
    if (mine !== generation) return;
    if (error.status === 503) {
      renderNoShadow(error.message);
      connection("live", true);
    } else {
      connection(`not loaded: ${error.message}`, false);
      notice(error.message, true);
    }
  }
  document.body.dataset.loads = String(Number(document.body.dataset.loads || 0) + 1);
  timer = setTimeout(load, POLL_MS);
}

function start() {
  const form = document.getElementById("filters");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    load();
  });
  form.addEventListener("change", () => load());
  load();
}

document.addEventListener("DOMContentLoaded", start);
