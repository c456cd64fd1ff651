// crystal-monitor labelling page: the review queue's crops as a grid, labelled from the
// keyboard. Plain JavaScript; no library, nothing loaded from outside this server.
//
// Keys: 1..N the class shown beside the number, 0 or x "not a particle", space or s skip,
// u or Backspace undo the last label, arrows move, r reload. Labels are sent one after
// the other in the order they were typed, each with the operator's name (the same name
// the dashboard keeps, under the same localStorage key).
"use strict";

const OPERATOR_KEY = "crystal-monitor.operator";  // dashboard.js OPERATOR_KEY
// The dashboard's class colours, in the manifest's class order.
const CLASS_COLOURS = ["#4ea1ff", "#d29bff", "#2ec4b6", "#e6e9ec", "#8fd16a", "#a0785a"];
const NOT_A_PARTICLE_COLOUR = "#9aa5b1";
const PAGE_SIZE = 200;  // crops asked for at a time
const POLL_MS = 10000;  // newly kept crops and the counts, this often
const NUMBER_KEYS = 9;  // classes 1..9 have a key; any further ones only a button
const REASON_TEXT = {
  uncertain: "uncertain",
  out_of_distribution: "out of distribution",
  boundary: "near the boundary",
  random: "random share",
};
const REASON_HELP = {
  uncertain: "the model's confidence was below its threshold",
  out_of_distribution: "the crop looks unlike anything the model was trained on",
  boundary: "the two most likely classes were close",
  random: "a random share of the confident crops, to check them too",
};
const POST_HEADERS = { "Content-Type": "application/json", "X-Requested-By": "crystal-monitor-label" };

const page = {
  classes: [],
  notAParticle: "_not_a_particle",
  reasons: [],
  samples: [],     // the loaded crops, in the order the API gave them
  selected: -1,    // index into samples
  more: false,     // the API has more crops after the last loaded one
  query: "",       // the filters of the loaded crops, as a query string
  undo: [],        // {id, label, before: {label, labelled_by}}, newest last
  labelCounts: {},
  queueCounts: {},
};
let chain = Promise.resolve();  // labels and undos, one after the other
let pending = 0;
let loading = null;

// -- small helpers ------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function notice(message, isError = false) {
  const box = document.getElementById("notice");
  box.textContent = message;
  box.className = isError ? "notice error" : "notice";
  box.hidden = false;
}

