// The batch form: a model from GET /models, prompts one per line, optional file names,
// parameters as a JSON object or key=value lines; sent as POST /jobs.
import { api, describe, el, initChrome, jobPath, requireKey, setText, showBanner, showMessage } from "./common.js";

const form = document.getElementById("batch-form");
const select = document.getElementById("model");
const submit = document.getElementById("submit");
const OWN_FIELDS = new Set(["model_name", "prompt", "prompts", "custom_filename", "custom_filenames", "webhook"]);
let models = [];
let pending = { body: null, key: null };

class FormProblem extends Error {}

function lines(id) {
  // One entry per non-blank line, as typed (a trailing \r from pasted text dropped).
  return document.getElementById(id).value.split("\n").map((line) => line.replace(/\r$/, ""))
    .filter((line) => line.trim() !== "");
}

function valueOf(raw) {
  try {
    return JSON.parse(raw);
  } catch (error) {
    return raw;
  }
}

export function parseParams(text) {
  const trimmed = text.trim();
  if (!trimmed) {
    return {};
  }
  if (trimmed.startsWith("{")) {
    let parsed;
    try {
      parsed = JSON.parse(trimmed);
    } catch (error) {
      throw new FormProblem(`Parameters: not valid JSON (${error.message})`);
    }
    if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
      throw new FormProblem("Parameters: a JSON object is required");
    }
    return parsed;
  }
  const params = {};
  trimmed.split("\n").forEach((line, index) => {
    const entry = line.trim();
    if (!entry || entry.startsWith("#")) {
      return;
    }
    const at = entry.indexOf("=");
    if (at <= 0) {
      throw new FormProblem(`Parameters, line ${index + 1}: expected key=value`);
    }
    const key = entry.slice(0, at).trim();
    if (Object.hasOwn(params, key)) {
      throw new FormProblem(`Parameters, line ${index + 1}: '${key}' is given twice`);
    }
    params[key] = valueOf(entry.slice(at + 1).trim());
  });
  return params;
}

function buildBody() {
  const prompts = lines("prompts");
  const names = lines("filenames");
  const params = parseParams(document.getElementById("params").value);
  if (!prompts.length) {
    throw new FormProblem("Enter at least one prompt, one per line.");
  }
  if (names.length && names.length !== prompts.length) {
    throw new FormProblem(`File names: ${names.length} given for ${prompts.length} prompts; give one per prompt or none.`);
  }
  const own = Object.keys(params).filter((key) => OWN_FIELDS.has(key));
  if (own.length) {
    throw new FormProblem(`Parameters: ${own.join(", ")} cannot be set here; use the form's own fields.`);
  }
  const body = { model_name: select.value, prompts, ...params };
  if (names.length) {
    body.custom_filenames = names;
  }
  return body;
}

// The same body sent again (a double click, a retry after a lost answer) reuses its
// Idempotency-Key, so the service answers with the same job instead of a second one.
function idempotencyKey(body) {
  const text = JSON.stringify(body);
  if (pending.body !== text) {
    const bytes = crypto.getRandomValues(new Uint8Array(16)); // works over plain http too
    pending = { body: text, key: "ui-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("") };
  }
  return pending.key;
}

function showModel() {
  const model = models.find((m) => m.id === select.value);
  const tbody = document.querySelector("#param-table tbody");
  tbody.replaceChildren();
  if (!model) {
    return;
  }
  const required = model.required.filter((name) => name !== "prompt");
  setText("model-help", `${model.purpose}; ${model.output}.` +
    (required.length ? ` Required parameters: ${required.join(", ")}.` : ""));
  for (const [name, spec] of Object.entries(model.parameters)) {
    tbody.append(el("tr", {}, el("td", {}, el("code", { text: name })), el("td", { text: spec.type }),
      el("td", { text: JSON.stringify(spec.default) }), el("td", { text: spec.allowed })));
  }
}

async function loadModels() {
  try {
    models = (await api("/models")).data.models;
  } catch (error) {
    showBanner(describe(error));
    return;
  }
  select.replaceChildren(...models.map((m) => el("option", { text: m.id, attrs: { value: m.id } })));
  showModel();
}

function countPrompts() {
  const count = lines("prompts").length;
  setText("prompt-count", count ? `${count} prompt${count === 1 ? "" : "s"}` : "");
}

async function send(event) {
  event.preventDefault();
  showMessage("form-error", "");
  let body;
  try {
    body = buildBody();
  } catch (error) {
    showMessage("form-error", error instanceof FormProblem ? error.message : String(error));
    return;
  }
  submit.disabled = true;
  try {
    const { data } = await api("/jobs", { method: "POST", body, headers: { "Idempotency-Key": idempotencyKey(body) } });
    location.assign(jobPath(data.job_id));
  } catch (error) {
    showMessage("form-error", describe(error));
    submit.disabled = false;
  }
}

initChrome();
if (requireKey()) {
  select.addEventListener("change", showModel);
  document.getElementById("prompts").addEventListener("input", countPrompts);
  form.addEventListener("submit", send);
  loadModels();
}
