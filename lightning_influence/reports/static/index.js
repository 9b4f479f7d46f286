// The INFLUENCE tab of TensorBoard: plain JavaScript, no network beyond this plugin's own routes.
// TensorBoard loads this module in an iframe whose base URL is the plugin's route prefix and calls render().

const state = {
  runs: [], run: null, info: null, view: "queries", query: 0, trainIndex: null, k: 10, selfK: 50,
  checked: new Set(), selfRows: [],
};
const REFRESH_MS = 10000;

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function query(params) {
  return new URLSearchParams(Object.entries(params).filter(([, v]) => v !== null && v !== undefined)).toString();
}

async function api(route, params = {}) {
  const response = await fetch(`${route}?${query({ run: state.run, ...params })}`);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `${route} failed with ${response.status}`);
  return body;
}

function showError(error) {
  const banner = document.getElementById("error");
  banner.textContent = error ? String(error.message || error) : "";
  banner.hidden = !error;
}

const text = (value) => (value === null || value === undefined ? "–" : value);
const score = (value) => (value > 0 ? "+" : "") + Number(value).toExponential(2);

function thumbnail(example, split, size = "small") {
  if (!example.thumbnail) {
    return example.description ? el("span", { class: "description" }, example.description)
      : el("span", { class: "no-thumbnail" }, "–");
  }
  const src = `thumbnail?${query({ run: state.run, split, position: example.position, v: state.info.updated })}`;
  return el("img", { class: `thumb ${size}`, src, alt: `${split} example ${example.index}` });
}

function suspectMark(example) {
  if (example.suspect === null || example.suspect === undefined) return "–";
  return example.suspect
    ? el("span", { class: "suspect", title: "suspect label: it differs from the model's prediction" }, "⚠ yes")
    : "";
}

function trainLink(example) {
  return el("a", { href: "#", class: "train-link", "data-index": example.index,
    onclick: (event) => { event.preventDefault(); showTrain(example.index); } }, `#${example.index}`);
}

function queryLink(example) {
  return el("a", { href: "#", class: "query-link", "data-position": example.position,
    onclick: (event) => { event.preventDefault(); showQuery(example.position); } }, `query ${example.position}`);
}

function table(id, headers, rows) {
  return el("table", { id, class: "examples" },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function trainRow(example, rank, kind) {
  return el("tr", { class: example.suspect ? "is-suspect" : "", "data-index": example.index },
    el("td", {}, rank), el("td", {}, thumbnail(example, "train")), el("td", {}, trainLink(example)),
    el("td", {}, text(example.label)), el("td", {}, text(example.prediction)), el("td", {}, suspectMark(example)),
    el("td", { class: `score ${kind}` }, score(example.score)));
}

function exampleTable(id, title, kind, examples, empty) {
  const headers = ["rank", "input", "train index", "label", "predicted", "suspect", "score"];
  return el("section", { class: `ranking ${kind}` }, el("h3", {}, title),
    examples.length ? table(id, headers, examples.map((e, n) => trainRow(e, n + 1, kind)))
      : el("p", { class: "empty" }, empty));
}

function histogram(data, lines) {
  const width = 560, height = 170, pad = 30;
  const { counts, edges } = data;
  const low = edges[0], high = edges[edges.length - 1], span = high - low || 1;
  const x = (v) => pad + ((v - low) / span) * (width - 2 * pad);
  const top = Math.log10(Math.max(...counts) + 1) || 1;
  const y = (c) => height - pad - (Math.log10(c + 1) / top) * (height - 2 * pad);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "histogram");
  const add = (tag, attributes, content) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    if (content !== undefined) node.textContent = content;
    svg.append(node);
  };
  counts.forEach((count, n) => {
    const middle = (edges[n] + edges[n + 1]) / 2;
    add("rect", { x: x(edges[n]), y: y(count), width: Math.max(1, x(edges[n + 1]) - x(edges[n]) - 1),
      height: height - pad - y(count), class: middle > 0 ? "bar helpful" : "bar harmful" },
    undefined);
  });
  add("line", { x1: pad, x2: width - pad, y1: height - pad, y2: height - pad, class: "axis" });
  if (low < 0 && high > 0) add("line", { x1: x(0), x2: x(0), y1: pad / 2, y2: height - pad, class: "zero" });
  for (const [value, label] of lines) {
    add("line", { x1: x(value), x2: x(value), y1: pad / 2, y2: height - pad, class: "threshold" });
    add("text", { x: x(value), y: pad / 2 - 2, class: "threshold-label" }, label);
  }
  add("text", { x: pad, y: height - 8, class: "tick" }, low.toExponential(1));
  add("text", { x: width - pad, y: height - 8, class: "tick end" }, high.toExponential(1));
  add("text", { x: width / 2, y: height - 8, class: "tick middle" }, "score (count on a log scale)");
  add("text", { x: 2, y: y(Math.max(...counts)) + 4, class: "tick" }, Math.max(...counts));
  return svg;
}