function pct(value) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(0)} %`;
}

function epochS(value) {
  if (value === null || value === undefined) return null;
  return typeof value === "number" ? value : Date.parse(value) / 1000;
}

function timeText(ts, withDate = true) {
  const date = new Date(epochS(ts) * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  const time = `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
  if (!withDate) return time;
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ${time}`;
}

function classColour(name) {
  if (name === page.notAParticle) return NOT_A_PARTICLE_COLOUR;
  const index = page.classes.indexOf(name);
  return CLASS_COLOURS[(index < 0 ? 0 : index) % CLASS_COLOURS.length];
}

function labelText(label) {
  return label === page.notAParticle ? "not a particle" : label;
}

function reasonText(reason) {
  return REASON_TEXT[reason] || reason;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) {
    window.location.assign("/login");
    throw new Error("not logged in");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function post(path, body) {
  return api(path, { method: "POST", headers: POST_HEADERS, body: JSON.stringify(body) });
}

function connection(text, ok) {
  const node = document.getElementById("connection");
  node.textContent = text;
  node.className = ok ? "connection live" : "connection lost";
}

// -- the operator -------------------------------------------------------------------

function operatorName() {
  return document.getElementById("operator").value.trim();
}

function refuseWithoutOperator() {
  const operator = document.getElementById("operator");
  operator.classList.add("missing");
  operator.focus();
  notice("Enter your name under Operator (top right) before labelling: it is recorded " +
    "with every label. Then press Enter to go back to the crops.", true);
}

// -- the filters and the list -------------------------------------------------------

function filterQuery() {
  const params = new URLSearchParams();
  const value = (id) => document.getElementById(id).value;
  if (value("filter-probe")) params.set("probe", value("filter-probe"));
  if (value("filter-reason")) params.set("reason", value("filter-reason"));
  if (value("filter-labelled")) params.set("labelled", value("filter-labelled"));
  for (const [id, name] of [["filter-since", "since"], ["filter-until", "until"]]) {
    // datetime-local is the browser's local time; the API takes ISO 8601 UTC.
    if (value(id)) params.set(name, new Date(value(id)).toISOString());
  }
  return params.toString();
}

function fillSelect(id, values, texts) {
  const select = document.getElementById(id);
  const known = new Set([...select.options].map((option) => option.value));
  for (const value of values) {
    if (known.has(value)) continue;
    const option = el("option", "", texts ? texts(value) : value);
    option.value = value;
    select.append(option);
  }
}

function applyTotals(body) {
  page.classes = body.classes;
  page.notAParticle = body.not_a_particle;
  page.reasons = body.reasons;
  page.labelCounts = body.label_counts;
  page.queueCounts = body.queue_counts;
  fillSelect("filter-reason", body.reasons, reasonText);
  if (body.probes) fillSelect("filter-probe", body.probes);
  renderKeys();
  renderQueue();
}

// Load the first page of crops for the filters now set; the selection goes to the first.
async function load() {
  const query = filterQuery();
  const request = (async () => {
    const body = await api(`/api/samples?${query}${query ? "&" : ""}limit=${PAGE_SIZE}`);
    page.query = query;
    page.samples = body.samples;
    page.more = body.next_after_id !== null;
    page.undo = page.undo.filter((entry) => page.samples.some((s) => s.id === entry.id));
    applyTotals(body);
    renderGrid();
    select(page.samples.length ? 0 : -1);
    connection("live", true);
    document.body.dataset.loads = String(Number(document.body.dataset.loads || 0) + 1);
  })();
  loading = request;
  try {
    await request;
  } catch (error) {
    connection(`not loaded: ${error.message}`, false);
    notice(error.message, true);
  } finally {
    if (loading === request) loading = null;
  }
}

// The crops after the last loaded one: the next page, or those kept since.
async function loadAfter(limit) {
  const query = page.query;
  const last = page.samples.length ? page.samples[page.samples.length - 1].id : null;
  const after = last === null ? "" : `&after_id=${last}`;
  const body = await api(`/api/samples?${query}${query ? "&" : ""}limit=${limit}${after}`);
  if (query !== page.query) return;  // the filters changed meanwhile
  applyTotals(body);
  if (limit === 1 && page.more) return;  // only the counts were wanted
  const known = new Set(page.samples.map((sample) => sample.id));
  const fresh = body.samples.filter((sample) => !known.has(sample.id));
  page.samples.push(...fresh);
  page.more = body.next_after_id !== null;
  for (const sample of fresh) document.getElementById("crops").append(tile(sample));
  renderFoot();
  if (page.selected < 0 && page.samples.length) select(0);
}

async function loadMore() {
  if (loading || !page.more) return loading;
  loading = loadAfter(PAGE_SIZE).catch((error) => notice(error.message, true));
  try {
    await loading;
  } finally {
    loading = null;
  }
}

async function poll() {
  try {
    if (!loading) await loadAfter(page.more ? 1 : PAGE_SIZE);
    connection("live", true);
  } catch (error) {
    connection(`connection lost: ${error.message}`, false);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

// -- drawing ------------------------------------------------------------------------

function renderKeys() {
  const keys = document.getElementById("keys");
  keys.replaceChildren();
  const labelKey = (keyText, label, index) => {
    const button = el("button", "key label-key");
    button.type = "button";
    button.tabIndex = -1;
    button.dataset.label = label;
    const count = page.labelCounts[label] || 0;
    button.dataset.count = String(count);
    button.title = `${keyText ? `press ${keyText}: ` : ""}label the selected crop ` +
      `"${labelText(label)}" (${count} labelled so far)`;
    const swatch = el("span", "swatch");
    swatch.style.background = classColour(label);
    button.append(el("kbd", "", keyText || "·"), swatch, el("span", "name", labelText(label)),
      el("span", "count", String(count)));
    button.addEventListener("click", () => {
      button.blur();
      labelSelected(label);
    });
    if (index !== undefined) button.dataset.index = String(index);
    keys.append(button);
  };
  page.classes.forEach((name, index) => {
    labelKey(index < NUMBER_KEYS ? String(index + 1) : "", name, index + 1);
  });
  labelKey("0 / x", page.notAParticle);
  const help = el("span", "key-help");
  for (const [keyText, what] of [["space / s", "skip"], ["u / ⌫", "undo"], ["← ↑ → ↓", "move"],
    ["r", "reload"]]) {
    const item = el("span", "key");
    item.append(el("kbd", "", keyText), ` ${what}`);
    help.append(item);
  }
  keys.append(help);
}

function renderQueue() {
  const queue = document.getElementById("queue");
  queue.replaceChildren(el("span", "muted", "Queue (unlabelled):"));
  let total = 0;
  for (const reason of page.reasons) {
    const count = page.queueCounts[reason] || 0;
    total += count;
    const item = el("span", "reason-count");
    item.dataset.reason = reason;
    item.dataset.count = String(count);
    item.title = REASON_HELP[reason] || "";
    item.append(`${reasonText(reason)} `, el("strong", "", String(count)));
    queue.append(item);
  }
  const all = el("span", "reason-total", `${total} in all`);
  all.dataset.count = String(total);
  queue.append(all);
}

function imageUrl(sample) {
  return `/api/samples/${sample.id}/image`;
}

function tile(sample) {
  const node = el("div", "crop");
  node.setAttribute("role", "option");
  node.dataset.id = String(sample.id);
  node.dataset.keptBecause = sample.kept_because;
  node.addEventListener("click", () => {
    if (document.activeElement instanceof HTMLElement) document.activeElement.blur();
    select(page.samples.findIndex((s) => s.id === sample.id));
  });
  fillTile(node, sample);
  return node;
}

function fillTile(node, sample) {
  node.dataset.label = sample.label || "";
  node.classList.toggle("labelled", Boolean(sample.label));
  const image = el("div", "crop-image");
  const img = el("img");
  img.src = imageUrl(sample);
  img.alt = `crop ${sample.id}`;
  img.loading = "lazy";
  image.append(img);
  const guess = el("div", "crop-guess");
  const name = el("span", "guess", sample.guess);
  name.style.color = classColour(sample.guess);
  guess.append(name, " ", el("span", "confidence", pct(sample.confidence)));
  const why = el("div", `crop-why why-${sample.kept_because}`, reasonText(sample.kept_because));
  why.title = REASON_HELP[sample.kept_because] || "";
  const parts = [image, guess, why];
  if (sample.label) {
    const label = el("div", "crop-label");
    const text = el("span", "", `→ ${labelText(sample.label)}`);
    text.style.color = classColour(sample.label);
    label.append(text);
    if (sample.labelled_by) label.append(el("span", "muted", ` ${sample.labelled_by}`));
    parts.push(label);
  }
  node.title = `${sample.probe} ${timeText(sample.ts)} · kept because ${reasonText(sample.kept_because)}`;
  node.replaceChildren(...parts);
}

function renderGrid() {
  const grid = document.getElementById("crops");
  grid.replaceChildren(...page.samples.map(tile));
  renderFoot();
}

function renderFoot() {
  const foot = document.getElementById("grid-foot");
  foot.replaceChildren();
  const n = page.samples.length;
  if (!n) {
    foot.append(el("p", "muted", "No crops match these filters. The queue fills as the " +
      "daemon keeps crops; change the filters or wait and press r."));
    return;
  }
  if (page.more) {
    foot.append(el("span", "muted", `${n} crops shown; more are loaded as you go. `));
    const more = el("button", "more", "Load more");
    more.type = "button";
    more.tabIndex = -1;
    more.addEventListener("click", () => {
      more.blur();
      loadMore();
    });
    foot.append(more);
  } else {
    foot.append(el("span", "muted", `${n} crop${n === 1 ? "" : "s"} shown: all that match.`));
  }
}

function renderDetail() {
  const detail = document.getElementById("detail");
  const sample = page.samples[page.selected];
  if (!sample) {
    detail.replaceChildren(el("p", "muted", "No crop selected."));
    return;
  }
  detail.dataset.id = String(sample.id);
  const img = el("img");
  img.src = imageUrl(sample);
  img.alt = `crop ${sample.id}, enlarged`;
  const head = el("h2");
  const guess = el("span", "", sample.guess);
  guess.style.color = classColour(sample.guess);
  head.append("Model: ", guess, ` ${pct(sample.confidence)}`);
  const bars = el("div", "probabilities");
  const probabilities = sample.probabilities || {};
  // In the model's class order, whatever order the document has.
  const names = [...page.classes.filter((name) => name in probabilities),
    ...Object.keys(probabilities).filter((name) => !page.classes.includes(name))];
  for (const name of names) {
    const value = probabilities[name];
    const row = el("div", "probability");
    const bar = el("span", "bar");
    bar.style.width = `${Math.max(0, Math.min(1, value)) * 100}%`;
    bar.style.background = classColour(name);
    const track = el("span", "track");
    track.append(bar);
    row.append(el("span", "name", name), track, el("span", "value", pct(value)));
    bars.append(row);
  }
  const facts = el("dl", "facts");
  const fact = (term, value) => {
    if (value === null || value === undefined || value === "") return;
    facts.append(el("dt", "", term), el("dd", "", String(value)));
  };
  fact("Kept because", reasonText(sample.kept_because));
  fact("Decision", sample.decision_reason
    ? `${sample.status} (${sample.decision_reason.replaceAll("_", " ")})` : sample.status);
  fact("Probe", sample.probe);
  fact("Frame", sample.frame_key);
  fact("Frame time", timeText(sample.ts));
  fact("Batch", sample.batch);
  fact("Model", sample.model);
  fact("Label", sample.label
    ? `${labelText(sample.label)} by ${sample.labelled_by || "?"}` +
      (sample.labelled_at ? ` at ${timeText(sample.labelled_at)}` : "")
    : "not labelled yet");
  fact("Crop", `#${sample.id}`);
  detail.replaceChildren(img, head, bars, facts);
}

