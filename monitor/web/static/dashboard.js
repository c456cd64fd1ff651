// crystal-monitor dashboard: polls the daemon's JSON API and draws every probe.
// Plain JavaScript and SVG; no library, nothing loaded from outside this server.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
// Class colours stay clear of the alarm colours (red, amber, yellow, magenta), which
// mean only one thing on this page.
const CLASS_COLOURS = ["#4ea1ff", "#d29bff", "#2ec4b6", "#e6e9ec", "#8fd16a", "#a0785a"];
const UNCERTAIN_COLOUR = "#9aa5b1";
const PRIORITY_COLOURS = { critical: "#d1006b", high: "#e5383b", medium: "#f6a01a", low: "#f2d024" };
const SHELVE_MINUTES = [15, 30, 60, 120, 240, 480];
const OPERATOR_KEY = "crystal-monitor.operator";
const TREND_HEIGHT = 340;
const THUMB_WIDTH = 160;  // px asked of the server for a strip thumbnail (sharp at 2x)
const JOURNAL_LIMIT = 200;  // alarm journal entries read for the trend's markers
const JOURNAL_REFRESH_MS = 5000;  // re-read at most this often unless an alarm changed state

// What the page's terms mean, shown as tooltips (title attributes).
const ADJUSTED_HELP = "adjusted: the fraction corrected for the classifier's known confusions " +
  "(how often it takes one class for another, from the validation confusion matrix in the " +
  "model's manifest)";
const CUSUM_HELP = "CUSUM: the shift alarm's cumulative sum, the evidence that the watched " +
  "class's share (e.g. the PG share) has moved up from its baseline; it grows with every frame " +
  "above the baseline and falls back towards 0 below it, and the alarm is raised when it " +
  "reaches the threshold";
const NO_VALUE_HELP = "no value: too few particles in the window, or not computable yet";

const views = new Map();  // probe id -> view state
let classes = [];
let refreshMs = 2000;
let timer = null;
let refreshing = false;
let daemonOffsetS = null;  // daemon clock minus browser clock; null until the daemon answers

// -- small helpers ------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function pct(value, digits = 1) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(digits)} %`;
}

function windowLabel(seconds) {
  if (seconds < 60) return `${seconds} s`;
  if (seconds % 3600 === 0) return `${seconds / 3600} h`;
  return `${+(seconds / 60).toFixed(1)} min`;
}

// The API writes times as ISO 8601 UTC strings; the page computes with epoch seconds.
function epochS(value) {
  if (value === null || value === undefined) return null;
  return typeof value === "number" ? value : Date.parse(value) / 1000;
}

