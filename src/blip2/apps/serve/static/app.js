// The page: pick / drop / paste an image, caption it, chat about it (streamed), match texts.
// Plain browser JavaScript against the server's own API; no framework, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, name: "", history: [], busy: false };

// --- talking to the server ---
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function explain(status, body) {
  const msg = body && body.error && body.error.message ? body.error.message : `HTTP ${status}`;
  if (status === 429) return "The server is busy right now (its queue is full). Please try again in a moment.";
  if (status === 401) {
    document.querySelector(".settings").open = true;
    return "This server needs an API key: enter it under “API key” below.";
  }
  if (status === 413) return "That image is too large for this server.";
  if (status === 504) return "The request took too long and was cancelled. Try a shorter answer.";
  return msg;
}

async function post(path, payload) {
  let r;
  try {
    r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(payload) });
  } catch (e) {
    throw new Error("Cannot reach the server. Is it still running?");
  }
  const body = await r.json().catch(() => null);
  if (!r.ok) throw new Error(explain(r.status, body));
  return body;
}

// Server-Sent Events over fetch: calls onDelta(text) per content chunk.
async function stream(path, payload, onDelta) {
  let r;
  try {
    r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify({ ...payload, stream: true }) });
  } catch (e) {
    throw new Error("Cannot reach the server. Is it still running?");
  }
  if (!r.ok) throw new Error(explain(r.status, await r.json().catch(() => null)));
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(explain(0, obj));
        for (const c of obj.choices || []) if (c.delta && c.delta.content) onDelta(c.delta.content);
      }
    }
  }
}

// --- messages ---
function showError(text) {
  const b = $("banner");
  b.innerHTML = "";
  const span = document.createElement("span");
  span.textContent = text;
  const close = document.createElement("button");
  close.textContent = "×";
  close.setAttribute("aria-label", "dismiss");
  close.onclick = () => { b.hidden = true; };
  b.append(span, close);
  b.hidden = false;
}
function clearError() { $("banner").hidden = true; }

function setBusy(btn, on) {
  btn.classList.toggle("busy", on);
  btn.disabled = on || !state.image;
}

// --- the image ---
function useFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError(`“${file.name}” is not an image. Choose a PNG, JPEG, WebP or GIF file.`);
    return;
  }
  const fr = new FileReader();
  fr.onload = () => {
    const probe = new Image();
    probe.onload = () => setImage(fr.result, file.name || "pasted image");
    probe.onerror = () => showError(`“${file.name}” could not be read as an image (it may be damaged).`);
    probe.src = fr.result;
  };
  fr.onerror = () => showError(`Could not read “${file.name}”.`);
  fr.readAsDataURL(file);
}

function setImage(dataUrl, name) {
  clearError();
  state.image = dataUrl;
  state.name = name;
  state.history = [];
  $("preview").src = dataUrl;
  $("preview").hidden = false;
  $("drop-hint").hidden = true;
  $("drop").classList.add("has-image");
  $("image-name").textContent = name;
  $("caption").textContent = "";
  $("match-results").innerHTML = "";
  resetChat();
  for (const id of ["caption-btn", "chat-send", "match-btn"]) $(id).disabled = false;
}

const drop = $("drop");
$("file").addEventListener("change", (e) => useFile(e.target.files[0]));
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); useFile(e.dataTransfer.files[0]); });
document.addEventListener("paste", (e) => {
  const item = [...(e.clipboardData || {}).items || []].find((it) => it.kind === "file");
  if (item) useFile(item.getAsFile());
});

// --- caption ---
$("cap-mode").addEventListener("change", () => {
  const m = $("cap-mode").value;
  $("beams-l").hidden = m !== "beam";
  $("temp-l").hidden = m !== "sample";
});