function select(index) {
  const grid = document.getElementById("crops");
  const previous = grid.querySelector(".crop.selected");
  if (previous) {
    previous.classList.remove("selected");
    previous.setAttribute("aria-selected", "false");
  }
  page.selected = index;
  document.body.dataset.selected = index >= 0 ? String(page.samples[index].id) : "";
  const node = grid.children[index];
  if (node) {
    node.classList.add("selected");
    node.setAttribute("aria-selected", "true");
    node.scrollIntoView({ block: "nearest" });
  }
  renderDetail();
  // Near the end of what is loaded: fetch the next page before the operator gets there.
  if (page.more && index >= page.samples.length - 10) loadMore();
}

// Tiles per row, as the grid lays them out now.
function columns() {
  const tiles = document.getElementById("crops").children;
  if (!tiles.length) return 1;
  const top = tiles[0].offsetTop;
  let n = 0;
  while (n < tiles.length && tiles[n].offsetTop === top) n += 1;
  return Math.max(1, n);
}

function move(step) {
  const n = page.samples.length;
  if (!n) return;
  const target = page.selected + step;
  if (target >= n && page.more) {
    loadMore().then(() => select(Math.min(target, page.samples.length - 1)));
    return;
  }
  select(Math.max(0, Math.min(n - 1, target)));
}

