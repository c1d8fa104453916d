"use strict";
// The sdxl-trt playground: builds its form from the service's own endpoints (/info, /sdapi/v1/samplers,
// schedulers, loras, /controlnet/model_list and module_list), generates with AUTOMATIC1111's
// /sdapi/v1/txt2img while polling /sdapi/v1/progress, and shows each result with the time the service measured.
//
// Rules (keep them): text from the server or the user is set with textContent, never parsed as HTML; no inline
// script or style (the page's Content-Security-Policy forbids both); the only secret is the API key, kept in
// this tab's sessionStorage and sent as a bearer token; errors are shown as the server words them, and the form
// is never reset.

const KEY_STORE = "sdxl-trt.api-key";
const POLL_MS = 150;
const STAGES = [  // info.timings keys -> labels, in pipeline order
  ["queue_wait", "Queue wait"], ["lora_switch", "LoRA switch"], ["text_encoders", "Text encoders"],
  ["vae_encode", "VAE encode"], ["denoise", "Denoising"], ["refiner", "Refiner"], ["vae_decode", "VAE decode"],
];

const $ = (id) => document.getElementById(id);
const engine = { info: null, loaded: false };
let lastSeed = null;
let busy = false;

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);  // strings become text nodes
  return node;
}

class ApiError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

// Integers beyond 2**53 (64-bit seeds) are kept exact as BigInt, from their source text.
function parseJson(text) {
  return JSON.parse(text, (key, value, context) =>
    typeof value === "number" && !Number.isSafeInteger(value) && context && /^-?\d+$/.test(context.source)
      ? BigInt(context.source) : value);
}

function serverMessage(data, text, response) {
  if (data && typeof data === "object") {
    if (typeof data.detail === "string") return data.detail;  // A1111's shape and the plain one
    if (data.error && typeof data.error.message === "string") return data.error.message;  // OpenAI's shape
  }
  return text || response.statusText;
}

async function call(method, path, body) {
  const headers = {};
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, `the server did not answer (${e.message})`);
  }
  const text = await response.text();
  let data = null;
  try { data = text ? parseJson(text) : null; } catch { data = null; }
  if (!response.ok) {
    throw new ApiError(response.status, serverMessage(data, text, response), response.headers.get("Retry-After"));
  }
  return data;
}

// ------------------------------------------------------------------ errors and auth
function showError(error) {
  const box = $("error");
  let text = error.status ? `HTTP ${error.status}: ${error.message}` : error.message;
  if (error.status === 429 && error.retryAfter) text += ` (Retry-After: ${error.retryAfter} s)`;
  box.textContent = text;
  box.hidden = false;
  if (error.status === 401) askForKey();
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function askForKey() {
  $("auth").hidden = false;
  $("api-key").focus();
}

function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  $("api-key").value = "";
  hideError();
  if (!engine.loaded) load();
  else $("auth").hidden = true;
}

// ------------------------------------------------------------------ the form, from the engines' facts
function fill(select, items, selected) {
  select.replaceChildren(...items.map(([value, label]) => el("option", { value, text: label })));
  if (selected !== undefined && items.some(([value]) => value === selected)) select.value = selected;
}

async function load() {
  $("facts").textContent = "connecting…";
  let info;
  try {
    info = await call("GET", "/info");
  } catch (e) {
    $("facts").textContent = "not connected";
    if (e.status === 503) setTimeout(load, 2000);
    showError(e);
    return;
  }
  try {
    const [samplers, schedules, loras] = await Promise.all([
      call("GET", "/sdapi/v1/samplers"), call("GET", "/sdapi/v1/schedulers"), call("GET", "/sdapi/v1/loras")]);
    buildForm(info, samplers, schedules, loras);
    if (info.controlnets.length) {
      const [models, modules] = await Promise.all([
        call("GET", "/controlnet/model_list"), call("GET", "/controlnet/module_list")]);
      fill($("cn-model"), models.model_list.map((n) => [n, n]));
      fill($("cn-module"), modules.module_list.map((n) => [n, n]), "none");
      $("controlnet").hidden = false;
    }
  } catch (e) {
    showError(e);
    return;
  }
  engine.info = info;
  engine.loaded = true;
  $("auth").hidden = true;
  hideError();
  $("generate").disabled = false;
}

