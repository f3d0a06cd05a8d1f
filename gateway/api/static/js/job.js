// The job page: a grid of thumbnails in prompt order, each with its prompt, file name and
// status or error, polled from GET /jobs/<id> while the job runs; cancel and retry buttons.
import {
  UNFINISHED, api, blobUrl, describe, el, fileParts, initChrome, requireKey, setText, showBanner, showMessage,
} from "./common.js";

const POLL_MS = 1000;
const POLL_MS_MOST = 5000; // a job of a thousand items answers a large body: ask less often

function pollDelay(job) {
  return Math.min(POLL_MS_MOST, POLL_MS + 4 * job.total);
}
const jobId = document.body.dataset.jobId;
const grid = document.getElementById("grid");
const cancelButton = document.getElementById("cancel");
const retryButton = document.getElementById("retry");
const cards = new Map(); // item index -> card parts
let timer = null;

function imagePage(url) {
  const { folder, name } = fileParts(url);
  return `/ui/files/${encodeURIComponent(folder)}/${encodeURIComponent(name)}?job=${encodeURIComponent(jobId)}`;
}

function baseName(path) {
  return String(path).split("/").pop();
}

function makeCard(item) {
  const thumbs = el("div", { className: "thumbs" });
  const status = el("p", { className: "status" });
  const error = el("p", { className: "error" });
  const file = el("p", { className: "file" });
  const caption = el("figcaption", {}, el("p", { className: "prompt", text: item.prompt }), file, status, error);
  const root = el("figure", { className: "card", dataset: { index: item.index } }, thumbs, caption);
  grid.append(root);
  return { root, thumbs, status, error, file, shown: null };
}

function thumbnail(url) {
  const name = baseName(url);
  const img = el("img", { className: "thumb", attrs: { alt: name } });
  const link = el("a", { attrs: { href: imagePage(url), title: name } }, img);
  img.addEventListener("load", () => { img.dataset.loaded = "1"; });
  blobUrl(url).then((file) => {
    if (file.type.startsWith("image/")) {
      img.src = file.url;
    } else {
      link.replaceChildren(el("span", { className: "placeholder", text: name }));
    }
  }).catch((failure) => link.replaceChildren(el("span", { className: "placeholder error", text: describe(failure) })));
  return link;
}

function updateCard(card, item) {
  card.root.dataset.status = item.status;
  card.status.textContent = item.status;
  card.error.textContent = item.error || "";
  card.error.hidden = !item.error;
  card.file.textContent = item.files.length ? item.files.map(baseName).join(", ") : "—";
  const shown = item.urls.join("\n");
  if (shown !== card.shown) { // a retried item starts over with no files, then gets new ones
    card.shown = shown;
    card.thumbs.replaceChildren(...(item.urls.length ? item.urls.map(thumbnail)
      : [el("div", { className: "placeholder", text: item.status })]));
  } else if (!item.urls.length) {
    card.thumbs.firstChild.textContent = item.status;
  }
}

function render(job) {
  const counts = job.counts;
  const done = counts.succeeded + counts.failed + counts.canceled;
  const status = setText("job-status", job.status);
  status.dataset.status = job.status;
  setText("job-model", job.model_name);
  const parts = [`${done} of ${job.total} done`];
  for (const name of ["succeeded", "failed", "canceled", "running", "queued"]) {
    if (counts[name]) {
      parts.push(`${counts[name]} ${name}`);
    }
  }
  setText("job-counts", parts.join(" · "));
  const progress = document.getElementById("job-progress");
  progress.max = Math.max(job.total, 1);
  progress.value = done;
  const running = UNFINISHED.has(job.status);
  cancelButton.disabled = !running;
  retryButton.disabled = running || !(counts.failed + counts.canceled);
  for (const item of [...job.items].sort((a, b) => a.index - b.index)) {
    if (!cards.has(item.index)) {
      cards.set(item.index, makeCard(item));
    }
    updateCard(cards.get(item.index), item);
  }
  return running;
}

async function refresh() {
  clearTimeout(timer);
  try {
    const { data } = await api(`/jobs/${encodeURIComponent(jobId)}`);
    showBanner("");
    if (render(data)) {
      timer = setTimeout(refresh, pollDelay(data));
    }
  } catch (error) {
    showBanner(describe(error));
    if (error.status !== 401 && error.status !== 404) {
      timer = setTimeout(refresh, POLL_MS * 3); // the service may be restarting
    }
  }
}

async function act(button, path, said) {
  button.disabled = true;
  showMessage("action-message", "");
  try {
    const { data } = await api(`/jobs/${encodeURIComponent(jobId)}/${path}`, { method: "POST" });
    showMessage("action-message", said(data));
  } catch (error) {
    showMessage("action-message", describe(error));
  }
  refresh();
}

initChrome();
if (requireKey()) {
  cancelButton.addEventListener("click", () => act(cancelButton, "cancel", () => "Cancel requested."));
  retryButton.addEventListener("click", () => act(retryButton, "retry",
    (data) => `Retrying ${data.retried.length} item${data.retried.length === 1 ? "" : "s"}.`));
  refresh();
}