function clockText(ts, seconds = true) {
  const date = new Date(epochS(ts) * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  const hm = `${pad(date.getHours())}:${pad(date.getMinutes())}`;
  return seconds ? `${hm}:${pad(date.getSeconds())}` : hm;
}

function dateText(ts) {
  const date = new Date(epochS(ts) * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
}

// English short names of the browser's time zone: en-US knows the American ones (EST),
// en-GB the European ones (CET, BST).
const ZONE_FORMATS = ["en-US", "en-GB"].map(
  (locale) => new Intl.DateTimeFormat(locale, { timeZoneName: "short" }));

// The browser's time zone at `ts` by its short name ("CET", "EST", "UTC"), or by its UTC
// offset ("UTC+05:30") where it has none (Intl then says "GMT+5:30").
function zoneText(ts) {
  const date = new Date(epochS(ts) * 1000);
  for (const format of ZONE_FORMATS) {
    const part = format.formatToParts(date).find((p) => p.type === "timeZoneName");
    if (part && !/^(GMT|UTC)[+\-\u2212]/.test(part.value)) return part.value;
  }
  return offsetText(date);
}

function offsetText(date) {
  const minutes = -date.getTimezoneOffset();
  if (minutes === 0) return "UTC";
  const pad = (n) => String(n).padStart(2, "0");
  const sign = minutes < 0 ? "-" : "+";
  const size = Math.abs(minutes);
  return `UTC${sign}${pad(Math.floor(size / 60))}:${pad(size % 60)}`;
}

// The header clock: "2026-12-03 14:38:59 CET".
function clockWithDateText(ts) {
  return `${dateText(ts)} ${clockText(ts)} ${zoneText(ts)}`;
}

// In seconds, the unit the probe_stale alarm's message uses ("no frame from the probe
// for 95 s"), so the header and the alarm read alike; a long age also in a rounder unit.
function ageText(seconds) {
  if (seconds === null || seconds === undefined) return "no frame yet";
  if (seconds < 90) return `last frame ${seconds.toFixed(1)} s ago`;
  return `last frame ${seconds.toFixed(0)} s ago (${roundedAge(seconds)})`;
}

function roundedAge(seconds) {
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 2 * 86400) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} d`;
}

function classColour(name) {
  const index = classes.indexOf(name);
  return CLASS_COLOURS[(index < 0 ? 0 : index) % CLASS_COLOURS.length];
}

function notice(message, isError = false) {
  const box = document.getElementById("notice");
  box.textContent = message;
  box.className = isError ? "notice error" : "notice";
  box.hidden = false;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) {
    window.location.assign("/login");
    throw new Error("not logged in");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok && !("accepted" in body)) {
    throw new Error(body.error || `${response.status} ${response.statusText}`);
  }
  return { status: response.status, body };
}

// -- one probe's view ---------------------------------------------------------------

function createView(probe) {
  const section = el("section", "probe");
  section.dataset.probe = probe.id;

  const head = el("div", "probe-head");
  const title = el("h2", "", probe.id);
  const batch = el("span", "batch");
  const quality = el("span", "quality");
  const age = el("span", "age");
  head.append(title, batch, quality, age);

  const alarms = el("div", "alarms");
  const alarmValues = el("div", "alarm-values");

  const trendPanel = el("div", "trend-panel");
  const figures = el("div", "figures");
  const windows = el("div", "windows");
  const trend = svg("svg", { class: "trend", role: "img" });
  const legend = el("div", "legend");
  trendPanel.append(figures, trend, legend);

  const framePanel = el("div", "frame-panel");
  const frameWrap = el("div", "frame-wrap");
  const image = el("img");
  image.alt = `latest frame of ${probe.id}`;
  image.hidden = true;
  const boxes = svg("svg", { class: "frame-boxes", preserveAspectRatio: "none" });
  const nothing = el("div", "nothing", "no classified frame yet");
  frameWrap.append(image, boxes, nothing);
  const caption = el("div", "frame-caption");
  const stripHead = el("div", "strip-head");
  const stripTitle = el("span", "strip-title", "Recent frames");
  const live = el("button", "live-toggle", "Live");
  live.type = "button";
  live.title = "Follow the newest frame";
  stripHead.append(stripTitle, live);
  const strip = el("div", "strip");
  framePanel.append(frameWrap, caption, stripHead, strip);

  const countsPanel = el("div", "counts-panel");
  const counts = el("table", "counts");
  countsPanel.append(counts);

  const grid = el("div", "grid");
  grid.append(trendPanel, framePanel, countsPanel);
  section.append(head, alarms, alarmValues, grid);

  const view = {
    id: probe.id,
    section, batch, quality, age, alarms, alarmValues, figures, windows, trend, legend,
    image, boxes, nothing, caption, counts, frameWrap, strip, stripTitle, live,
    window: probe.default_window,
    state: probe,
    history: null,
    framesSeen: null,   // "key@ts" of the newest frame the strip was loaded for
    recent: [],         // the strip's frames, newest first, as /frames?boxes=1 lists them
    following: true,    // live: the large view follows the newest frame
    shown: null,        // the frame in the large view
    thumbs: new Map(),  // frame id -> its thumbnail button
    preloads: [],       // full-size images of a held strip, fetched when it was held
    alarmRows: new Map(),
    markers: [],              // the alarm journal's transitions, drawn on the trend
    journalSignature: null,   // the alarm states the markers were read for
    journalAt: 0,             // when they were read (browser ms)
  };
  const sizePanel = createSizePanel(view);
  grid.append(sizePanel);
  image.addEventListener("load", () => drawFrame(view));
  image.addEventListener("error", () => frameMissing(view));
  live.addEventListener("click", () => goLive(view));
  renderLive(view);
  return view;
}

function plottedClasses(probe) {
  const watched = [...new Set(probe.limits.map((limit) => limit.class_name))];
  return watched.length ? watched.filter((name) => classes.includes(name)) : classes.slice();
}

function renderHead(view, probe) {
  view.batch.textContent = probe.batch ? `batch ${probe.batch}` : "no batch running";
  view.quality.textContent = probe.quality;
  view.quality.className = `quality q-${probe.quality}`;
  view.age.textContent = ageText(probe.last_frame_age_s);
  view.age.classList.toggle("stale", probe.quality === "BAD" && !probe.source.alive);
  const unacked = probe.active_alarms.some((alarm) => !alarm.acknowledged && !alarm.shelved);
  view.section.classList.toggle("alarmed", unacked);
}

function renderFigures(view, probe, allWindows) {
  const stats = probe.snapshot.windows[`${view.window}s`];
  view.figures.replaceChildren();
  for (const name of plottedClasses(probe)) {
    const cls = stats ? stats.classes[name] : null;
    const figure = el("div", "figure");
    figure.dataset.class = name;
    const label = el("div", "name", `${name} · ${windowLabel(view.window)} window`);
    const fraction = cls ? cls.fraction : null;
    const value = el("div", "value", pct(fraction));
    value.style.color = classColour(name);
    if (fraction === null || fraction === undefined) value.title = noValueText(stats, view.window);
    const ci = el("div", "ci");
    if (cls && cls.ci95) ci.append(`95 %: ${pct(cls.ci95[0])} – ${pct(cls.ci95[1])}`);
    else ci.append(helpSpan("95 %: –", noValueText(stats, view.window)));
    if (cls && cls.adjusted !== null && cls.adjusted !== undefined) {
      ci.append(" · ", helpSpan(`adjusted ${pct(cls.adjusted)}`, ADJUSTED_HELP, "adjusted"));
    }
    figure.append(label, value, ci);
    view.figures.append(figure);
  }
  view.windows.replaceChildren();
  for (const seconds of allWindows) {
    const button = el("button", seconds === view.window ? "selected" : "", windowLabel(seconds));
    button.type = "button";
    button.addEventListener("click", () => {
      view.window = seconds;
      renderFigures(view, view.state, allWindows);
      renderSizes(view);
      loadHistory(view).then(() => {
        drawTrend(view);
        drawD50Trend(view);
      }).catch(() => {});
    });
    view.windows.append(button);
  }
  view.figures.append(view.windows);
}

// A term explained by its tooltip (dotted underline, help cursor).
function helpSpan(text, help, className = "") {
  const span = el("span", `help${className ? ` ${className}` : ""}`, text);
  span.title = help;
  return span;
}

function noValueText(stats, window) {
  const n = stats ? stats.n : 0;
  return `${NO_VALUE_HELP} (${n} particles in the ${windowLabel(window)} window)`;
}

function renderModel(state) {
  const quality = state.model.quality || {};
  const site = quality.held_out_site_macro_f1;
  const figure = site == null ? "held-out site: not measured" : `held-out site macro-F1 ${site.toFixed(3)}`;
  document.getElementById("model").textContent =
    `model ${state.model.name} ${state.model.version} (${figure}) · v${state.version}`;
  const warning = document.getElementById("model-warning");
  const warnings = quality.warnings || [];
  warning.textContent = warnings.join(" · ");
  warning.hidden = warnings.length === 0;
}

function renderCounts(view, probe) {
  const stats = probe.snapshot.windows[`${view.window}s`];
  const rows = [];
  const w = windowLabel(view.window);
  if (stats) {
    rows.push([`particles (${w})`, String(stats.n)]);
    rows.push([`uncertain particles (${w})`, pct(stats.uncertain_share), stats.uncertain_share > 0.3]);
    rows.push([`not crystals, out of distribution (${w})`, pct(stats.ood_share || 0), (stats.ood_share || 0) > 0.2]);
    rows.push([`frames (${w})`, `${stats.frames} accepted, ${stats.rejected_frames} rejected`]);
    rows.push([`rejected frames (${w})`, pct(stats.rejected_share), stats.rejected_share > 0.5]);
    const reasons = Object.entries(stats.rejected_by_reason).map(([k, v]) => `${k} ${v}`);
    rows.push([`rejected by reason (${w})`, reasons.length ? reasons.join(", ") : "none"]);
    rows.push(["particles per minute", stats.particles_per_min.toFixed(0)]);
  }
  const total = probe.counts;
  rows.push([
    "frames since start",
    `${total.frames.ok} ok, ${total.frames.rejected} rejected, ${total.frames.error} failed`,
  ]);
  const particles = Object.entries(total.particles).map(([k, v]) => `${k} ${v}`);
  rows.push(["particles since start", `${particles.join(", ")}, uncertain ${total.uncertain}`]);
  view.counts.replaceChildren();
  for (const [label, value, bad] of rows) {
    const tr = el("tr");
    const td = el("td", bad ? "bad" : "", value);
    if (value === "–") td.title = NO_VALUE_HELP;
    tr.append(el("th", "", label), td);
    view.counts.append(tr);
  }
}

// -- alarms -------------------------------------------------------------------------

function alarmStateText(alarm) {
  const parts = [];
  if (alarm.state === "active_unacknowledged") parts.push(alarm.latched ? "LATCHED, UNACKNOWLEDGED" : "ACTIVE, UNACKNOWLEDGED");
  else if (alarm.state === "active_acknowledged") parts.push("active, acknowledged");
  else if (alarm.state === "returned_unacknowledged") parts.push("RETURNED, UNACKNOWLEDGED");
  else parts.push("normal");
  if (alarm.active_since) parts.push(`raised ${clockText(alarm.active_since)}`);
  if (alarm.acknowledged_at) {
    parts.push(`acknowledged ${clockText(alarm.acknowledged_at)}${alarm.acknowledged_by ? ` by ${alarm.acknowledged_by}` : ""}`);
  }
  if (alarm.state_since && alarm.state === "normal") parts.push(`since ${clockText(alarm.state_since)}`);
  if (alarm.shelved) {
    const until = alarm.shelved_until ? ` until ${clockText(alarm.shelved_until, false)}` : "";
    parts.push(`shelved${until}${alarm.shelved_by ? ` by ${alarm.shelved_by}` : ""}`);
  }
  if (alarm.suppressed) parts.push("suppressed (bad input)");
  return parts.join(" · ");
}

function createAlarmRow(view, alarm) {
  const row = el("div", "alarm");
  row.dataset.alarmId = alarm.alarm_id;
  const priority = el("div", "priority");
  const text = el("div");
  const message = el("div", "message");
  const state = el("div", "state");
  text.append(message, state);
  const actions = el("div", "actions");
  const comment = el("input", "comment");
  comment.placeholder = "comment";
  comment.maxLength = 500;
  const ack = el("button", "ack", "Acknowledge");
  ack.type = "button";
  const minutes = el("select", "minutes");
  for (const m of SHELVE_MINUTES) {
    const option = el("option", "", m < 60 ? `${m} min` : `${m / 60} h`);
    option.value = String(m);
    minutes.append(option);
  }
  minutes.value = "60";
  const shelve = el("button", "shelve", "Shelve");
  shelve.type = "button";
  actions.append(comment, ack, minutes, shelve);
  row.append(priority, text, actions);
  ack.addEventListener("click", () => act(view, row, "acknowledge", {}));
  shelve.addEventListener("click", () => act(view, row, "shelve", { minutes: Number(minutes.value) }));
  return { row, priority, message, state, ack, shelve };
}

function renderAlarms(view, probe) {
  const shown = probe.active_alarms;
  const keep = new Set(shown.map((alarm) => alarm.alarm_id));
  for (const [id, parts] of view.alarmRows) {
    if (!keep.has(id)) {
      parts.row.remove();
      view.alarmRows.delete(id);
    }
  }
  let none = view.alarms.querySelector(".none");
  if (!shown.length) {
    if (!none) view.alarms.append(el("div", "none", "No active alarms"));
    return;
  }
  if (none) none.remove();
  for (const alarm of shown) {
    let parts = view.alarmRows.get(alarm.alarm_id);
    if (!parts) {
      parts = createAlarmRow(view, alarm);
      view.alarmRows.set(alarm.alarm_id, parts);
    }
    view.alarms.append(parts.row);  // keeps the engine's order
    const unacked = !alarm.acknowledged;
    parts.row.className = `alarm p-${alarm.priority}${unacked ? " unack" : ""}${alarm.shelved ? " shelved" : ""}`;
    parts.row.dataset.state = alarm.state;
    parts.priority.textContent = alarm.priority;
    parts.priority.style.color = PRIORITY_COLOURS[alarm.priority] || "";
    parts.message.textContent = `${alarm.alarm_id}: ${alarm.message}`;
    parts.message.title = alarm.kind === "shift" ? CUSUM_HELP : "";
    parts.state.textContent = alarmStateText(alarm);
    parts.ack.disabled = !unacked;
    parts.shelve.disabled = alarm.shelved;
  }
}

// A number in an alarm's unit (as its status says it).
function alarmNumberText(value, unit) {
  if (unit === "fraction") return `${+(value * 100).toFixed(1)} %`;
  if (unit === "fraction/min") return `${+(value * 100).toFixed(2)} %/min`;
  if (unit === "s") return `${value.toFixed(0)} s`;
  if (unit === "messages") return String(Math.round(value));
  return value.toFixed(2);
}

// Every alarm of the probe with its current value against its limit, one line under the
// active alarms: how close each is to tripping. "–" where the value cannot be computed
// now; the tooltip says why (the alarm's value_reason).
function renderAlarmValues(view, probe) {
  view.alarmValues.replaceChildren();
  if (!probe.alarms.length) return;
  view.alarmValues.append(el("span", "label", "Alarm values"));
  for (const alarm of probe.alarms) {
    const item = el("span", "alarm-value");
    item.dataset.alarmId = alarm.alarm_id;
    const missing = alarm.value === null || alarm.value === undefined || alarm.value_reason;
    const shown = missing ? "–" : alarmNumberText(alarm.value, alarm.unit);
    const value = el("span", "value", shown);
    if (missing) {
      const held = alarm.value === null || alarm.value === undefined ? "" :
        ` (last value ${alarmNumberText(alarm.value, alarm.unit)})`;
      value.title = `no value: ${alarm.value_reason || "not computable yet"}${held}`;
      value.classList.add("help");
    }
    item.append(`${alarm.alarm_id} `);
    if (alarm.kind === "shift") item.append(helpSpan("CUSUM", CUSUM_HELP, "cusum"), " ");
    item.append(value, ` / ${alarmNumberText(alarm.limit, alarm.unit)}`);
    item.classList.toggle("active", alarm.active);
    view.alarmValues.append(item);
  }
}

async function act(view, row, action, extra) {
  const operator = document.getElementById("operator");
  const who = operator.value.trim();
  const alarmId = row.dataset.alarmId;
  if (!who) {
    operator.classList.add("missing");
    operator.focus();
    notice("Enter your name under Operator (top right) before acting on an alarm.", true);
    return;
  }
  const comment = row.querySelector(".comment").value.trim();
  const path = `/api/probes/${encodeURIComponent(view.id)}/alarms/${encodeURIComponent(alarmId)}/${action}`;
  try {
    const { body } = await api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Requested-By": "crystal-monitor-dashboard" },
      body: JSON.stringify({ who, comment, ...extra }),
    });
    if (body.accepted) {
      const done = action === "acknowledge" ? "acknowledged" : `shelved for ${extra.minutes} min`;
      notice(`${view.id} ${alarmId}: ${done} by ${who}`);
      row.querySelector(".comment").value = "";
    } else {
      notice(`${view.id} ${alarmId}: refused: ${body.reason}`, true);
    }
  } catch (error) {
    notice(`${view.id} ${alarmId}: ${error.message}`, true);
  }
  refreshSoon();
}

// -- the trend ----------------------------------------------------------------------

async function loadHistory(view) {
  const path = `/api/probes/${encodeURIComponent(view.id)}/history?window=${view.window}`;
  const { body } = await api(path);
  body.ts = body.ts.map(epochS);
  body.now = epochS(body.now);
  body.since = epochS(body.since);
  view.history = body;
}

// The probe's alarm journal, for the trend's markers: read when the alarm states changed,
// else at most every JOURNAL_REFRESH_MS (the journal is written a moment after a change).
async function loadAlarmJournal(view) {
  const signature = view.state.alarms
    .map((alarm) => `${alarm.alarm_id}:${alarm.state}:${alarm.state_since}:${alarm.acknowledged_at}`)
    .join("|");
  const now = Date.now();
  if (signature === view.journalSignature && now - view.journalAt < JOURNAL_REFRESH_MS) return;
  const query = `probe=${encodeURIComponent(view.id)}&limit=${JOURNAL_LIMIT}`;
  const { body } = await api(`/api/alarms?${query}`);
  view.journalSignature = signature;
  view.journalAt = now;
  view.markers = alarmMarkers(body.journal);
}

// The journal's state changes (not shelve or restore markers, nor what shelving hid) as
// markers: raised in the alarm's priority colour, the others muted.
function alarmMarkers(journal) {
  const markers = [];
  for (const entry of journal) {
    const change = entry.transition;
    if (entry.event !== "transition" || !change || change.from_state === change.to_state) continue;
    if (change.announced === false) continue;
    markers.push({
      alarmId: change.alarm_id,
      toState: change.to_state,
      ts: epochS(change.ts),
      priority: change.priority,
      raised: change.to_state === "active_unacknowledged",
      text: markerText(change, entry.who || change.who),
    });
  }
  return markers;
}

function markerText(change, who) {
  const at = clockText(change.ts);
  const by = who ? ` by ${who}` : "";
  if (change.to_state === "active_unacknowledged") return `${change.alarm_id} raised ${at} — ${change.message}`;
  if (change.to_state === "active_acknowledged") return `${change.alarm_id} acknowledged ${at}${by}`;
  if (change.to_state === "returned_unacknowledged") {
    return `${change.alarm_id} condition cleared ${at}, not acknowledged yet`;
  }
  const acked = change.from_state === "returned_unacknowledged" ? `, acknowledged${by}` : "";
  return `${change.alarm_id} back to normal ${at}${acked}`;
}

// The time axis' ticks between t0 and t1 (epoch seconds) every `step` seconds: each with
// its clock time, and its date on the first tick and wherever the day changes.
function axisTicks(t0, t1, step) {
  const ticks = [];
  let day = null;
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
    const date = dateText(t);
    ticks.push({ t, time: clockText(t, step < 60), date: date === day ? null : date });
    day = date;
  }
  return ticks;
}

function niceStep(range, target) {
  const raw = range / target;
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * power >= raw) return m * power;
  return 10 * power;
}

function segments(ts, values) {
  const runs = [];
  let run = [];
  values.forEach((value, i) => {
    if (value === null || value === undefined) {
      if (run.length) runs.push(run);
      run = [];
    } else run.push([ts[i], value]);
  });
  if (run.length) runs.push(run);
  return runs;
}

// A value axis' top and step: `max` with 15 % headroom, rounded up to a whole number of
// round steps (at most `ticks` of them), no higher than `limit`.
function niceTop(max, ticks, limit = Infinity) {
  let top = Math.min(limit, max * 1.15);
  const step = niceStep(top, ticks);
  top = Math.min(limit, Math.ceil(top / step - 1e-9) * step);
  return { top, step };
}

// The time a trend spans: from the first point to now (at least a minute; ten minutes
// while there is no point yet).
function timeSpan(history, points) {
  const t1 = points ? Math.max(history.now, history.ts[points - 1]) : Date.now() / 1000;
  let t0 = points ? history.ts[0] : t1 - 600;
  if (t1 - t0 < 60) t0 = t1 - 60;
  return { t0, t1 };
}

// The axes of a trend over time (the fraction trend, the D50 trend): value gridlines
// from 0 to `top` every `step` with `label(v)`, time gridlines with clock ticks and the
// date where it changes. Returns the scales x(t) and y(v).
function drawTimeValueAxes(chart, { t0, t1, top, step, margin, width, height }, label) {
  const plotW = width - margin.left - margin.right;
  const plotH = height - margin.top - margin.bottom;
  const x = (t) => margin.left + ((t - t0) / (t1 - t0)) * plotW;
  const y = (v) => margin.top + (1 - v / top) * plotH;
  for (let v = 0; v <= top + 1e-9; v += step) {
    chart.append(svg("line", { class: "gridline", x1: margin.left, x2: margin.left + plotW, y1: y(v), y2: y(v) }));
    chart.append(svg("text", { x: margin.left - 8, y: y(v) + 5, "text-anchor": "end" }, label(v)));
  }
  const tStep = [30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200].find((s) => (t1 - t0) / s <= 7) || 86400;
  for (const tick of axisTicks(t0, t1, tStep)) {
    chart.append(svg("line", { class: "gridline", x1: x(tick.t), x2: x(tick.t), y1: margin.top, y2: margin.top + plotH }));
    chart.append(svg("text", { class: "tick", x: x(tick.t), y: height - 28, "text-anchor": "middle" }, tick.time));
    if (tick.date) {
      chart.append(svg("text", { class: "tick-date", x: x(tick.t), y: height - 10, "text-anchor": "middle" }, tick.date));
    }
  }
  return { x, y };
}

function drawTrend(view) {
  const probe = view.state;
  const history = view.history;
  const chart = view.trend;
  const width = Math.max(320, chart.clientWidth || 900);
  const height = TREND_HEIGHT;
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  chart.replaceChildren();
  const points = history && history.window === view.window ? history.ts.length : 0;
  chart.dataset.points = String(points);
  chart.dataset.window = String(view.window);
  const plotted = plottedClasses(probe);
  const limits = probe.limits.filter((limit) => plotted.includes(limit.class_name));
  const margin = { left: 62, right: 190, top: 16, bottom: 50 };
  const plotW = width - margin.left - margin.right;
  const plotH = height - margin.top - margin.bottom;

  let top = 0.05;
  if (points) {
    for (const name of plotted) {
      const series = history.series[name];
      for (const v of [...series.high, ...series.fraction]) if (v !== null && v > top) top = v;
    }
  }
  for (const limit of limits) top = Math.max(top, limit.limit);
  const { top: yTop, step: yStep } = niceTop(top, 5, 1);
  top = yTop;

  const { t0, t1 } = timeSpan(history, points);
  const { x, y } = drawTimeValueAxes(chart, { t0, t1, top, step: yStep, margin, width, height },
    (v) => pct(v, yStep < 0.01 ? 1 : 0));
  const zone = zoneText(t1);
  chart.dataset.zone = zone;

  let marked = 0;
  for (const marker of view.markers) {
    if (marker.ts < t0 || marker.ts > t1) continue;
    const mx = x(marker.ts);
    const colour = PRIORITY_COLOURS[marker.priority] || PRIORITY_COLOURS.high;
    const group = svg("g", {
      class: `alarm-marker ${marker.raised ? "raised" : "muted"}`,
      "data-alarm-id": marker.alarmId, "data-to-state": marker.toState,
    });
    group.append(svg("title", {}, marker.text));
    const line = { x1: mx, x2: mx, y1: margin.top, y2: margin.top + plotH };
    group.append(svg("line", { class: "mark", ...line, ...(marker.raised ? { stroke: colour } : {}) }));
    if (marker.raised) {
      const top = margin.top;
      group.append(svg("path", { class: "flag", d: `M${mx - 6},${top - 8} h12 l-6,9 z`, fill: colour }));
    }
    group.append(svg("line", { class: "hit", ...line }));  // a wider target for the tooltip
    chart.append(group);
    marked += 1;
  }
  chart.dataset.markers = String(marked);

  for (const limit of limits) {
    const colour = PRIORITY_COLOURS[limit.priority] || PRIORITY_COLOURS.high;
    const ly = y(limit.limit);
    chart.append(svg("line", { class: "limit", x1: margin.left, x2: margin.left + plotW, y1: ly, y2: ly, stroke: colour }));
    const sign = limit.kind === "fraction_low" ? "<" : ">";
    const label = svg("text", { class: "limit-label", x: margin.left + plotW + 8, y: ly - 3, fill: colour },
      `${limit.alarm_id} ${sign} ${pct(limit.limit, 0)}`);
    const sub = svg("text", { x: margin.left + plotW + 8, y: ly + 15, fill: colour },
      `${limit.class_name}, ${windowLabel(limit.window)} window`);
    chart.append(label, sub);
  }

  if (!points) {
    chart.append(svg("text", { class: "empty", x: margin.left + plotW / 2, y: margin.top + plotH / 2, "text-anchor": "middle" }, "waiting for data…"));
    return;
  }
  for (const name of plotted) {
    const series = history.series[name];
    const colour = classColour(name);
    const both = series.low.map((low, i) => (low === null || series.high[i] === null ? null : [low, series.high[i]]));
    for (const run of segments(history.ts, both)) {
      const upper = run.map(([t, [, high]]) => `${x(t).toFixed(1)},${y(high).toFixed(1)}`);
      const lower = run.slice().reverse().map(([t, [low]]) => `${x(t).toFixed(1)},${y(low).toFixed(1)}`);
      chart.append(svg("polygon", { class: "band", points: [...upper, ...lower].join(" "), fill: colour, "fill-opacity": 0.28 }));
    }
    for (const run of segments(history.ts, series.fraction)) {
      const line = run.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      chart.append(svg("polyline", { class: "series", points: line, stroke: colour, "data-class": name }));
    }
    const lastIndex = series.fraction.map((v) => v !== null).lastIndexOf(true);
    if (lastIndex >= 0) {
      const v = series.fraction[lastIndex];
      const cx = x(history.ts[lastIndex]);
      chart.append(svg("circle", { cx, cy: y(v), r: 5, fill: colour }));
    }
  }
  view.legend.replaceChildren();
  for (const name of plotted) {
    const item = el("span");
    const line = el("span", "swatch");
    line.style.background = classColour(name);
    const band = el("span", "swatch band");
    band.style.background = classColour(name);
    item.append(line, document.createTextNode(`${name} fraction `), band, document.createTextNode("95 % interval"));
    view.legend.append(item);
  }
  if (limits.length) {
    const item = el("span");
    item.append(el("span", "swatch limit"), document.createTextNode("alarm limit"));
    view.legend.append(item);
  }
  if (marked) {
    const item = el("span");
    item.title = "hover over a marker for the alarm, its time and its message";
    item.append(el("span", "swatch marker raised"), document.createTextNode("alarm raised "),
      el("span", "swatch marker muted"), document.createTextNode("acknowledged / cleared"));
    view.legend.append(item);
  }
  const span = history.span === "batch" ? `batch ${history.batch || ""} since ${clockText(history.since, false)}` : "last hour";
  view.legend.append(el("span", "zone", `times in ${zone}`));
  view.legend.append(el("span", "", `${span} · ${windowLabel(view.window)} window · ${points} points`));
}

// -- the size distribution ----------------------------------------------------------
// Per class, the particle sizes (equivalent circle diameter, ECD) in the selected window
// as a histogram on the aggregator's fixed log-spaced bins, with D10/D50/D90 marked, and
// beside it each class's D50 over time from the history the fraction trend loads.
// Number-weighted by default; "d²" weights each particle by its diameter squared (as a
// chord-length distribution does), bins by count × lower × upper edge.

const SIZE_ROW_HEIGHT = 140;  // px per class in the distribution chart
const SIZE_TREND_HEIGHT = 300;
const QUANTILES = ["d10", "d50", "d90"];
const SQUARE_HELP = "d² (square-weighted): each particle counts by its diameter squared, " +
  "so large particles weigh more; comparable with a chord-length (FBRM) distribution";
const NO_SIZES_TEXT = "no sizes yet: this window carries no size statistics (a daemon " +
  "that does not measure particle sizes, or rows stored before it did)";

function unitText(unit) {
  return unit === "um" ? "µm" : unit || "";
}

function sizeText(value, unit) {
  if (value === null || value === undefined) return "–";
  const digits = value >= 100 ? 0 : value >= 10 ? 1 : 2;
  return `${value.toFixed(digits)} ${unitText(unit)}`;
}

function quantileKey(name, weighting) {
  return weighting === "square" ? `${name}_sq` : name;
}

// The window's sizes document, or null where the daemon sent none (the key absent).
function windowSizes(probe, window) {
  const stats = probe.snapshot.windows[`${window}s`];
  const sizes = stats ? stats.sizes : null;
  return sizes && Array.isArray(sizes.bin_edges) && sizes.bin_edges.length > 1 ? sizes : null;
}

function createSizePanel(view) {
  const panel = el("div", "size-panel");
  const head = el("div", "size-head");
  const title = el("span", "size-title");
  const weighting = el("div", "weighting");
  for (const [key, text, help] of [
    ["number", "by number", "number-weighted: every particle counts once"],
    ["square", "by d²", SQUARE_HELP],
  ]) {
    const button = el("button", "", text);
    button.type = "button";
    button.dataset.weighting = key;
    button.title = help;
    button.addEventListener("click", () => {
      view.weighting = key;
      renderSizes(view);
      drawD50Trend(view);
    });
    weighting.append(button);
  }
  head.append(title, weighting);
  const note = el("div", "size-note");
  const body = el("div", "size-body");
  const distribution = svg("svg", { class: "size-dist", role: "img" });
  const d50 = svg("svg", { class: "d50-trend", role: "img" });
  body.append(distribution, d50);
  const legend = el("div", "legend size-legend");
  panel.append(head, note, body, legend);
  Object.assign(view, {
    sizePanel: panel, sizeTitle: title, sizeWeighting: weighting, sizeNote: note,
    sizeChart: distribution, d50Chart: d50, sizeLegend: legend, weighting: "number",
  });
  return panel;
}

// The log axis of the distribution: 1-2-5 ticks of each decade between the bin edges.
function logTicks(lo, hi) {
  const ticks = [];
  for (let power = Math.floor(Math.log10(lo)); power <= Math.ceil(Math.log10(hi)); power += 1) {
    for (const m of [1, 2, 5]) {
      const v = m * Math.pow(10, power);
      if (v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9)) ticks.push(v);
    }
  }
  return ticks;
}

// The part of the bin edges worth drawing: the filled bins of every class and one empty
// bin either side (the aggregator's bins span decades no probe fills at once).
function filledRange(edges, histograms) {
  let first = edges.length;
  let last = -1;
  for (const histogram of histograms) {
    histogram.forEach((n, i) => {
      if (!n) return;
      first = Math.min(first, i);
      last = Math.max(last, i);
    });
  }
  if (last < 0) return { lo: edges[0], hi: edges[edges.length - 1] };
  first = Math.max(0, first - 1);
  last = Math.min(edges.length - 2, last + 1);
  return { lo: edges[first], hi: edges[last + 1] };
}

function renderSizes(view) {
  const probe = view.state;
  const sizes = windowSizes(probe, view.window);
  const chart = view.sizeChart;
  const weighting = view.weighting;
  view.sizePanel.dataset.weighting = weighting;
  for (const button of view.sizeWeighting.children) {
    button.classList.toggle("selected", button.dataset.weighting === weighting);
  }
  const square = weighting === "square";
  const unit = sizes ? unitText(sizes.unit) : "";
  view.sizeTitle.textContent = sizes
    ? `Size distribution · equivalent circle diameter (${unit}) · ${windowLabel(view.window)} window`
    : `Size distribution · ${windowLabel(view.window)} window`;
  view.sizeNote.textContent = sizes ? "" :
    NO_SIZES_TEXT.charAt(0).toUpperCase() + NO_SIZES_TEXT.slice(1) + ".";
  view.sizeNote.hidden = !!sizes;
  if (sizes && sizes.unit === "px") {
    view.sizeNote.textContent = "Sizes in pixels: set probes.pixel_size_um (the probe's " +
      "calibration) for micrometres.";
    view.sizeNote.hidden = false;
  }
  view.sizePanel.dataset.unit = sizes ? sizes.unit : "";

  const width = Math.max(320, chart.clientWidth || 640);
  const names = sizes ? classes.filter((name) => sizes.classes[name]) : [];
  const margin = { left: 62, right: 16, top: 8, bottom: 46 };
  const height = sizes ? margin.top + Math.max(1, names.length) * SIZE_ROW_HEIGHT + margin.bottom : SIZE_TREND_HEIGHT;
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  chart.style.height = `${height}px`;
  chart.replaceChildren();
  chart.dataset.state = sizes ? "sizes" : "none";
  if (!sizes) {
    chart.append(svg("text", { class: "empty", x: width / 2, y: height / 2, "text-anchor": "middle" }, "no sizes yet"));
    view.sizeLegend.replaceChildren();
    return;
  }
  const edges = sizes.bin_edges;
  const { lo, hi } = filledRange(edges, names.map((name) => sizes.classes[name].histogram || []));
  const plotW = width - margin.left - margin.right;
  const x = (d) => margin.left + ((Math.log(d) - Math.log(lo)) / (Math.log(hi) - Math.log(lo))) * plotW;

  // Each class's share per bin (of its own particles, so a rare class reads as clearly
  // as a common one); one value axis for all rows.
  const shares = new Map();
  let top = 0.05;
  for (const name of names) {
    const histogram = sizes.classes[name].histogram || [];
    const weights = histogram.map((n, i) => (square ? n * edges[i] * edges[i + 1] : n));
    const total = weights.reduce((a, b) => a + b, 0);
    const share = weights.map((w) => (total > 0 ? w / total : 0));
    shares.set(name, share);
    for (const v of share) top = Math.max(top, v);
  }
  const { top: yTop, step: yStep } = niceTop(top, 2, 1);
  const plotBottom = height - margin.bottom;

  names.forEach((name, row) => {
    const cls = sizes.classes[name];
    const colour = classColour(name);
    const rowTop = margin.top + row * SIZE_ROW_HEIGHT;
    const captionY = rowTop + 16;
    const y0 = rowTop + SIZE_ROW_HEIGHT - 8;  // the row's baseline
    const y1 = rowTop + 58;  // the row's top value, under the caption and the D labels
    const y = (v) => y0 - (v / yTop) * (y0 - y1);
    const group = svg("g", { class: "size-row", "data-class": name });
    for (let v = 0; v <= yTop + 1e-9; v += yStep) {
      group.append(svg("line", { class: "gridline", x1: margin.left, x2: margin.left + plotW, y1: y(v), y2: y(v) }));
      group.append(svg("text", { x: margin.left - 8, y: y(v) + 5, "text-anchor": "end" }, pct(v, 0)));
    }
    const histogram = cls.histogram || [];
    shares.get(name).forEach((share, i) => {
      if (!histogram[i] || edges[i] < lo || edges[i + 1] > hi) return;
      const left = x(edges[i]);
      const right = x(edges[i + 1]);
      const bar = svg("rect", {
        class: "bar", x: left + 1, y: y(share), width: Math.max(1, right - left - 2), height: y0 - y(share),
        fill: colour, "data-class": name, "data-bin": i, "data-count": histogram[i],
      });
      bar.append(svg("title", {}, `${name} ${sizeText(edges[i], sizes.unit)} – ${sizeText(edges[i + 1], sizes.unit)}: ` +
        `${histogram[i]} particles, ${pct(share)} of the ${name} ${square ? "d²" : "count"}`));
      group.append(bar);
    });
    // The D values are on their markers; the caption says what they rest on.
    const parts = [`${name}`, `${cls.count} particles`];
    if (!cls.count) parts.push("none in the window");
    if (cls.mean_aspect_ratio !== null && cls.mean_aspect_ratio !== undefined) {
      parts.push(`mean aspect ratio ${cls.mean_aspect_ratio.toFixed(2)}`);
    }
    const caption = svg("text", { class: "size-caption", x: margin.left, y: captionY, fill: colour }, parts.join(" · "));
    group.append(caption);
    QUANTILES.forEach((q, level) => {
      const value = cls[quantileKey(q, weighting)];
      if (value === null || value === undefined || value < lo || value > hi) return;
      const qx = x(value);
      const marker = svg("g", { class: "quantile", "data-class": name, "data-quantile": q.toUpperCase(), "data-value": value });
      marker.append(svg("title", {}, `${name} ${q.toUpperCase()}${square ? " (d²-weighted)" : ""}: ${sizeText(value, sizes.unit)}`));
      // D50 a line higher than D10 and D90, so neighbouring labels do not collide.
      const labelY = rowTop + (level === 1 ? 34 : 49);
      marker.append(svg("line", { x1: qx, x2: qx, y1: labelY - 11, y2: y0, stroke: colour }));
      // D10's label left of its line, the others right: away from the D50 line.
      const anchor = level === 0 ? { x: qx - 3, "text-anchor": "end" } : { x: qx + 3 };
      marker.append(svg("text", { class: "quantile-label", ...anchor, y: labelY, fill: colour },
        `${q.toUpperCase()} ${sizeText(value, sizes.unit)}`));
      group.append(marker);
    });
    chart.append(group);
  });

  for (const tick of logTicks(lo, hi)) {
    chart.append(svg("line", { class: "gridline", x1: x(tick), x2: x(tick), y1: margin.top + 24, y2: plotBottom }));
    chart.append(svg("text", { class: "tick", x: x(tick), y: plotBottom + 18, "text-anchor": "middle" }, String(+tick.toPrecision(3))));
  }
  chart.append(svg("text", { class: "axis-label", x: margin.left + plotW / 2, y: height - 6, "text-anchor": "middle" },
    `equivalent circle diameter (${unit}), log scale`));

  view.sizeLegend.replaceChildren();
  for (const name of names) {
    const item = el("span");
    const swatch = el("span", "swatch band");
    swatch.style.background = classColour(name);
    item.append(swatch, document.createTextNode(name));
    view.sizeLegend.append(item);
  }
  const what = square ? helpSpan("share of the class's d² per bin", SQUARE_HELP) : "share of the class's particles per bin";
  const item = el("span");
  item.append(el("span", "swatch quantile"), "D10 / D50 / D90 · bars: ", what);
  view.sizeLegend.append(item);
}

// Each class's D50 (or d²-weighted D50) in the selected window over the trend's time.
function drawD50Trend(view) {
  const history = view.history;
  const chart = view.d50Chart;
  const width = Math.max(320, chart.clientWidth || 640);
  const sizes = windowSizes(view.state, view.window);
  const rows = sizes ? Math.max(1, classes.filter((name) => sizes.classes[name]).length) : 0;
  const height = sizes ? Math.max(SIZE_TREND_HEIGHT, 8 + rows * SIZE_ROW_HEIGHT + 46) : SIZE_TREND_HEIGHT;
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  chart.style.height = `${height}px`;
  chart.replaceChildren();
  const key = quantileKey("d50", view.weighting);
  const points = history && history.window === view.window ? history.ts.length : 0;
  const names = points ? classes.filter((name) => history.series[name]) : [];
  const sized = names.filter((name) => (history.series[name][key] || []).some((v) => v !== null && v !== undefined));
  chart.dataset.points = String(points);
  chart.dataset.sized = String(sized.length);
  const unit = unitText(history && history.size_unit);
  const margin = { left: 62, right: 90, top: 30, bottom: 50 };
  let top = 0;
  for (const name of sized) for (const v of history.series[name][key]) if (v !== null && v > top) top = v;
  const { top: yTop, step } = niceTop(Math.max(top, 1), 5);
  const { t0, t1 } = timeSpan(history, points);
  const { x, y } = drawTimeValueAxes(chart, { t0, t1, top: yTop, step, margin, width, height },
    (v) => String(+v.toPrecision(3)));
  const label = `D50${view.weighting === "square" ? " (d²-weighted)" : ""}${unit ? ` (${unit})` : ""}, ${windowLabel(view.window)} window`;
  chart.append(svg("text", { class: "chart-title", x: margin.left, y: 18 }, label));
  if (!sized.length) {
    chart.append(svg("text", { class: "empty", x: margin.left + (width - margin.left - margin.right) / 2, y: height / 2, "text-anchor": "middle" },
      points ? "no sizes yet" : "waiting for data…"));
    return;
  }
  for (const name of sized) {
    const values = history.series[name][key];
    const colour = classColour(name);
    for (const run of segments(history.ts, values)) {
      const line = run.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      chart.append(svg("polyline", { class: "series d50-series", points: line, stroke: colour, "data-class": name }));
    }
    const lastIndex = values.map((v) => v !== null && v !== undefined).lastIndexOf(true);
    const v = values[lastIndex];
    chart.append(svg("circle", { cx: x(history.ts[lastIndex]), cy: y(v), r: 5, fill: colour }));
    chart.append(svg("text", { class: "last-value", x: x(history.ts[lastIndex]) + 9, y: y(v) + 5, fill: colour, "data-class": name },
      sizeText(v, history.size_unit)));
  }
}

// -- the recent frames -------------------------------------------------------------
// A strip of the daemon's last few classified frames (newest first) under the large view,
// each with its particles boxed in class colours. Live, the large view follows the
// newest frame; a click on a thumbnail holds the strip and shows that frame large until
// Live is clicked again.

function frameId(frame) {
  return `${frame.key}@${frame.ts}`;
}

function jpegUrl(view, frame, width) {
  const query = `key=${encodeURIComponent(frame.key)}&ts=${encodeURIComponent(frame.ts)}`;
  return `/api/probes/${encodeURIComponent(view.id)}/frame.jpg?${query}${width ? `&width=${width}` : ""}`;
}

async function loadFrames(view, latest) {
  if (!view.following || !latest) return;  // held: the strip and the large view stay put
  const seen = frameId(latest);
  if (seen === view.framesSeen) return;
  const { body } = await api(`/api/probes/${encodeURIComponent(view.id)}/frames?boxes=1`);
  if (!view.following) return;  // the operator clicked a thumbnail meanwhile
  view.framesSeen = seen;
  view.recent = body.frames;
  view.stripTitle.textContent = `Recent frames (last ${body.capacity}, newest first)`;
  if (view.recent.length) showFrame(view, view.recent[0]);
  renderStrip(view);
}

function showFrame(view, frame) {
  if (view.shown && frameId(view.shown) === frameId(frame)) {
    if (view.frameWrap.dataset.loaded === "true") drawFrame(view);  // live or held changed
    return;
  }
  view.shown = frame;
  view.frameWrap.dataset.key = frame.key;
  view.frameWrap.dataset.ts = String(frame.ts);
  view.frameWrap.dataset.loaded = "false";
  view.image.dataset.fallback = "";
  view.image.src = jpegUrl(view, frame, null);
}

function drawBoxesInto(target, frame) {
  target.setAttribute("viewBox", `0 0 ${frame.width} ${frame.height}`);
  target.replaceChildren();
  for (const box of frame.boxes) {
    // Out of distribution: not a crystal the model knows ("I don't know"), counted apart.
    const name = box.out_of_distribution ? "not a crystal" : box.uncertain ? "uncertain" : box.label;
    const rect = svg("rect", {
      x: box.x, y: box.y, width: box.w, height: box.h,
      stroke: box.uncertain ? UNCERTAIN_COLOUR : classColour(box.label),
      class: box.uncertain ? "uncertain" : "", "data-label": name,
    });
    rect.append(svg("title", {}, `${name} ${(box.confidence * 100).toFixed(0)} %`));
    target.append(rect);
  }
}

function countsText(frame) {
  const parts = Object.entries(frame.counts).map(([name, n]) => `${name} ${n}`);
  if (frame.uncertain) parts.push(`uncertain ${frame.uncertain}`);
  if (frame.out_of_distribution) parts.push(`not a crystal ${frame.out_of_distribution}`);
  return parts.join(", ") || "none";
}

function drawFrame(view) {
  const frame = view.shown;
  if (!frame) return;
  view.image.hidden = false;
  view.nothing.hidden = true;
  view.frameWrap.dataset.loaded = "true";
  drawBoxesInto(view.boxes, frame);
  const held = view.following ? "" : "HELD · ";
  const thumbnailOnly = view.image.dataset.fallback ? " (thumbnail: the daemon no longer holds this frame)" : "";
  const end = view.following ? "boxes coloured by class, grey dashed = uncertain or not a crystal" : "click Live to follow the newest frame";
  view.caption.textContent = `${held}frame ${clockText(frame.ts)}${thumbnailOnly} · ${frame.particles} particles: ${countsText(frame)} · ${end}`;
  view.caption.classList.toggle("held", !view.following);
}

function frameMissing(view) {
  // The daemon dropped a held frame before its full-size JPEG was fetched: show the
  // thumbnail the browser already has, scaled up, rather than nothing.
  const frame = view.shown;
  if (!frame || view.image.dataset.fallback) return;
  view.image.dataset.fallback = "thumbnail";
  view.image.src = jpegUrl(view, frame, THUMB_WIDTH);
}

function createThumb(view, frame) {
  const button = el("button", "thumb");
  button.type = "button";
  button.dataset.key = frame.key;
  button.dataset.ts = String(frame.ts);
  const wrap = el("div", "thumb-wrap");
  wrap.style.aspectRatio = `${frame.width} / ${frame.height}`;
  const image = el("img");
  image.alt = `frame ${frame.key}`;
  image.src = jpegUrl(view, frame, THUMB_WIDTH);
  const boxes = svg("svg", { class: "thumb-boxes", preserveAspectRatio: "none" });
  drawBoxesInto(boxes, frame);
  wrap.append(image, boxes);
  // Under each thumbnail its particles per class, in the class colours (the time and the
  // names are in the tooltip and, once clicked, under the large view).
  const label = el("div", "thumb-label");
  for (const [name, n] of Object.entries(frame.counts)) {
    const count = el("span", "", String(n));
    count.style.color = classColour(name);
    count.dataset.class = name;
    label.append(count);
  }
  for (const [name, n] of [["uncertain", frame.uncertain], ["not a crystal", frame.out_of_distribution]]) {
    if (!n) continue;
    const count = el("span", "", String(n));
    count.style.color = UNCERTAIN_COLOUR;
    count.dataset.class = name;
    label.append(count);
  }
  button.title = `${frame.key} · ${clockText(frame.ts)} · ${countsText(frame)}`;
  button.append(wrap, label);
  button.addEventListener("click", () => hold(view, frame));
  return button;
}

function renderStrip(view) {
  const keep = new Set(view.recent.map(frameId));
  for (const [id, button] of view.thumbs) {
    if (!keep.has(id)) {
      button.remove();
      view.thumbs.delete(id);
    }
  }
  view.recent.forEach((frame, index) => {
    const id = frameId(frame);
    let button = view.thumbs.get(id);
    if (!button) {
      button = createThumb(view, frame);
      view.thumbs.set(id, button);
    }
    button.dataset.index = String(index);
    view.strip.append(button);  // in the listing's order, newest first
  });
  markShown(view);
}

function markShown(view) {
  const shown = view.shown ? frameId(view.shown) : null;
  for (const [id, button] of view.thumbs) {
    const selected = id === shown;
    button.classList.toggle("selected", selected);
    button.setAttribute("aria-pressed", selected ? "true" : "false");
  }
  renderLive(view);
}

function renderLive(view) {
  view.live.classList.toggle("on", view.following);
  view.live.setAttribute("aria-pressed", view.following ? "true" : "false");
  view.live.textContent = view.following ? "● Live" : "▶ Back to live";
  view.strip.classList.toggle("held", !view.following);
}

function hold(view, frame) {
  view.following = false;
  // Fetch the other held frames at full size now, while the daemon still has them (the
  // browser keeps them: key and time name a frame for good).
  view.preloads = view.recent.filter((other) => frameId(other) !== frameId(frame)).map((other) => {
    const image = new Image();
    image.src = jpegUrl(view, other, null);
    return image;
  });
  showFrame(view, frame);
  markShown(view);
}

function goLive(view) {
  if (view.following) return;
  view.following = true;
  view.preloads = [];
  view.framesSeen = null;  // reload the strip at once
  markShown(view);
  loadFrames(view, view.state.latest_frame).catch(() => {});
}

// -- the refresh loop ---------------------------------------------------------------

async function refresh() {
  if (refreshing) return;
  refreshing = true;
  const connection = document.getElementById("connection");
  try {
    const { body: state } = await api("/api/state");
    classes = state.classes;
    refreshMs = Math.max(500, state.refresh_s * 1000);
    daemonOffsetS = epochS(state.ts) - Date.now() / 1000;
    tickClock();
    renderModel(state);
    const main = document.getElementById("probes");
    for (const probe of state.probes) {
      let view = views.get(probe.id);
      if (!view) {
        view = createView(probe);
        views.set(probe.id, view);
        main.append(view.section);
      }
      view.state = probe;
      renderHead(view, probe);
      renderAlarms(view, probe);
      renderAlarmValues(view, probe);
      renderFigures(view, probe, state.windows);
      renderCounts(view, probe);
      renderSizes(view);
    }
    await Promise.all([...views.values()].map(async (view) => {
      await Promise.all([loadHistory(view), loadAlarmJournal(view)]);
      drawTrend(view);
      drawD50Trend(view);
      await loadFrames(view, view.state.latest_frame);
    }));
    connection.textContent = "live";
    connection.className = "connection live";
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
  } catch (error) {
    connection.textContent = `connection lost: ${error.message}`;
    connection.className = "connection lost";
  } finally {
    refreshing = false;
    clearTimeout(timer);
    timer = setTimeout(refresh, refreshMs);
  }
}

function refreshSoon() {
  clearTimeout(timer);
  timer = setTimeout(refresh, 50);
}

// The daemon's time, in the browser's time zone.
function tickClock() {
  if (daemonOffsetS === null) return;  // the browser's own clock may be far off the daemon's
  const clock = document.getElementById("clock");
  const now = Date.now() / 1000 + daemonOffsetS;
  clock.textContent = clockWithDateText(now);
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "";
  clock.title = `the daemon's clock, in this browser's time zone${zone ? ` (${zone}, ${offsetText(new Date(now * 1000))})` : ""}`;
}

document.addEventListener("DOMContentLoaded", () => {
  const operator = document.getElementById("operator");
  operator.value = window.localStorage.getItem(OPERATOR_KEY) || "";
  operator.addEventListener("input", () => {
    operator.classList.remove("missing");
    window.localStorage.setItem(OPERATOR_KEY, operator.value.trim());
  });
  window.addEventListener("resize", () => views.forEach((view) => {
    renderSizes(view);
    if (!view.history) return;
    drawTrend(view);
    drawD50Trend(view);
  }));
  setInterval(tickClock, 1000);
  refresh();
});
