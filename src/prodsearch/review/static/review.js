// The review page: asks about the pairs the server's queue picks, stores each answer at once,
// shows clusters and the calibration report. Plain DOM, no external resources.
"use strict";

const BATCH = 10;
const state = {
  batch: [], position: 0, view: "pairs", cluster: null, chain: Promise.resolve(),
  answered: [],  // the pairs answered here, as they were shown (undo shows them the same way)
};

// Key presses and clicks run one after another, in the order given: a fast typist's answers
// are neither lost nor applied to the wrong pair.
function enqueue(action) {
  state.chain = state.chain.then(action).catch((error) => say(error.message));
  return state.chain;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = response.headers.get("content-type")?.includes("json")
    ? await response.json() : await response.text();
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : body;
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return body;
}

function post(path, body) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: body === undefined ? "{}" : JSON.stringify(body),
  });
}

function say(text, ok = false) {
  const message = document.getElementById("message");
  message.textContent = text || "";
  message.className = ok ? "ok" : "";
}

function fmt(value, digits = 3) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

// -- progress --------------------------------------------------------------------------------
function showStatus(status) {
  document.getElementById("collection").textContent =
    `· ${status.collection} · ${status.products} products`;
  const c = status.counts;
  const left = status.uncertain_left;
  const rule = status.decided_by === "pair model"
    ? `the pair model decides at probability ≥ ${fmt(status.min_probability, 2)}`
    : "the fusion decides (no pair-model probabilities for this catalog)";
  document.getElementById("progress-text").textContent =
    `${status.answered} answered (${c.same} same · ${c.different} different · ` +
    `${c.unsure} not sure) · ${left} uncertain pair${left === 1 ? "" : "s"} left · ${rule}`;
  const total = status.answered + left;
  document.getElementById("bar-fill").style.width =
    total ? `${(100 * status.answered) / total}%` : "100%";
  let hint = status.decided_by === "pair model"
    ? "Uncertain pairs: probability near the threshold (odds within a factor e of it); " +
      "each answer there can move the decision."
    : "Uncertain pairs: the best signal's score within 0.1 of its threshold.";
  if (status.settled) {
    hint = status.settled.settled
      ? `The calibration has settled: leaving out your last ${status.settled.left_out} answers ` +
        `moves the threshold by only ${fmt(status.settled.shift)}. More answers will change little.`
      : `The calibration still moves: your last ${status.settled.left_out} answers shifted the ` +
        `threshold by ${fmt(status.settled.shift)}. More answers will help.`;
  }
  document.getElementById("progress-hint").textContent = hint;
  document.getElementById("answer-count").textContent = status.answered;
}

async function refreshStatus() {
  showStatus(await api("/api/status"));
}

async function refreshAnswers() {
  const answers = await api("/api/answers");
  const list = document.getElementById("answer-list");
  list.replaceChildren(...answers.slice(-20).reverse().map((a) =>
    el("li", { class: "answer" }, el("span", { class: `badge ${a.answer}` }, a.answer),
      ` ${a.id_a} / ${a.id_b}`, a.source !== "pair" ? ` (${a.source})` : "")));
  document.getElementById("answer-count").textContent = answers.length;
}

// -- a pair ----------------------------------------------------------------------------------
function productCard(product, photos = true) {
  const photo = !photos ? null : product.image
    ? el("div", { class: "photo" }, el("img", { src: product.image, alt: product.title }))
    : el("div", { class: "photo" }, "no photo");
  const title = product.tokens.length
    ? product.tokens.map((t) => (t.differs ? el("mark", { class: "differs" }, t.text) : t.text))
    : product.title || "(no title)";
  const rows = Object.entries(product.fields).map(([key, value]) =>
    el("tr", {}, el("th", {}, key), el("td", { title: String(value) }, el("div", {}, String(value)))));
  return el("article", { class: "product" }, photo, el("h2", {}, title),
    el("div", { class: "pid" }, product.id), rows.length ? el("table", {}, rows) : null);
}

