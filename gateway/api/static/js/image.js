// One image: the file (fetched with the key into a blob URL) and its provenance record, the
// `<name>.json` saved beside it (GET /files/<folder>/<name>.json).
import { api, blobUrl, describe, el, initChrome, jobPath, requireKey, setText } from "./common.js";

const { folder, name } = document.body.dataset;
const FIELDS = [
  ["prompt", "prompt"], ["model", "model"], ["replicate_model", "Replicate model"],
  ["prediction_id", "prediction"], ["created_at", "created"], ["completed_at", "completed"],
  ["file", "file"], ["sha256", "SHA-256"],
];

function recordName() {
  const dot = name.lastIndexOf(".");
  return `${dot > 0 ? name.slice(0, dot) : name}.json`;
}

function fileUrl(file) {
  return `/files/${folder}/${file}`; // raw, as the API gives it; encoded where it is fetched
}

const TIMES = new Set(["created_at", "completed_at"]);

function showValue(value, key) {
  if (TIMES.has(key) && typeof value === "number") {
    return new Date(value * 1000).toISOString(); // recorded as seconds since the epoch
  }
  return typeof value === "string" ? value : JSON.stringify(value);
}

async function sha256(blob) {
  if (!(crypto.subtle && blob.arrayBuffer)) {
    return null; // no WebCrypto outside a secure context (plain http to a remote host)
  }
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function showImage() {
  const file = await blobUrl(fileUrl(name));
  const image = document.getElementById("image");
  if (file.type.startsWith("image/")) {
    image.src = file.url;
  } else {
    image.hidden = true;
  }
  const download = document.getElementById("download");
  download.href = file.url;
  download.download = name;
  download.hidden = false;
  return file.blob;
}

async function showProvenance() {
  setText("provenance-name", recordName());
  const record = (await api(filePath(recordName()))).data;
  const list = document.getElementById("provenance");
  for (const [key, label] of FIELDS) {
    if (record[key] !== undefined && record[key] !== null) {
      list.append(el("dt", { text: label }), el("dd", { text: showValue(record[key], key), dataset: { field: key } }));
    }
  }
  for (const [key, value] of Object.entries(record.parameters || {})) {
    list.append(el("dt", {}, el("code", { text: key })), el("dd", { text: showValue(value) }));
  }
  setText("provenance-raw", JSON.stringify(record, null, 2));
  return record;
}

function filePath(file) {
  return `/files/${encodeURIComponent(folder)}/${encodeURIComponent(file)}`;
}

async function load() {
  const job = new URLSearchParams(location.search).get("job");
  if (job) {
    const back = document.getElementById("back");
    back.href = jobPath(job);
    back.textContent = "← Back to the job";
  }
  const [image, record] = await Promise.allSettled([showImage(), showProvenance()]);
  if (image.status === "rejected") {
    setText("image-note", describe(image.reason));
  }
  if (record.status === "rejected") {
    setText("provenance-raw", "");
    document.getElementById("provenance").replaceChildren(el("dd", { text: `No provenance record: ${describe(record.reason)}` }));
  } else if (image.status === "fulfilled" && record.value.sha256) {
    const digest = await sha256(image.value);
    if (digest) {
      setText("image-note", digest === record.value.sha256 ? "SHA-256 matches the record" : "SHA-256 differs from the record");
    }
  }
}

initChrome();
if (requireKey()) {
  load();
}
