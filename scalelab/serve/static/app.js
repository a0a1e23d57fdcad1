// scalelab's web app: plain JS over the server's own OpenAI-compatible API (/v1) and /api.
// Text from models and files is only ever set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
let INFO = null;

async function api(path, body) {
  const r = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  // an error page that is not ours (a proxy's 502) is not JSON: say the status, not a parse error
  const data = await r.json().catch(() => null);
  if (!r.ok) throw new Error(data && data.error ? data.error.message : `${r.status} ${r.statusText}`);
  if (data === null) throw new Error(`${path}: the server's answer is not JSON`);
  return data;
}

// Server-sent events of one streaming completion: yields each parsed chunk until [DONE].
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// Stream one chat answer; onText(full text so far) after every chunk; returns the answer.
async function streamChat(model, messages, params, onText) {
  const r = await fetch("/v1/chat/completions", {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({model, messages, stream: true, ...params})});
  if (!r.ok) throw new Error((await r.json()).error.message);
  let text = "";
  for await (const chunk of sse(r)) {
    if (chunk.error) throw new Error(chunk.error.message);
    const c = chunk.choices[0];
    if (c && c.delta && c.delta.content) {
      text += c.delta.content;
      onText(text);
    }
  }
  return text;
}

function numberParam(id) {
  const v = $(id).value;
  return v === "" ? undefined : Number(v);
}

// ---- views -------------------------------------------------------------------------------

function show() {
  const name = (location.hash || "#chat").slice(1);
  for (const v of document.querySelectorAll(".view")) v.classList.toggle("active", v.id === "view-" + name);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.id === "tab-" + name);
  if (name === "tracker") loadTracker();
}

// ---- chat --------------------------------------------------------------------------------

let conversation = [];  // [{role, content, error?}]: error set on an answer that failed
let busy = false;

function renderChat() {
  const log = $("chat-log");
  log.replaceChildren();
  conversation.forEach((m, i) => {
    const box = el("div", "msg " + m.role);
    box.append(el("span", "role", m.role));
    const body = el("div", "content", m.content);
    if (m.error) body.append(el("span", "error", m.error));
    box.append(body);
    const tools = el("span", "tools");
    if (m.role === "user") {
      const edit = el("button", "edit", "edit");
      edit.onclick = () => editTurn(i, box, body);
      tools.append(edit);
    } else if (i === conversation.length - 1) {
      const again = el("button", "regenerate", "regenerate");
      again.onclick = () => { if (!busy) { conversation.pop(); answer(); } };
      tools.append(again);
    }
    box.append(tools);
    log.append(box);
  });
}

function editTurn(i, box, body) {
  if (busy) return;
  const area = el("textarea");
  area.value = conversation[i].content;
  const save = el("button", "save", "save and regenerate");
  save.onclick = () => {
    conversation = conversation.slice(0, i);
    conversation.push({role: "user", content: area.value});
    answer();
  };
  body.replaceChildren(area, save);
  area.focus();
}

async function answer() {
  busy = true;
  $("chat-send").disabled = true;
  conversation.push({role: "assistant", content: ""});
  renderChat();
  const turn = conversation[conversation.length - 1];
  const out = $("chat-log").lastChild.querySelector(".content");
  out.classList.add("streaming");
  const params = {temperature: numberParam("chat-temperature"), top_p: numberParam("chat-top-p"),
                  max_tokens: numberParam("chat-max-tokens"), seed: numberParam("chat-seed")};
  // Failed answers stay on screen (the turn keeps its error) but are not sent back as context.
  const asked = conversation.slice(0, -1).filter((m) => !m.error)
    .map((m) => ({role: m.role, content: m.content}));
  try {
    await streamChat($("chat-model").value, asked, params, (text) => {
      turn.content = text;
      out.textContent = text;
    });
  } catch (e) {
    turn.error = e.message;
  }
  busy = false;
  $("chat-send").disabled = false;
  renderChat();
  $("chat-log").lastChild.querySelector(".content").classList.add("done");
}