// -- labels -------------------------------------------------------------------------

function enqueue(task) {
  pending += 1;
  document.body.dataset.pending = String(pending);
  chain = chain.then(task).catch((error) => notice(error.message, true)).finally(() => {
    pending -= 1;
    document.body.dataset.pending = String(pending);
  });
  return chain;
}

// The store's answer: the crop as it is now, and the totals.
function applyAnswer(body) {
  const sample = body.sample;
  const index = page.samples.findIndex((s) => s.id === sample.id);
  if (index >= 0) {
    page.samples[index] = sample;
    const node = document.getElementById("crops").children[index];
    if (node) fillTile(node, sample);
    if (index === page.selected) renderDetail();
  }
  applyTotals(body);
}

function labelSelected(label) {
  const sample = page.samples[page.selected];
  if (!sample) {
    notice("No crop to label: none matches these filters.", true);
    return;
  }
  const who = operatorName();
  if (!who) {
    refuseWithoutOperator();
    return;
  }
  const id = sample.id;
  move(1);
  enqueue(async () => {
    const current = page.samples.find((s) => s.id === id) || sample;
    const before = { label: current.label, labelled_by: current.labelled_by };
    applyAnswer(await post(`/api/samples/${id}/label`, { label, operator: who }));
    page.undo.push({ id, label, before });
    notice(`Crop #${id}: ${labelText(label)}, by ${who}. u or Backspace undoes it.`);
  });
}

