// Shared by every gallery page: the key, calls to the JSON API, images as blob URLs, and
// building elements from data.
//
// The key lives in this tab's sessionStorage only and is sent as a request header by fetch:
// never in a URL, a cookie, localStorage or the HTML. Data from the service (prompts, errors,
// file names) only ever reaches the page through textContent or attributes, never as markup.

const KEY_SLOT = "rcg.key";
const RETURN_SLOT = "rcg.return";
export const KEY_HEADERS = ["X-Admin-API-Key", "X-Replicate-API-Key"];
export const UNFINISHED = new Set(["queued", "running"]);

export function readKey() {
  try {
    const key = JSON.parse(sessionStorage.getItem(KEY_SLOT));
    if (key && KEY_HEADERS.includes(key.header) && typeof key.value === "string" && key.value) {
      return key;
    }
  } catch (error) {
    // an unreadable slot is the same as no key
  }
  return null;
}

export function saveKey(header, value) {
  sessionStorage.setItem(KEY_SLOT, JSON.stringify({ header, value }));
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_SLOT);
}

// Where to go once a key is entered: a gallery path remembered in sessionStorage (not in
// the URL), or the jobs page.
export function takeReturnPath() {
  const path = sessionStorage.getItem(RETURN_SLOT);
  sessionStorage.removeItem(RETURN_SLOT);
  return path && /^\/ui\/[^/]/.test(path) && !path.startsWith("/ui//") ? path : "/ui/jobs";
}

// The key, or null after sending the browser to the key page (which brings it back here).
export function requireKey() {
  const key = readKey();
  if (!key) {
    sessionStorage.setItem(RETURN_SLOT, location.pathname + location.search);
    location.replace("/ui");
  }
  return key;
}

export class ApiError extends Error {
  constructor(status, body) {
    const message = body && typeof body.error === "string" ? body.error : `HTTP ${status}`;
    super(message);
    this.status = status;
    this.field = body && typeof body.field === "string" ? body.field : null;
  }
}

function keyHeaders(extra) {
  const headers = new Headers(extra || {});
  const key = readKey();
  if (key) {
    headers.set(key.header, key.value);
  }
  return headers;
}

// A call to the JSON API with the key as a header: {status, data}, or throws ApiError.
export async function api(path, { method = "GET", body, headers } = {}) {
  const sent = keyHeaders(headers);
  if (body !== undefined) {
    sent.set("Content-Type", "application/json");
  }
  const response = await fetch(path, {
    method,
    headers: sent,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    credentials: "omit",
    redirect: "error",
  });
  let data = null;
  try {
    data = await response.json();
  } catch (error) {
    data = null;
  }
  if (!response.ok) {
    throw new ApiError(response.status, data);
  }
  return { status: response.status, data };
}

export function describe(error) {
  if (error instanceof ApiError) {
    const hint = error.status === 401 ? " (check the key: use Forget key to enter another)" : "";
    return `${error.message}${error.field ? ` [${error.field}]` : ""}${hint}`;
  }
  return `The service could not be reached: ${error && error.message ? error.message : error}`;
}

// `/files/<folder>/<name>` as sent by the API, with each part encoded for a request.
export function filePath(url) {
  const parts = String(url).replace(/^\/files\//, "").split("/");
  return "/files/" + parts.map((part) => encodeURIComponent(part)).join("/");
}

export function fileParts(url) {
  const [folder, ...rest] = String(url).replace(/^\/files\//, "").split("/");
  return { folder, name: rest.join("/") };
}

// Images are fetched with the key header (an <img> cannot send one) and shown from blob
// URLs. At most a few downloads run at once, in the order asked (prompt order), and each
// file is fetched once per page.
const BLOB_CONCURRENCY = 4;
const blobs = new Map();
const waiting = [];
let inFlight = 0;

function pump() {
  while (inFlight < BLOB_CONCURRENCY && waiting.length) {
    const { url, resolve, reject } = waiting.shift();
    inFlight += 1;
    fetchBlob(url).then(resolve, reject).finally(() => {
      inFlight -= 1;
      pump();
    });
  }
}

async function fetchBlob(url) {
  const response = await fetch(filePath(url), { headers: keyHeaders(), cache: "no-store", credentials: "omit" });
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      body = null;
    }
    throw new ApiError(response.status, body);
  }
  const blob = await response.blob();
  return { url: URL.createObjectURL(blob), type: blob.type, blob };
}

export function blobUrl(url) {
  if (!blobs.has(url)) {
    const promise = new Promise((resolve, reject) => {
      waiting.push({ url, resolve, reject });
      pump();
    });
    promise.catch(() => blobs.delete(url)); // a failed download may be tried again
    blobs.set(url, promise);
  }
  return blobs.get(url);
}

// An element built from data: text through textContent, attributes through setAttribute.
export function el(tag, { text, className, attrs, dataset } = {}, ...children) {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text !== undefined && text !== null) {
    node.textContent = String(text);
  }
  for (const [name, value] of Object.entries(attrs || {})) {
    node.setAttribute(name, String(value));
  }
  for (const [name, value] of Object.entries(dataset || {})) {
    node.dataset[name] = String(value);
  }
  node.append(...children);
  return node;
}

export function setText(id, text) {
  const node = document.getElementById(id);
  node.textContent = text === null || text === undefined ? "" : String(text);
  return node;
}

export function showMessage(id, text) {
  const node = setText(id, text);
  node.hidden = !text;
}

export function showBanner(text) {
  showMessage("banner", text);
}

export function formatTime(iso) {
  if (!iso) {
    return "";
  }
  const when = new Date(iso);
  return Number.isNaN(when.getTime()) ? String(iso) : when.toLocaleString();
}

export function jobPath(jobId) {
  return `/ui/jobs/${encodeURIComponent(jobId)}`;
}

// The page header: which kind of key is in use (never the key), and a button to forget it.
export function initChrome() {
  const key = readKey();
  const forget = document.getElementById("forget-key");
  setText("key-kind", key ? (key.header === "X-Admin-API-Key" ? "admin key" : "Replicate token") : "");
  forget.hidden = !key;
  forget.addEventListener("click", () => {
    forgetKey();
    location.assign("/ui");
  });
}