function sendChat(ev) {
  ev.preventDefault();
  const text = $("chat-input").value;
  if (busy || !text.trim()) return;
  conversation.push({role: "user", content: text});
  $("chat-input").value = "";
  answer();
}

// ---- compare -----------------------------------------------------------------------------

async function compare(ev) {
  ev.preventDefault();
  const prompt = $("compare-input").value;
  const models = [...document.querySelectorAll("#compare-models input:checked")].map((c) => c.value);
  if (!prompt.trim() || !models.length) return;
  const out = $("compare-out");
  out.replaceChildren();
  const params = {temperature: numberParam("compare-temperature"),
                  max_tokens: numberParam("compare-max-tokens"), seed: numberParam("compare-seed")};
  await Promise.all(models.map(async (model) => {
    const col = el("div", "answer");
    col.append(el("h3", "", model));
    const pre = el("pre", "text");
    col.append(pre);
    out.append(col);
    try {
      await streamChat(model, [{role: "user", content: prompt}], params, (t) => { pre.textContent = t; });
    } catch (e) {
      pre.replaceChildren(el("span", "error", e.message));
    }
    col.classList.add("done");
  }));
}

// ---- label -------------------------------------------------------------------------------

let pair = null;
let labelBusy = false;

function showCounts(t) {
  const c = t.counts;
  let s = `this session: A ${c.A}, B ${c.B}, tie ${c.tie}, skip ${c.skip}; ` +
          `${t.written} preference lines in ${t.file}`;
  if (t.agreement.total) s += `; agreement with the gold labeler ${t.agreement.agree}/${t.agreement.total}`;
  $("label-count").textContent = s;
}

function showPair(p) {
  pair = p;
  $("label-pair").hidden = false;
  $("label-prompt-text").textContent = p.prompt;
  $("label-a").textContent = p.answers[0];
  $("label-b").textContent = p.answers[1];
  $("label-pair").dataset.id = p.id;
}

async function nextPair() {
  if (labelBusy) return;
  labelBusy = true;
  pair = null;  // hidden now, so no key may label it (nor, if no new pair comes, later)
  $("label-pair").hidden = true;
  try {
    showPair(await api("/api/label/pair", {
      source: $("label-source").value, prompt: $("label-prompt").value,
      model: $("label-model").value, temperature: numberParam("label-temperature")}));
  } catch (e) {
    $("label-gold").replaceChildren(el("span", "error", e.message));
  }
  labelBusy = false;
}

async function judge(choice) {
  if (!pair || labelBusy) return;
  labelBusy = true;
  const done = pair;
  pair = null;
  try {
    const r = await api("/api/label", {id: done.id, choice});
    showCounts(r);
    // Shown under the next pair, so it names the pair it is about.
    const about = `previous pair ("${done.prompt.slice(0, 60)}"): `;
    if (r.gold) {
      const g = r.gold;
      $("label-gold").textContent = about + `you said ${choice}; the gold labeler ranks ` +
        `${g.choice} (scores A ${g.scores[0].toFixed(2)}, B ${g.scores[1].toFixed(2)}; ` +
        `reference answer "${g.answer}")`;
    } else {
      $("label-gold").textContent = about + `you said ${choice} (no gold labeler for this prompt)`;
    }
  } catch (e) {
    $("label-gold").replaceChildren(el("span", "error", e.message));
    pair = done;
    labelBusy = false;
    return;
  }
  labelBusy = false;
  await nextPair();
}

async function undo() {
  if (labelBusy) return;
  labelBusy = true;  // a key pressed before the undone pair is back must not label another
  try {
    const r = await api("/api/label/undo", {});
    showCounts(r);
    $("label-gold").textContent = `undid ${r.undone}; label this pair again`;
    showPair(r.pair);
  } catch (e) {
    $("label-gold").replaceChildren(el("span", "error", e.message));
  }
  labelBusy = false;
}