function kSelect(values, current, onchange, id) {
  return el("label", {}, "show top ",
    el("select", { id, onchange: (event) => onchange(Number(event.target.value)) },
      values.map((v) => el("option", { value: v, selected: v === current ? "selected" : null }, v))));
}

function untrusted() {
  // An untrustworthy run's scores are shown, marked, with why (the run's metadata warnings).
  if (!state.info || state.info.trustworthy !== false) return null;
  return el("p", { class: "untrusted", role: "alert" }, el("strong", {}, "⚠ Not trustworthy: "),
    state.info.warnings.join(" "), " See the influence/text/convergence table in the TEXT tab.");
}

function setMain(...children) {
  const main = document.getElementById("main");
  main.replaceChildren(...[untrusted(), ...children].filter((child) => child !== null));
  main.dataset.run = state.run;
  main.dataset.view = state.view;
  for (const tab of document.querySelectorAll(".view-tab")) {
    tab.classList.toggle("active", tab.dataset.view === state.view);
  }
}

function exampleCard(example, split, title, extra = []) {
  const facts = [["dataset index", example.index], ["label", text(example.label)],
    ["predicted", text(example.prediction)], ["loss", example.loss === null ? "–" : example.loss.toPrecision(4)],
    ...extra];
  return el("div", { class: `card ${example.suspect ? "is-suspect" : ""}` },
    el("div", { class: "card-image" }, thumbnail(example, split, "large")),
    el("div", {}, el("h2", {}, title),
      el("dl", {}, facts.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)])),
      example.suspect ? el("p", { class: "suspect" }, split === "train"
        ? "⚠ suspect label: the model predicts another class" : "⚠ the model gets this query wrong") : null,
      example.description && example.thumbnail ? el("p", { class: "description" }, example.description) : null));
}

async function showQueries() {
  state.view = "queries";
  const queries = await api("queries");
  const list = el("ol", { id: "query-list" }, queries.map((q) => el("li", {
    class: `query-item ${q.position === state.query ? "selected" : ""} ${q.suspect ? "is-suspect" : ""}`,
    "data-position": q.position, onclick: () => showQuery(q.position) },
  thumbnail(q, "query"), el("span", { class: "query-label" }, `query ${q.position}`, el("br"),
    `#${q.index} · label ${text(q.label)}`,
    q.prediction !== null ? ` · pred ${q.prediction}` : ""))));
  setMain(el("div", { class: "split" }, el("aside", {}, el("h3", {}, `Queries (${queries.length})`), list),
    el("div", { id: "query-detail" }, "Loading…")));
  await showQueryDetail(state.query);
}

async function showQuery(position) {
  state.query = position;
  if (state.view !== "queries" || !document.getElementById("query-detail")) return showQueries();
  for (const item of document.querySelectorAll(".query-item")) {
    item.classList.toggle("selected", Number(item.dataset.position) === position);
  }
  return showQueryDetail(position);
}