function evidence(pair, status) {
  const verdict = pair.match
    ? el("div", { class: "verdict match" }, `Currently: same product (decided by ${pair.rule})`)
    : el("div", { class: "verdict nomatch" }, "Currently: not a match");
  const parts = [el("div", {}, verdict, el("div", { class: "hint" }, `signals: ${pair.pattern}`))];
  if (pair.probability !== null) {
    const threshold = status ? status.min_probability : null;
    const meter = el("div", { class: "meter" },
      el("div", { class: "fill", style: `width:${100 * pair.probability}%` }),
      threshold !== null ? el("div", { class: "mark", style: `left:${100 * threshold}%` }) : null);
    parts.push(el("div", {}, `Probability ${fmt(pair.probability)}`,
      threshold !== null ? ` (threshold ${fmt(threshold, 2)})` : "", meter));
  } else {
    parts.push(el("div", {}, `Fused score ${fmt(pair.fused)}`));
  }
  const rows = pair.signals.map((s) => el("tr", {},
    el("td", {}, s.modality), el("td", {}, fmt(s.score)), el("td", {}, fmt(s.threshold)),
    el("td", { class: s.fired ? "fired" : "notfired" }, s.fired ? "fired" : "below")));
  parts.push(el("table", { class: "signals" },
    el("tr", {}, el("th", {}, "signal"), el("th", {}, "score"), el("th", {}, "threshold"),
      el("th", {}, "")), rows));
  return parts;
}

let lastStatus = null;

function showPair() {
  const pair = state.batch[state.position];
  const box = document.getElementById("pair");
  const buttons = document.querySelectorAll(".answers button[data-answer]");
  if (!pair) {
    box.replaceChildren(el("p", {}, "No candidate pair is left to ask about."));
    document.getElementById("evidence").replaceChildren();
    document.getElementById("position").textContent = "";
    buttons.forEach((b) => { b.disabled = true; });
    return;
  }
  buttons.forEach((b) => { b.disabled = false; });
  // a text-only pair shows no empty photo frames
  const photos = pair.products.some((p) => p.image);
  box.replaceChildren(...pair.products.map((p) => productCard(p, photos)));
  box.dataset.idA = pair.id_a;
  box.dataset.idB = pair.id_b;
  document.getElementById("evidence").replaceChildren(...evidence(pair, lastStatus));
  document.getElementById("position").textContent =
    `Pair ${state.position + 1} of ${state.batch.length} in this batch` +
    (pair.uncertain ? " · uncertain" : "");
}

async function loadBatch() {
  state.batch = await api(`/api/queue?size=${BATCH}`);
  state.position = 0;
  showPair();
}

async function answer(kind) {
  const pair = state.batch[state.position];
  if (!pair) return;
  try {
    const result = await post("/api/answers", { id_a: pair.id_a, id_b: pair.id_b, answer: kind });
    state.answered.push(pair);
    lastStatus = result.status;
    showStatus(result.status);
    say(`Saved: ${pair.id_a} / ${pair.id_b} ${kind}.`, true);
    state.position += 1;
    if (state.position >= state.batch.length) await loadBatch();
    else showPair();
    await refreshAnswers();
  } catch (error) {
    say(error.message);
  }
}

// the stored answer names a pair in either order
function samePair(p, q) {
  return (p.id_a === q.id_a && p.id_b === q.id_b) || (p.id_a === q.id_b && p.id_b === q.id_a);
}

async function undo() {
  try {
    const result = await post("/api/undo");
    lastStatus = result.status;
    showStatus(result.status);
    if (!result.stored.length) {
      say("Nothing to undo.");
    } else {
      say(`Undone: ${result.stored.length} answer(s).`, true);
      const first = result.stored[0];
      if (result.stored.length === 1 && first.source === "pair" && state.view === "pairs") {
        const shown = state.answered.pop();
        const pair = shown && samePair(shown, first) ? shown :
          await api(`/api/pair?id_a=${encodeURIComponent(first.id_a)}` +
            `&id_b=${encodeURIComponent(first.id_b)}`);
        if (state.position > 0 && samePair(state.batch[state.position - 1], pair)) {
          state.position -= 1;
        } else {
          state.batch.splice(state.position, 0, pair);
        }
        showPair();
      }
      if (state.view === "clusters" && state.cluster !== null) await showCluster(state.cluster);
    }
    await refreshAnswers();
  } catch (error) {
    say(error.message);
  }
}