function labelKeys(ev) {
  // Keys typed into a field or a drop-down (which picks an option by its first letter) are
  // theirs, not labels; nor does a held key's auto-repeat label the pairs that follow.
  const t = ev.target;
  if (location.hash !== "#label" || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName) ||
      t.isContentEditable || ev.repeat || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const choice = {a: "A", 1: "A", b: "B", 2: "B", t: "tie", s: "skip"}[ev.key.toLowerCase()];
  if (choice) { ev.preventDefault(); judge(choice); }
  else if (ev.key.toLowerCase() === "u") { ev.preventDefault(); undo(); }
}

// ---- tracker -----------------------------------------------------------------------------

async function loadTracker() {
  const table = $("tracker-table");
  let s;
  try {
    s = await api("/api/tracker");
  } catch (e) {
    $("tracker-info").replaceChildren(el("span", "error", e.message));
    table.replaceChildren();
    return;
  }
  $("tracker-info").textContent = `registry ${s.registry}: ${s.experiments.length} experiments, ` +
    `${s.models.length} models; not yet passed: ${s.not_yet.join(", ") || "none"}`;
  const head = el("tr");
  head.append(el("th", "l", "experiment"), el("th", "", "pass at"));
  for (const m of s.models) head.append(el("th", "", m.name));
  head.append(el("th", "l", "first passing model"));
  table.replaceChildren(head);
  for (const e of s.experiments) {
    const tr = el("tr");
    tr.append(el("td", "l", `${e.name} (${e.metric})`), el("td", "", e.pass_rule));
    for (const m of s.models) {
      const c = e.results[m.name];
      tr.append(c ? el("td", c.passed ? "pass" : "", (c.value === null ? "nan" : c.value.toFixed(2)) + (c.passed ? " pass" : ""))
                  : el("td", "", ""));
    }
    tr.append(el("td", "l", e.first_passing_model || "not yet"));
    table.append(tr);
  }
}

async function drawPlots() {
  const box = $("tracker-images");
  box.replaceChildren(el("p", "", "drawing..."));
  try {
    const r = await api("/api/tracker/report", {});
    box.replaceChildren(...r.plots.map((name) => {
      const img = el("img");
      img.src = "/api/tracker/plot/" + encodeURIComponent(name) + "?t=" + Date.now();
      img.alt = name;
      return img;
    }));
  } catch (e) {
    box.replaceChildren(el("span", "error", e.message));
  }
}

// ---- start -------------------------------------------------------------------------------

async function init() {
  INFO = await api("/api/info");
  for (const sel of document.querySelectorAll(".model-select")) {
    sel.replaceChildren(...INFO.models.map((m) => el("option", "", m)));
  }
  $("compare-models").replaceChildren(...INFO.models.map((m) => {
    const label = el("label");
    const box = el("input");
    box.type = "checkbox";
    box.value = m;
    box.checked = true;
    label.append(box, " " + m);
    return label;
  }));
  $("label-source").replaceChildren(...INFO.label_sources.map((s) => el("option", "", s)));
  $("status").textContent = `${INFO.models.length} model(s): ${INFO.models.join(", ")}`;
  showCounts(INFO);
  $("chat-form").onsubmit = sendChat;
  // Enter sends, except the Enter that confirms an input method's (Chinese, Japanese...) word
  $("chat-input").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) sendChat(e);
  };
  $("chat-clear").onclick = () => { if (!busy) { conversation = []; renderChat(); } };
  $("compare-form").onsubmit = compare;
  $("label-next").onclick = nextPair;
  $("label-undo").onclick = undo;
  for (const b of document.querySelectorAll("[data-choice]")) b.onclick = () => judge(b.dataset.choice);
  document.addEventListener("keydown", labelKeys);
  $("tracker-plots").onclick = drawPlots;
  window.addEventListener("hashchange", show);
  show();
  document.body.dataset.ready = "1";
}

init().catch((e) => { $("status").textContent = "error: " + e.message; });
