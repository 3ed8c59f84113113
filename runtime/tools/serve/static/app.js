// ddpm-rt serve's page: one streaming request at a time, previews as they come, results kept.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null; // the running request's AbortController: Cancel closes the stream
let info = null;

function token() {
  const t = $("token").value || sessionStorage.getItem("ddpm-rt-token") || "";
  if (t) sessionStorage.setItem("ddpm-rt-token", t);
  return t;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const t = token();
  if (t) h.Authorization = "Bearer " + t;
  return h;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function image(b64, alt) {
  const img = document.createElement("img");
  img.className = "px";
  img.src = "data:image/png;base64," + b64;
  img.alt = alt;
  return img;
}

async function loadInfo() {
  const health = await (await fetch("/api/health")).json();
  if (health.auth) $("token-box").hidden = false;
  const r = await fetch("/api/info", { headers: headers() });
  if (!r.ok) {
    setStatus(r.status === 401 ? "enter this server's token" : "cannot read the model's info", true);
    return;
  }
  info = await r.json();
  const sel = $("sampler");
  sel.replaceChildren();
  for (const s of info.samplers) {
    const o = document.createElement("option");
    o.value = o.textContent = s;
    if (s === info.defaults.sampler) o.selected = true;
    sel.appendChild(o);
  }
  $("guidance").value = info.defaults.guidance;
  const size = $("size");  // a cascade also gives its base picture: offer both
  size.replaceChildren();
  for (const s of info.sizes || []) {
    const o = document.createElement("option");
    o.value = s;
    o.textContent = `${s}x${s}`;
    size.appendChild(o);
  }
  $("size-label").hidden = (info.sizes || []).length < 2;
  $("num").max = info.limits.max_images;
  $("steps").max = info.limits.max_steps;
  stepsPlaceholder();
  const im = info.image;
  $("model").textContent = `model ${info.bundle_digest.slice(0, 12)} · ${im.width}x${im.height} · ` +
    `U-Net ${info.precisions.unet} · ${info.backend}`;
}

function stepsPlaceholder() {
  const d = info && info.defaults.steps[$("sampler").value];
  $("steps").placeholder = d ? `default ${d}` : "needed";
}

function body() {
  const b = { prompt: $("prompt").value, num: Number($("num").value || 1) };
  const neg = $("negative_prompt").value;
  if (neg) b.negative_prompt = neg;
  if ($("seed").value !== "") b.seed = Number($("seed").value);
  if ($("sampler").value) b.sampler = $("sampler").value;
  if ($("steps").value !== "") b.steps = Number($("steps").value);
  if ($("guidance").value !== "") b.guidance = Number($("guidance").value);
  if (!$("size-label").hidden && $("size").value) b.size = Number($("size").value);
  return b;
}

function showPreview(msg) {
  const box = $("preview");
  msg.previews.forEach((p, k) => {
    const i = msg.first_image + k;
    let img = box.children[i];
    if (!img) {
      img = image(p, `preview of image ${i + 1}`);
      box.appendChild(img);
    } else {
      img.src = "data:image/png;base64," + p;
    }
  });
}

function showResult(result) {
  const s = result.settings;
  const grid = $("results");
  for (const im of [...result.images].reverse()) {
    const fig = document.createElement("figure");
    fig.className = "result";
    const img = image(im.b64_png, im.prompt);
    img.dataset.seed = s.seed;
    img.dataset.index = im.image_index;
    fig.appendChild(img);
    const cap = document.createElement("figcaption");
    const text = `"${im.prompt}" · seed ${s.seed} #${im.image_index} · ${s.sampler} ` +
      `${s.steps} steps · guidance ${s.guidance}` +
      (s.negative_prompt ? ` · not "${s.negative_prompt}"` : "");
    cap.appendChild(document.createTextNode(text));
    cap.appendChild(document.createElement("br"));
    const a = document.createElement("a");
    a.href = img.src;
    a.download = `ddpm-rt-${s.seed}-${im.image_index}.png`;
    a.textContent = "download";
    cap.appendChild(a);
    fig.appendChild(cap);
    grid.prepend(fig);
  }
}

// Server-sent events over a POST: fetch's body stream, split into "event:/data:" blocks.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      onEvent(event, data ? JSON.parse(data) : null);
    }
  }
}

async function generate(ev) {
  ev.preventDefault();
  if (controller) return;
  controller = new AbortController();
  if (!info) await loadInfo().catch(() => {}); // e.g. the token was just typed in
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("preview").replaceChildren();
  $("progress").value = 0;
  setStatus("queued…");
  try {
    const r = await fetch("/api/generate/stream", {
      method: "POST", headers: headers(), body: JSON.stringify(body()), signal: controller.signal,
    });
    if (!r.ok) {
      const e = await r.json().catch(() => ({ error: { message: r.statusText } }));
      if (r.status === 401) $("token-box").hidden = false;
      setStatus(`error: ${e.error.message}`, true);
      return;
    }
    await readEvents(r, (event, msg) => {
      if (event === "queued") setStatus(`seed ${msg.seed}: waiting…`);
      else if (event === "progress") {
        $("progress").value = msg.step / msg.total;
        setStatus(`step ${msg.step} of ${msg.total}`);
        if (msg.previews) showPreview(msg);
      } else if (event === "done") {
        $("progress").value = 1;
        setStatus(`done · seed ${msg.seed}`);
        if (msg.seed_was_random) $("seed").placeholder = `random (last: ${msg.seed})`;
        showResult(msg);
      } else if (event === "error") setStatus(`error: ${msg.error.message}`, true);
    });
  } catch (e) {
    if (e.name === "AbortError") setStatus("cancelled");
    else setStatus(`error: ${e.message}`, true);
  } finally {
    controller = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", () => controller && controller.abort());
  $("sampler").addEventListener("change", stepsPlaceholder);
  $("token").addEventListener("change", loadInfo);
  loadInfo().catch((e) => setStatus(`error: ${e.message}`, true));
});