// -- merges that assigning new products proposed ---------------------------------------------
async function loadProposedMerges() {
  const proposals = await api("/api/proposed-merges");
  const box = document.getElementById("proposed-merges");
  if (!proposals.length) { box.replaceChildren(); return; }
  box.replaceChildren(
    el("h2", {}, `Proposed merges (${proposals.length})`),
    ...proposals.map((p) => el("div", { class: "proposal" },
      el("p", {}, `"${p.product}" matched both:`),
      el("ul", {}, ...[p.cluster_id, p.with].map((c) =>
        el("li", {}, `${c} (${p.sizes[c]} products): ${p.titles[c].join(" · ")}`))),
      el("button", { onclick: () => decideMerge(p, true) }, "Merge: one product"),
      el("button", { onclick: () => decideMerge(p, false) }, "Keep apart"),
    )),
  );
}

async function decideMerge(proposal, merge) {
  await post("/api/proposed-merges", { cluster_id: proposal.cluster_id, with: proposal.with, merge });
  await loadProposedMerges();
}

// -- clusters --------------------------------------------------------------------------------
async function loadClusters() {
  await loadProposedMerges();
  const clusters = await api("/api/clusters");
  const list = document.getElementById("cluster-list");
  if (!clusters.length) {
    list.replaceChildren(el("p", {}, "No cluster of two or more products."));
    document.getElementById("cluster").replaceChildren();
    return;
  }
  list.replaceChildren(...clusters.slice(0, 60).map((c) => el("button", {
    class: c.number === state.cluster ? "active" : "",
    "data-cluster": c.number,
    onclick: () => showCluster(c.number),
  }, `#${c.number} · ${c.size} products${c.reviewed >= c.size - 1 ? " ✓" : ""}`)));
  if (state.cluster === null) await showCluster(clusters[0].number);
}

async function showCluster(number) {
  state.cluster = number;
  document.querySelectorAll("#cluster-list button").forEach((b) => {
    b.classList.toggle("active", Number(b.dataset.cluster) === number);
  });
  const cluster = await api(`/api/clusters/${number}`);
  const photos = cluster.members.some((m) => m.image);
  const cards = cluster.members.map((member, i) => {
    const card = productCard(member, photos);
    const badge = i === 0 ? el("span", { class: "badge same" }, "representative")
      : member.answer ? el("span", { class: `badge ${member.answer}` }, member.answer) : null;
    card.append(el("div", {}, badge, " ", el("button", {
      class: "split", onclick: () => clusterAction(`/api/clusters/${number}/split`, { member: member.id }),
    }, "Split off")));
    return card;
  });
  document.getElementById("cluster").replaceChildren(
    el("h2", {}, `Cluster #${number}: ${cluster.members.length} products`),
    el("button", { id: "confirm", class: "primary",
      onclick: () => enqueue(() => clusterAction(`/api/clusters/${number}/confirm`)) },
      "Confirm: all the same product"),
    el("div", { class: "members" }, cards));
}

async function clusterAction(path, body) {
  try {
    const result = await post(path, body);
    lastStatus = result.status;
    showStatus(result.status);
    say(`Saved ${result.stored.length} answer(s).`, true);
    await loadClusters();
    await showCluster(state.cluster);
    await refreshAnswers();
  } catch (error) {
    say(error.message);
  }
}

