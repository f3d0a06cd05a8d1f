// The jobs page: the caller's jobs (GET /jobs, newest first), each with its status and
// progress (from GET /jobs/<id>), refreshed while any of them is unfinished.
import { UNFINISHED, api, describe, el, formatTime, initChrome, jobPath, requireKey, setText, showBanner } from "./common.js";

const POLL_MS = 2000;
const PER_PAGE = 20;
const DETAIL_CONCURRENCY = 4;
const rows = new Map(); // job id -> {status, progress, text}
let page = Math.max(1, Number.parseInt(new URLSearchParams(location.search).get("page"), 10) || 1);
let timer = null;

function progressOf(job) {
  const counts = job.counts || {};
  const done = (counts.succeeded || 0) + (counts.failed || 0) + (counts.canceled || 0);
  const parts = [`${done} of ${job.total} done`];
  for (const name of ["failed", "canceled", "running", "queued"]) {
    if (counts[name]) {
      parts.push(`${counts[name]} ${name}`);
    }
  }
  return { done, total: job.total, text: parts.join(" · ") };
}

function addRow(tbody, job) {
  const status = el("span", { className: "status", text: job.status, dataset: { status: job.status } });
  const progress = el("progress", { attrs: { max: 1, value: 0 } });
  const text = el("span", { className: "note" });
  const link = el("a", { attrs: { href: jobPath(job.job_id) } }, el("code", { text: job.job_id }));
  tbody.append(el("tr", { dataset: { jobId: job.job_id } },
    el("td", {}, link), el("td", { text: job.model_name }), el("td", { text: job.kind }),
    el("td", { text: formatTime(job.created_at) }), el("td", {}, status), el("td", {}, progress, text)));
  rows.set(job.job_id, { status, progress, text });
}

function showDetail(job) {
  const row = rows.get(job.job_id);
  if (!row) {
    return;
  }
  const { done, total, text } = progressOf(job);
  row.status.textContent = job.status;
  row.status.dataset.status = job.status;
  row.progress.max = Math.max(total, 1);
  row.progress.value = done;
  row.text.textContent = text;
}

// Details of several jobs, a few requests at a time; the ids still unfinished.
async function refreshDetails(ids) {
  const queue = [...ids];
  const unfinished = [];
  async function worker() {
    while (queue.length) {
      const id = queue.shift();
      try {
        const { data } = await api(`/jobs/${encodeURIComponent(id)}`);
        showDetail(data);
        if (UNFINISHED.has(data.status)) {
          unfinished.push(id);
        }
      } catch (error) {
        showBanner(describe(error));
      }
    }
  }
  await Promise.all(Array.from({ length: DETAIL_CONCURRENCY }, worker));
  return unfinished;
}

function poll(ids) {
  clearTimeout(timer);
  if (ids.length) {
    timer = setTimeout(async () => poll(await refreshDetails(ids)), POLL_MS);
  }
}

async function load() {
  let listing;
  try {
    listing = (await api(`/jobs?page=${page}&per_page=${PER_PAGE}`)).data;
  } catch (error) {
    showBanner(describe(error));
    return;
  }
  const tbody = document.querySelector("#jobs tbody");
  tbody.replaceChildren();
  rows.clear();
  listing.jobs.forEach((job) => addRow(tbody, job));
  document.getElementById("jobs").hidden = !listing.jobs.length;
  document.getElementById("jobs-empty").hidden = listing.jobs.length > 0 || page > 1;
  setText("page-no", `page ${page}`);
  document.getElementById("newer").disabled = page <= 1;
  document.getElementById("older").disabled = !listing.next_page;
  poll(await refreshDetails(listing.jobs.map((job) => job.job_id)));
}

function go(to) {
  page = to;
  history.replaceState(null, "", to > 1 ? `?page=${to}` : location.pathname);
  load();
}

initChrome();
if (requireKey()) {
  document.getElementById("newer").addEventListener("click", () => go(page - 1));
  document.getElementById("older").addEventListener("click", () => go(page + 1));
  load();
}
