// ddpm-rt serve's page: one streaming request at a time, previews as they come, results kept.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null; // the running request's AbortController: Cancel closes the stream
let info = null;
let picture = null; // the picture to start from, as a data: URL (sent as base64)
let painted = false; // whether the mask holds any stroke
const FORMATS = ["image/png", "image/jpeg", "image/webp"];
const MAX_SIDE = 1024; // a picture the server would refuse is re-encoded on this device

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
  // a guidance-distilled U-Net makes no unconditional pass: no negative prompt to give it
  const distilled = info.precisions.unet_distilled;
  $("negative-label").hidden = Boolean(distilled && distilled.guidance);
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
  if (neg && !$("negative-label").hidden) b.negative_prompt = neg;
  if ($("seed").value !== "") b.seed = Number($("seed").value);
  if ($("sampler").value) b.sampler = $("sampler").value;
  if ($("steps").value !== "") b.steps = Number($("steps").value);
  if ($("guidance").value !== "") b.guidance = Number($("guidance").value);
  if (!$("size-label").hidden && $("size").value) b.size = Number($("size").value);
  if (picture) {
    b.init_image = picture;
    b.strength = Number($("strength").value);
    if (painted) b.mask = maskPNG();
  }
  return b;
}

// -- the picture to start from, and its mask ---------------------------------------------

function usePicture(url) {
  picture = url;
  $("picture-img").src = url;
  $("picture-tools").hidden = false;
  clearMask();
}

function removePicture() {
  picture = null;
  $("picture").value = "";
  $("picture-tools").hidden = true;
  clearMask();
}

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(blob);
  });
}

// A file as the server takes it: PNG, JPEG or WebP within its limit are sent as they are;
// anything else this browser can show (or a file over the limit) as a PNG of at most
// MAX_SIDE pixels a side.
async function pictureFile(file) {
  const limit = info ? info.limits.max_image_bytes : Infinity;
  if (FORMATS.includes(file.type) && file.size <= limit) return readAsDataURL(file);
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    throw new Error(`cannot read ${file.name} as a picture (PNG, JPEG or WebP)`);
  }
  const k = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
  const c = document.createElement("canvas");
  c.width = Math.max(1, Math.round(bitmap.width * k));
  c.height = Math.max(1, Math.round(bitmap.height * k));
  c.getContext("2d").drawImage(bitmap, 0, 0, c.width, c.height);
  return c.toDataURL("image/png");
}

async function takeFile(file) {
  if (!file) return;
  try {
    usePicture(await pictureFile(file));
    setStatus(`picture: ${file.name}`);
  } catch (e) {
    setStatus(`error: ${e.message}`, true);
  }
}

function clearMask() {
  const c = $("mask");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  painted = false;
}

// The mask as the server reads it: white (repaint) strokes on black (keep).
function maskPNG() {
  const src = $("mask");
  const c = document.createElement("canvas");
  c.width = src.width;
  c.height = src.height;
  const g = c.getContext("2d");
  g.fillStyle = "#000";
  g.fillRect(0, 0, c.width, c.height);
  g.drawImage(src, 0, 0);
  return c.toDataURL("image/png");
}

function setupPainting() {
  const c = $("mask");
  const g = c.getContext("2d");
  let last = null;
  const at = (e) => {
    const r = c.getBoundingClientRect();
    return [(e.clientX - r.left) * c.width / r.width, (e.clientY - r.top) * c.height / r.height];
  };
  const stroke = (from, to) => {
    const r = c.getBoundingClientRect();
    g.strokeStyle = g.fillStyle = "#fff";
    g.lineCap = g.lineJoin = "round";
    g.lineWidth = Number($("brush").value) * c.width / Math.max(1, r.width);
    g.beginPath();
    g.moveTo(...from);
    g.lineTo(...to);
    g.stroke();
    painted = true;
  };
  c.addEventListener("pointerdown", (e) => {
    e.preventDefault();
    c.setPointerCapture(e.pointerId);
    last = at(e);
    stroke(last, last);
  });
  c.addEventListener("pointermove", (e) => {
    if (!last) return;
    const p = at(e);
    stroke(last, p);
    last = p;
  });
  const end = () => { last = null; };
  c.addEventListener("pointerup", end);
  c.addEventListener("pointercancel", end);
}

function setupDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    takeFile(e.dataTransfer.files[0]);
  });
  $("picture").addEventListener("change", (e) => takeFile(e.target.files[0]));
}

// A result as the next picture: its PNG, as the server sent it.
function useResult(img) {
  usePicture(img.src);
  setStatus("picture: a result");
  $("picture-set").scrollIntoView({ block: "nearest" });
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
    img.title = "use as the next picture";
    img.addEventListener("click", () => useResult(img));
    fig.appendChild(img);
    const cap = document.createElement("figcaption");
    const text = `"${im.prompt}" · seed ${s.seed} #${im.image_index} · ${s.sampler} ` +
      `${s.steps} steps · guidance ${s.guidance}` +
      (s.negative_prompt ? ` · not "${s.negative_prompt}"` : "") +
      (s.strength != null ? ` · strength ${s.strength}` : "") +
      (s.mask_sha256 ? " · inpainted" : "");
    cap.appendChild(document.createTextNode(text));
    cap.appendChild(document.createElement("br"));
    const a = document.createElement("a");
    a.href = img.src;
    a.download = `ddpm-rt-${s.seed}-${im.image_index}.png`;
    a.textContent = "download";
    cap.appendChild(a);
    const use = document.createElement("button");
    use.type = "button";
    use.className = "use";
    use.textContent = "use as input";
    use.addEventListener("click", () => useResult(img));
    cap.appendChild(use);
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
  $("strength").addEventListener("input", () => { $("strength-out").value = $("strength").value; });
  $("clear-mask").addEventListener("click", clearMask);
  $("remove-picture").addEventListener("click", removePicture);
  setupDrop();
  setupPainting();
  loadInfo().catch((e) => setStatus(`error: ${e.message}`, true));
});