$("caption-btn").addEventListener("click", async () => {
  const btn = $("caption-btn");
  const mode = $("cap-mode").value;
  const payload = { images: [state.image], max_tokens: Number($("cap-max").value) || 30 };
  if (mode === "beam") payload.num_beams = Number($("cap-beams").value) || 3;
  if (mode === "sample") payload.temperature = Number($("cap-temp").value) || 0.8;
  setBusy(btn, true);
  clearError();
  try {
    const r = await post("/v1/captions", payload);
    $("caption").textContent = r.data[0].captions[0] || "(no caption)";
  } catch (e) {
    showError(e.message);
  } finally {
    setBusy(btn, false);
  }
});

// --- chat ---
function resetChat() {
  state.history = [];
  $("chat-log").innerHTML = '<p class="muted empty">Questions and answers appear here. The conversation is kept, so you can follow up.</p>';
}
function bubble(role, text) {
  const log = $("chat-log");
  const empty = log.querySelector(".empty");
  if (empty) empty.remove();
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  log.append(div);
  log.scrollTop = log.scrollHeight;
  return div;
}
$("chat-clear").addEventListener("click", resetChat);

$("chat-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = $("chat-input");
  const q = input.value.trim();
  if (!q || !state.image || state.busy) return;
  input.value = "";
  clearError();
  bubble("user", q);
  const messages = state.history.map((m, i) => (i === 0
    ? { role: "user", content: [{ type: "image_url", image_url: { url: state.image } }, { type: "text", text: m.content }] }
    : m));
  const first = messages.length === 0;
  messages.push(first
    ? { role: "user", content: [{ type: "image_url", image_url: { url: state.image } }, { type: "text", text: q }] }
    : { role: "user", content: q });
  const out = bubble("assistant streaming", "");
  const btn = $("chat-send");
  state.busy = true;
  setBusy(btn, true);
  let answer = "";
  try {
    await stream("/v1/chat/completions", { messages, max_tokens: 40 }, (d) => {
      answer += d;
      out.textContent = answer;
      $("chat-log").scrollTop = $("chat-log").scrollHeight;
    });
    if (!answer) out.textContent = "(no answer)";
    state.history.push({ role: "user", content: q }, { role: "assistant", content: answer });
  } catch (err) {
    out.remove();
    bubble("error", err.message);
  } finally {
    out.classList.remove("streaming");
    state.busy = false;
    setBusy(btn, false);
    input.focus();
  }
});

// --- match ---
$("match-btn").addEventListener("click", async () => {
  const texts = $("match-texts").value.split("\n").map((t) => t.trim()).filter(Boolean);
  if (!texts.length) { showError("Write at least one text to match, one per line."); return; }
  const btn = $("match-btn");
  setBusy(btn, true);
  clearError();
  try {
    const r = await post("/v1/match", { images: [state.image], texts });
    const rows = r.data.slice().sort((a, b) => b.itm - a.itm);
    const ol = $("match-results");
    ol.innerHTML = "";
    rows.forEach((row, i) => {
      const li = document.createElement("li");
      if (i === 0) li.className = "best";
      const t = document.createElement("span");
      t.className = "text";
      t.textContent = row.text;
      const s = document.createElement("span");
      s.className = "score";
      s.textContent = `match ${(100 * row.itm).toFixed(1)}% · sim ${row.itc.toFixed(3)}`;
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = `${Math.max(1, 100 * row.itm).toFixed(1)}%`;
      bar.append(fill);
      li.append(t, s, bar);
      ol.append(li);
    });
  } catch (e) {
    showError(e.message);
  } finally {
    setBusy(btn, false);
  }
});

// --- status ---
$("api-key").value = localStorage.getItem("blip2-api-key") || "";
$("api-key").addEventListener("change", () => localStorage.setItem("blip2-api-key", $("api-key").value.trim()));

async function status() {
  const el = $("status");
  try {
    const h = await (await fetch("/health")).json();
    const models = await fetch("/v1/models", { headers: headers() }).then((r) => (r.ok ? r.json() : null)).catch(() => null);
    const name = models && models.data.length ? models.data[0].id : "model";
    el.className = "status ok";
    $("status-text").textContent = `${name} · ${h.running} running · ${h.queue} waiting`;
  } catch (e) {
    el.className = "status down";
    $("status-text").textContent = "server unreachable";
  }
}
status();
setInterval(status, 5000);