// -- calibration -----------------------------------------------------------------------------
function showReport(report) {
  const box = document.getElementById("report");
  const chart = document.getElementById("chart");
  const lines = [];
  lines.push(el("p", {}, `${report.answers} answers; ${report.answered_candidates} of them are ` +
    `candidate pairs (${report.answered_same} same).`));
  if (report.error) lines.push(el("p", { class: "error" }, `Not calibrated: ${report.error}`));
  if (report.calibration) {
    const c = report.calibration;
    const p = report.predicted;
    lines.push(el("div", { class: "numbers", id: "operating-point" },
      el("div", {}, `Operating point: probability ≥ ${fmt(c.min_probability, 2)} ` +
        `(was ${fmt(report.now_min_probability, 2)}); Platt slope ${fmt(c.slope, 2)}, ` +
        `intercept ${fmt(c.intercept, 2)}.`),
      el("div", {}, `Predicted for the catalog: ${p.matched_pairs} matched pairs ` +
        `(${p.products_with_a_match} products with a match; now ${report.now.matched_pairs} ` +
        `pairs), expected precision ${fmt(p.expected_precision)}, expected recall ` +
        `${fmt(p.expected_recall)}, F1 ${fmt(p.expected_f1)}.`),
      el("div", {}, report.written_to ? `Written to ${report.written_to}: dedup, match and the ` +
        "API use it from now on." : "Applied to this review (no settings file given).")));
    lines.push(el("p", { id: "taught" }, report.taught && report.taught.length
      ? "What your answers taught beyond the model (weight; + means more likely the same): " +
        report.taught.map((t) => `${t.feature} ${t.weight > 0 ? "+" : ""}${fmt(t.weight, 2)}`)
          .join(", ") + "."
      : `No feature weights yet (they need ${report.weights_need.answers} answered candidate ` +
        `pairs, ${report.weights_need.each} of each kind, and must help on held-out answers): ` +
        "the model's probabilities are rescaled only."));
  }
  const rows = [...report.signals, ...(report.fused ? [report.fused] : [])].map((s) =>
    el("tr", {}, el("td", {}, s.name), el("td", {}, fmt(s.in_force)),
      el("td", {}, fmt(s.at_threshold.precision)), el("td", {}, fmt(s.at_threshold.recall)),
      el("td", {}, fmt(s.at_threshold.f1))));
  if (rows.length) {
    lines.push(el("table", { id: "signal-table" }, el("tr", {}, el("th", {}, "on your answers"),
      el("th", {}, "threshold"), el("th", {}, "precision"), el("th", {}, "recall"),
      el("th", {}, "F1")), rows));
  }
  box.replaceChildren(...lines);
  if (rows.length) {
    chart.src = `/api/report.svg?t=${Date.now()}`;
    chart.hidden = false;
  } else {
    chart.hidden = true;
  }
}

async function calibrate() {
  const button = document.getElementById("calibrate");
  button.disabled = true;
  say("Calibrating and re-deciding the catalog…", true);
  try {
    const report = await post("/api/calibrate");
    showReport(report);
    say(report.error ? report.error : "Calibrated.", !report.error);
    await refreshStatus();
    await loadBatch();
  } catch (error) {
    say(error.message);
  } finally {
    button.disabled = false;
  }
}

async function importLabels(event) {
  const file = event.target.files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const result = await api("/api/labels", { method: "POST", body: form });
    showStatus(result.status);
    say(`Imported ${result.imported} labels from ${file.name}.`, true);
    await loadBatch();
    await refreshAnswers();
  } catch (error) {
    say(`Nothing imported: ${error.message}`);
  }
  event.target.value = "";
}

// -- wiring ----------------------------------------------------------------------------------
function switchView(view) {
  state.view = view;
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.view === view));
  document.querySelectorAll(".view").forEach((v) => { v.hidden = v.id !== `view-${view}`; });
  if (view === "clusters") loadClusters().catch((e) => say(e.message));
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target instanceof HTMLInputElement) return;
  const key = event.key.toLowerCase();
  if (key === "z") { event.preventDefault(); enqueue(undo); return; }
  if (state.view !== "pairs") return;
  const kind = { y: "same", n: "different", u: "unsure" }[key];
  if (kind) { event.preventDefault(); enqueue(() => answer(kind)); }
});

async function start() {
  document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => switchView(t.dataset.view)));
  document.querySelectorAll(".answers button[data-answer]").forEach((b) =>
    b.addEventListener("click", () => enqueue(() => answer(b.dataset.answer))));
  document.getElementById("undo").addEventListener("click", () => enqueue(undo));
  document.getElementById("calibrate").addEventListener("click", calibrate);
  document.getElementById("import").addEventListener("change", importLabels);
  try {
    lastStatus = await api("/api/status");
    showStatus(lastStatus);
    await loadBatch();
    await refreshAnswers();
    const report = await api("/api/report").catch(() => null);
    if (report) showReport(report);
    document.body.dataset.ready = "1";
  } catch (error) {
    say(error.message);
  }
}

start();