async function showQueryDetail(position) {
  const answer = await api("query", { query: position, k: state.k });
  const lines = [];
  if (answer.helpful.length) lines.push([answer.helpful[answer.helpful.length - 1].score, `top ${state.k} helpful`]);
  if (answer.harmful.length) lines.push([answer.harmful[answer.harmful.length - 1].score, `top ${state.k} harmful`]);
  document.getElementById("query-detail").replaceChildren(
    exampleCard(answer.query, "query", `Query ${position}`),
    el("div", { class: "controls" }, kSelect([5, 10, 25, 50].filter((v) => v <= state.info.max_k), state.k,
      (k) => { state.k = k; showQueryDetail(position).catch(showError); }, "k-select"),
    el("span", { class: "hint" }, "Positive score: the training example helped this query (removing it would ",
      "raise the query's loss); negative: it hurt.")),
    el("div", { class: "rankings" },
      exampleTable("helpful-table", "Most helpful", "helpful", answer.helpful,
        "No training example has a positive score."),
      exampleTable("harmful-table", "Most harmful", "harmful", answer.harmful,
        "No training example has a negative score.")),
    el("section", { id: "histogram" }, el("h3", {}, `All ${state.info.num_train} scores of this query`),
      histogram(answer.histogram, lines)));
}

function queryRow(example, kind) {
  return el("tr", { "data-position": example.position }, el("td", {}, thumbnail(example, "query")),
    el("td", {}, queryLink(example)), el("td", {}, example.index), el("td", {}, text(example.label)),
    el("td", {}, text(example.prediction)), el("td", { class: `score ${kind}` }, score(example.score)));
}

async function showTrain(index) {
  state.view = "train";
  state.trainIndex = index;
  const form = el("form", { class: "controls", onsubmit: (event) => {
    event.preventDefault();
    showTrain(Number(document.getElementById("train-index-input").value)).catch(showError);
  } }, el("label", {}, "training example (dataset index) ",
    el("input", { id: "train-index-input", type: "number", min: 0, value: index ?? "" })),
  el("button", { type: "submit" }, "Show"));
  if (index === null || index === undefined) return setMain(form, el("p", { class: "empty" },
    "Pick a training example: click a train index in a table, or type its dataset index."));
  setMain(form, el("p", {}, "Loading…"));
  const answer = await api("train", { index, k: state.k });
  const rank = `(rank ${answer.self_rank} of ${answer.num_train})`;
  const extra = answer.self_influence === undefined ? []
    : [["self-influence", `${answer.self_influence.toExponential(3)} ${rank}`]];
  const headers = ["input", "query", "dataset index", "label", "predicted", "score"];
  const block = (id, title, kind, rows, empty) => el("section", { class: `ranking ${kind}` }, el("h3", {}, title),
    rows.length ? table(id, headers, rows.map((q) => queryRow(q, kind))) : el("p", { class: "empty" }, empty));
  const card = exampleCard(answer.example, "train", `Training example #${index}`, extra);
  setMain(form, el("div", { id: "train-view" }, card,
    el("div", { class: "rankings" },
      block("helps-table", "Queries it helps most", "helpful", answer.helps, "It helps no query."),
      block("hurts-table", "Queries it hurts most", "harmful", answer.hurts, "It hurts no query."))));
}

function exportLink() {
  const indices = [...state.checked];
  const link = document.getElementById("export-link");
  link.textContent = `Export ${indices.length} checked as CSV`;
  link.href = indices.length ? `export?${query({ run: state.run, indices: indices.join(",") })}` : "#";
  link.classList.toggle("disabled", !indices.length);
}

function selfRow(row) {
  const box = el("input", { type: "checkbox", class: "pick", "data-index": row.index,
    checked: state.checked.has(row.index) ? "checked" : null,
    onchange: (event) => {
      if (event.target.checked) state.checked.add(row.index); else state.checked.delete(row.index);
      exportLink();
    } });
  return el("tr", { class: row.suspect ? "is-suspect" : "", "data-index": row.index },
    el("td", {}, box), el("td", {}, row.rank), el("td", {}, thumbnail(row, "train")), el("td", {}, trainLink(row)),
    el("td", {}, text(row.label)), el("td", {}, text(row.prediction)), el("td", {}, suspectMark(row)),
    el("td", {}, row.loss === null ? "–" : row.loss.toPrecision(3)),
    el("td", { class: "score" }, row.self_influence.toExponential(3)),
    state.info.descriptions ? el("td", { class: "description" }, text(row.description)) : null);
}

