// seal-agent's page: what it changes goes through the API's own routes, with the
// page's anti-forgery token (the login cookie alone is not enough for a change).
"use strict";

const csrf = document.querySelector('meta[name="csrf"]').content;
const model = document.querySelector('meta[name="model"]').content;

async function api(method, url, body) {
  const res = await fetch(url, {
    method, credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-Seal-CSRF": csrf},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error((data.error && data.error.message) || `${res.status} ${res.statusText}`);
  return data;
}

// The sections marked data-refresh, replaced by the server's current rendering.
async function refresh() {
  const res = await fetch(location.href, {credentials: "same-origin"});
  if (!res.ok) return;
  const fresh = new DOMParser().parseFromString(await res.text(), "text/html");
  for (const el of document.querySelectorAll("[data-refresh]")) {
    const other = fresh.getElementById(el.id);
    if (other) el.replaceWith(other);
  }
  const live = fresh.getElementById("live-version");
  if (live) document.getElementById("live-version").textContent = live.textContent;
  wire();
}

function schedule() {  // often while something is queued or learning, seldom otherwise
  const busy = document.querySelector("[data-active]") !== null;
  setTimeout(() => refresh().finally(schedule), busy ? 1500 : 10000);
}

function wire() {
  for (const b of document.querySelectorAll("button.pause")) {
    b.onclick = async () => {
      b.disabled = true;
      try {
        await api("POST", `/v1/schedules/${encodeURIComponent(b.dataset.name)}`, {paused: b.dataset.paused !== "true"});
        await refresh();
      } catch (e) { alert(e.message); b.disabled = false; }
    };
  }
}

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

async function upload(file) {
  const out = document.getElementById("upload-result");
  out.textContent = `sending ${file.name} ...`;
  try {
    const job = await api("POST", "/v1/documents", {filename: file.name, content_base64: toBase64(await file.arrayBuffer())});
    out.textContent = job.state === "rejected" ? `${file.name}: rejected: ${job.error}` : `${file.name}: job ${job.id}, ${job.state}`;
    await refresh();
  } catch (e) { out.textContent = `${file.name}: ${e.message}`; }
}

async function ask(question) {
  const box = document.getElementById("answer");
  const text = document.getElementById("answer-text");
  const meta = document.getElementById("answer-meta");
  box.hidden = false;
  text.textContent = "...";
  meta.textContent = "";
  try {
    const a = await api("POST", "/v1/chat/completions", {model, messages: [{role: "user", content: question}]});
    text.textContent = a.choices[0].message.content;
    const modules = (a.seal_modules || []).map((m) => `m${m.module}${m.document ? " (" + m.document.split("/").pop() + ")" : ""}`).join(", ");
    meta.textContent = `version ${a.system_fingerprint.replace("seal-v", "")}` + (modules ? ` · modules ${modules}` : " · no module");
  } catch (e) { text.textContent = e.message; }
}

async function askAgain(button) {
  const out = document.getElementById("check-result");
  button.disabled = true;
  try {
    let job = await api("POST", `/v1/documents/${button.dataset.document}/check`);
    out.textContent = `job ${job.id}: ${job.state} ...`;
    while (job.state === "queued" || job.state === "learning") {
      await new Promise((r) => setTimeout(r, 1000));
      job = await api("GET", `/v1/jobs/${job.id}`);
    }
    if (job.state !== "done") throw new Error(job.error || job.state);
    const r = job.result;
    out.textContent = `version ${r.version}: ${r.n ? Math.round(100 * r.accuracy) + "% of " + r.n : "no"} questions right`;
    const answers = document.getElementById("check-answers");
    if (answers) {
      answers.replaceChildren(...(r.questions || []).map((q) => {
        const p = document.createElement("p");
        p.textContent = `${q.correct ? "✓" : "✗"} ${q.question} → ${q.prediction} (gold: ${q.answer})`;
        return p;
      }));
    }
  } catch (e) { out.textContent = e.message; }
  button.disabled = false;
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("ask-form");
  if (form) form.onsubmit = (e) => { e.preventDefault(); ask(document.getElementById("question").value); };
  const file = document.getElementById("file");
  if (file) file.onchange = () => { if (file.files[0]) upload(file.files[0]); };
  const drop = document.getElementById("drop");
  if (drop) {
    drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
    drop.ondragleave = () => drop.classList.remove("over");
    drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]); };
  }
  const again = document.getElementById("ask-again");
  if (again) again.onclick = () => askAgain(again);
  wire();
  if (document.querySelector("[data-refresh]")) schedule();
});