function buildForm(info, samplers, schedules, loras) {
  const model = info.model ? info.model.name : "engines";
  $("facts").textContent = `${model} · ${info.backend} on ${info.device} · ${info.precision} · ` +
    `max ${info.max_images} images, ${info.max_steps} steps`;
  fill($("size"), info.buckets.map((b) => [b, b.replace("x", " × ")]));
  if (!$("steps").value) $("steps").value = String(Math.min(30, info.max_steps));
  fill($("sampler_name"), samplers.map((s) => [s.name, s.name]), info.default_sampler);
  fill($("scheduler"), schedules.map((s) => [s.name, s.label]), "automatic");

  $("lora-list").replaceChildren(...loras.map((lora, i) => el("div", { class: "lora" },
    el("label", {}, el("input", { type: "checkbox", id: `lora-${i}`, "data-name": lora.name }), ` ${lora.name}`),
    el("input", { type: "number", id: `lora-weight-${i}`, step: "0.05", value: "1", "aria-label": `${lora.name} weight` }))));
  $("loras").hidden = loras.length === 0;

  const branches = Array.isArray(info.cache_branches) ? info.cache_branches : [];  // missing: no step caching
  fill($("cache_branch"), branches.map((b) => [String(b), String(b)]));
  $("cache").hidden = branches.length === 0;

  $("refiner").hidden = !info.refiner;
  if (info.refiner) $("refiner-name").textContent = info.refiner.title;
}

// ------------------------------------------------------------------ the request
function number(id) {  // "" (empty or not a number) leaves the field out: the server's default applies
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function seedValue() {  // exact for any 64-bit seed: a number where JSON keeps it exact, else its digits
  const text = $("seed").value.trim();
  if (text === "") return -1;
  if (/^-?\d+$/.test(text) && Number.isSafeInteger(Number(text))) return Number(text);
  return text;  // the server parses the digits, or names the field
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new ApiError(0, `cannot read ${file.name}: ${reader.error}`));
    reader.readAsDataURL(file);
  });
}

async function requestBody() {
  const [width, height] = $("size").value.split("x").map(Number);
  let prompt = $("prompt").value;
  const loras = [];
  for (const box of document.querySelectorAll("#lora-list input[type=checkbox]")) {
    if (!box.checked) continue;
    const weight = $(box.id.replace("lora-", "lora-weight-")).value.trim() || "1";
    loras.push(`<lora:${box.dataset.name}:${weight}>`);  // A1111's prompt syntax; the server takes the tags out
  }
  if (loras.length) prompt = `${prompt} ${loras.join(" ")}`;
  const body = {
    prompt, negative_prompt: $("negative_prompt").value, width, height, steps: number("steps"),
    cfg_scale: number("cfg_scale"), sampler_name: $("sampler_name").value, scheduler: $("scheduler").value,
    seed: seedValue(), batch_size: number("batch_size"), n_iter: 1,
  };
  if (!$("refiner").hidden && $("refiner-enabled").checked) {
    body.refiner_checkpoint = engine.info.refiner.title;
    body.refiner_switch_at = number("refiner_switch_at");
  }
  if (!$("cache").hidden) {
    body.cache_interval = number("cache_interval");
    body.cache_branch = Number($("cache_branch").value);
  }
  if (!$("controlnet").hidden && $("cn-enabled").checked) {
    const file = $("cn-image").files[0];
    if (!file) throw new ApiError(0, "choose a control image, or switch ControlNet off");
    body.alwayson_scripts = { controlnet: { args: [{
      enabled: true, image: await readFile(file), model: $("cn-model").value, module: $("cn-module").value,
      weight: number("cn-weight"), guidance_start: number("cn-start"), guidance_end: number("cn-end"),
      control_mode: Number($("cn-mode").value),
    }] } };
  }
  for (const [name, value] of Object.entries(body)) if (value === undefined) delete body[name];
  return body;
}

// ------------------------------------------------------------------ progress
function watchProgress() {
  const bar = $("progress");
  const text = $("progress-text");
  let running = true;
  let timer = null;
  bar.value = 0;
  text.textContent = "sending…";
  const tick = async () => {
    try {
      const p = await call("GET", "/sdapi/v1/progress");
      if (!running) return;
      if (p.state.sampling_steps > 0) {
        bar.value = p.progress;
        text.textContent = `step ${p.state.sampling_step} of ${p.state.sampling_steps}` +
          (p.eta_relative > 0 ? `, ${p.eta_relative.toFixed(1)} s left` : "");
      } else if (p.state.job_count > 0) {
        text.textContent = "in the queue";
      }
    } catch {
      // progress is best effort: the generation's own answer reports any error
    }
    if (running) timer = setTimeout(tick, POLL_MS);
  };
  tick();
  return (done) => {
    running = false;
    clearTimeout(timer);
    if (done) bar.value = 1;
    text.textContent = done ? "done" : "";
  };
}