async function showSelf() {
  state.view = "self";
  if (!state.info.self_influence) {
    return setMain(el("p", { class: "empty" }, "This run has no self-influence: compute it with ",
      el("code", {}, "InfluenceCallback(self_influence=True)"), "."));
  }
  state.selfRows = await api("self_influence", { k: state.selfK });
  if (!state.checked.size) state.selfRows.filter((r) => r.suspect).forEach((r) => state.checked.add(r.index));
  const headers = ["export", "rank", "input", "train index", "label", "predicted", "suspect", "loss",
    "self-influence", ...(state.info.descriptions ? ["description"] : [])];
  const pickSuspects = () => {
    state.checked = new Set(state.selfRows.filter((r) => r.suspect).map((r) => r.index));
    showSelf().catch(showError);
  };
  setMain(el("div", { class: "controls" },
    kSelect([20, 50, 100, 200, 500].filter((v) => v <= state.info.max_self_k), state.selfK,
      (k) => { state.selfK = k; showSelf().catch(showError); }, "self-k-select"),
    el("button", { id: "check-suspects", onclick: pickSuspects }, "Check the suspect labels only"),
    el("button", { id: "clear-checks", onclick: () => { state.checked.clear(); showSelf().catch(showError); } },
      "Clear"),
    el("a", { id: "export-link", class: "button", download: "suspected_mislabels.csv" }, "Export")),
  el("p", { class: "hint" }, "Highest self-influence first: outliers and likely mislabelled examples. ",
    "⚠ marks labels the model disagrees with; they are checked for export."),
  table("self-table", headers, state.selfRows.map(selfRow)));
  exportLink();
}

const VIEWS = { queries: showQueries, train: () => showTrain(state.trainIndex), self: showSelf };

async function selectRun(name) {
  state.run = name;
  state.info = state.runs.find((r) => r.name === name) || null;
  state.query = 0;
  state.checked.clear();
  if (!state.info || state.info.state !== "complete") {
    const message = !state.info ? "No influence run found under this log dir."
      : state.info.state === "computing" ? `Run ${name} is still computing; this page refreshes when it is done.`
        : state.info.message;
    return setMain(el("p", { class: "empty" }, message));
  }
  return VIEWS[state.view]();
}

function runOptions() {
  // Rebuilt only when something changed, so that a periodic refresh never closes an open list.
  const select = document.getElementById("run-select");
  const labels = state.runs.map((r) => [r.name, r.state === "complete"
    ? `${r.name} (${r.num_queries} queries × ${r.num_train} training examples)` : `${r.name} (${r.state})`]);
  if (JSON.stringify(labels) !== select.dataset.labels) {
    select.dataset.labels = JSON.stringify(labels);
    select.replaceChildren(...labels.map(([name, label]) => el("option", { value: name }, label)));
  }
  if (state.run !== null && select.value !== state.run) select.value = state.run;
}

async function refreshRuns() {
  const before = state.info;
  state.runs = await api("runs");
  runOptions();
  const now = state.runs.find((r) => r.name === state.run);
  if (!state.run || !now) {
    const complete = state.runs.filter((r) => r.state === "complete");
    const latest = complete.sort((a, b) => b.updated - a.updated)[0] || state.runs[0];  // the newest result
    await selectRun(latest ? latest.name : null);
    runOptions();
  } else if (!before || now.state !== before.state || now.updated !== before.updated) {
    await selectRun(state.run);
  }
}

function header() {
  const tabs = [["queries", "Queries"], ["train", "Training example"], ["self", "Self-influence"]];
  return el("header", {}, el("label", {}, "Run ", el("select", { id: "run-select",
    onchange: (event) => selectRun(event.target.value).catch(showError) })),
  el("nav", {}, tabs.map(([view, title]) => el("button", { class: "view-tab", "data-view": view,
    onclick: () => { state.view = view; showError(null); VIEWS[view]().catch(showError); } }, title))),
  el("button", { id: "refresh", title: "Reload the runs", onclick: () => refreshRuns().catch(showError) }, "↻"));
}

export async function render() {
  document.head.append(el("link", { rel: "stylesheet", href: "style.css" }));
  const banner = el("div", { id: "error", class: "error", hidden: "hidden" });
  document.body.append(header(), banner, el("main", { id: "main" }));
  try {
    await refreshRuns();
  } catch (error) {
    showError(error);
  }
  setInterval(() => refreshRuns().catch(showError), REFRESH_MS);
}