function skip() {
  const sample = page.samples[page.selected];
  move(1);
  if (sample) notice(`Crop #${sample.id} skipped: it stays in the queue.`);
}

// Undo the newest label: the crop gets back the label it had before (none: unlabelled).
function undoLast() {
  const who = operatorName();
  enqueue(async () => {
    const entry = page.undo.pop();
    if (!entry) {
      notice("Nothing to undo.");
      return;
    }
    const { id, before } = entry;
    if (before.label) {
      applyAnswer(await post(`/api/samples/${id}/label`,
        { label: before.label, operator: before.labelled_by || who }));
    } else {
      applyAnswer(await post(`/api/samples/${id}/unlabel`, who ? { operator: who } : {}));
    }
    const index = page.samples.findIndex((s) => s.id === id);
    if (index >= 0) select(index);
    const back = before.label ? `back to ${labelText(before.label)}` : "unlabelled again";
    notice(`Crop #${id}: ${labelText(entry.label)} undone, ${back}.`);
  });
}

// -- keys ---------------------------------------------------------------------------

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target;
  if (target instanceof HTMLInputElement || target instanceof HTMLSelectElement ||
      target instanceof HTMLTextAreaElement) {
    // Typing in a field; Escape (or Enter in the name) goes back to the crops.
    if (event.key === "Escape" || (event.key === "Enter" && target.id === "operator")) {
      event.preventDefault();
      target.blur();
    }
    return;
  }
  const key = event.key;
  const number = /^[1-9]$/.test(key) ? Number(key) : 0;
  if (number && number <= Math.min(page.classes.length, NUMBER_KEYS)) {
    labelSelected(page.classes[number - 1]);
  } else if (key === "0" || key === "x" || key === "X") {
    labelSelected(page.notAParticle);
  } else if (key === " " || key === "s" || key === "S") {
    skip();
  } else if (key === "u" || key === "U" || key === "Backspace") {
    undoLast();
  } else if (key === "ArrowRight") {
    move(1);
  } else if (key === "ArrowLeft") {
    move(-1);
  } else if (key === "ArrowDown") {
    move(columns());
  } else if (key === "ArrowUp") {
    move(-columns());
  } else if (key === "Home") {
    select(page.samples.length ? 0 : -1);
  } else if (key === "End") {
    select(page.samples.length - 1);
  } else if (key === "r" || key === "R") {
    load();
  } else {
    return;
  }
  event.preventDefault();
}

document.addEventListener("DOMContentLoaded", () => {
  const operator = document.getElementById("operator");
  operator.value = window.localStorage.getItem(OPERATOR_KEY) || "";
  operator.addEventListener("input", () => {
    operator.classList.remove("missing");
    window.localStorage.setItem(OPERATOR_KEY, operator.value.trim());
  });
  // The dashboard open in another tab changes the same name.
  window.addEventListener("storage", (event) => {
    if (event.key === OPERATOR_KEY && document.activeElement !== operator) {
      operator.value = event.newValue || "";
    }
  });
  const form = document.getElementById("filters");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (document.activeElement instanceof HTMLElement) document.activeElement.blur();
    load();
  });
  for (const select of form.querySelectorAll("select")) {
    select.addEventListener("change", () => {
      select.blur();  // back to the crops: the keys label again
      load();
    });
  }
  for (const input of form.querySelectorAll("input")) input.addEventListener("change", load);
  document.addEventListener("keydown", onKey);
  load().finally(() => setTimeout(poll, POLL_MS));
});