// ------------------------------------------------------------------ results
function pngBlob(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

function ms(seconds) {
  return `${(seconds * 1000).toFixed(1)} ms`;
}

function timingRows(info, roundTripMs) {
  const t = info.timings || {};
  const steps = info.steps_run || {};
  const rows = [];
  for (const [key, label] of STAGES) {
    if (!(key in t) || (t[key] === 0 && key !== "queue_wait")) continue;
    let detail = "";
    if (key === "denoise" && steps.unet) detail = `${steps.unet} steps, ${ms(t.denoise / steps.unet)}/step`;
    if (key === "refiner" && steps.refiner) detail = `${steps.refiner} steps, ${ms(t.refiner / steps.refiner)}/step`;
    rows.push([label, ms(t[key]), detail]);
  }
  const total = Object.values(t).reduce((a, b) => a + b, 0);
  rows.push(["Service total", ms(total), "the stages above"]);
  rows.push(["Round trip", `${roundTripMs.toFixed(1)} ms`, "this page: send, wait, receive"]);
  return rows;
}

function showResult(data, body, roundTripMs) {
  const info = parseJson(data.info);
  const seeds = info.all_seeds || [];
  const figures = data.images.map((b64, i) => {
    const url = URL.createObjectURL(pngBlob(b64));
    const seed = String(seeds[i] ?? "");
    return el("figure", {},
      el("img", { src: url, alt: `image ${i + 1}, seed ${seed}`, class: "generated", "data-seed": seed }),
      el("figcaption", {}, `seed ${seed} · `,
        el("a", { href: url, download: `sdxl-trt-${seed}.png`, class: "download", text: "PNG" })));
  });
  const params = [
    ["Prompt", info.prompt], ["Negative", info.negative_prompt || "—"], ["Size", `${info.width} × ${info.height}`],
    ["Steps", String(info.steps)], ["Sampler", `${info.sampler_name} · ${info.scheduler}`],
    ["Guidance", String(info.cfg_scale)], ["Seeds", seeds.map(String).join(", ")],
  ];
  if (body.refiner_checkpoint) params.push(["Refiner", `${body.refiner_checkpoint} from ${body.refiner_switch_at}`]);
  for (const [name, value] of Object.entries(info.extra_generation_params || {})) params.push([name, String(value)]);
  const table = el("table", { class: "timings" }, el("caption", { text: "where the time went" }),
    ...timingRows(info, roundTripMs).map(([a, b, c]) =>
      el("tr", {}, el("th", { text: a }), el("td", { text: b }), el("td", { class: "detail", text: c }))));
  const card = el("article", { class: "result" },
    el("div", { class: "images" }, ...figures),
    el("div", { class: "about" },
      el("dl", {}, ...params.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })])),
      table,
      el("p", { class: "engine", text: `${info.backend || engine.info.backend} on ${engine.info.device} · ${info.version}` })));
  $("results").prepend(card);
  if (seeds.length) {
    lastSeed = String(seeds[0]);
    $("seed-reuse").disabled = false;
    $("seed-reuse").title = `use seed ${lastSeed}`;
  }
}

async function generate(event) {
  event.preventDefault();
  if (busy || !engine.loaded) return;
  hideError();
  busy = true;
  $("generate").disabled = true;
  let stop = null;
  try {
    const body = await requestBody();
    stop = watchProgress();
    const started = performance.now();
    const data = await call("POST", "/sdapi/v1/txt2img", body);
    stop(true);
    showResult(data, body, performance.now() - started);
  } catch (e) {
    if (stop) stop(false);
    showError(e);
  } finally {
    busy = false;
    $("generate").disabled = false;
  }
}

function previewControlImage() {
  const file = $("cn-image").files[0];
  const img = $("cn-preview");
  img.hidden = !file;
  if (file) img.src = URL.createObjectURL(file);
}

document.addEventListener("DOMContentLoaded", () => {
  $("gen-form").addEventListener("submit", generate);
  $("auth-form").addEventListener("submit", useKey);
  $("seed-random").addEventListener("click", () => { $("seed").value = "-1"; });
  $("seed-reuse").addEventListener("click", () => { if (lastSeed !== null) $("seed").value = lastSeed; });
  $("cn-image").addEventListener("change", previewControlImage);
  load();
});
