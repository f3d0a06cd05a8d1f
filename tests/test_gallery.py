"""The web gallery at /ui in a real headless Chromium (the system's `chromium`, driven by
Playwright; no browser is downloaded): a batch submitted through the form fills its grid,
a running job is canceled and retried from its page, a hostile prompt is shown as text and
runs nothing, every /ui response carries a strict Content-Security-Policy, and the key never
leaves the tab's sessionStorage except as a request header."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, Request, Response, sync_playwright

from helpers import ADMIN, ADMIN_KEY, ROOT, USER_TOKEN, finished_job, wait_for

ADMIN_HEADER, USER_HEADER = "X-Admin-API-Key", "X-Replicate-API-Key"
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=1</script>'
PROMPTS = ["a red fox in fresh snow", "a lighthouse at dusk", "a bowl of ramen, top view", "a paper crane",
           "a desert road at noon", "a glass of iced tea", "a city skyline at night", "a mossy stone bridge"]
NAMES = ["fox", "lighthouse", "ramen", "crane", "desert road", "iced tea", "skyline", "bridge"]
PAGE_PATHS = ["/ui", "/ui/", "/ui/jobs", "/ui/jobs/new", "/ui/jobs/job_0123", "/ui/files/folder/name.webp"]
SCREENSHOT = ROOT / "docs" / "gallery.png"


def policy(header: str) -> dict[str, str]:
    """A Content-Security-Policy header as {directive: sources}."""
    directives = (part.strip().split(None, 1) for part in header.split(";") if part.strip())
    return {d[0]: d[1] if len(d) > 1 else "" for d in directives}


def assert_locked_down(headers: dict[str, str]) -> None:
    headers = {k.lower(): v for k, v in headers.items()}
    csp = policy(headers["content-security-policy"])
    assert csp["default-src"] == "'self'" and csp["script-src"] == "'self'", csp
    assert csp["img-src"] == "'self' blob:" and csp["object-src"] == "'none'", csp
    assert csp["base-uri"] == "'none'" and csp["frame-ancestors"] == "'none'", csp
    assert "unsafe" not in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("chromium is not installed: run `bash scripts/system-deps.sh` as root")
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox refuses to start as root (CI) and in most containers.
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


class Gallery:
    """One browser tab on the service's /ui, recording every request, document response,
    console error and page error."""

    def __init__(self, page: Page, base: str) -> None:
        self.page, self.base = page, base
        self.requested: list[str] = []
        self.documents: list[Response] = []
        self.problems: list[str] = []
        page.on("request", self._request)
        page.on("response", self._response)
        page.on("console", lambda message: self.problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.set_default_timeout(30_000)

    def _request(self, request: Request) -> None:
        self.requested.append(request.url)

    def _response(self, response: Response) -> None:
        if response.request.resource_type == "document":
            self.documents.append(response)

    def open(self, path: str) -> None:
        self.page.goto(self.base + path)

    def sign_in(self, header: str, key: str) -> None:
        self.open("/ui")
        self.page.check(f"input[name=kind][value={header}]")
        self.page.fill("#key-value", key)
        self.page.click("#key-submit")
        self.page.wait_for_url(re.compile(r"/ui/jobs"))

    def submit_batch(self, prompts: list[str], names: list[str] | None = None, params: str = "",
                     model: str = "flux-dev") -> str:
        """Fill in and send the batch form; the id of the job page it lands on."""
        self.open("/ui/jobs/new")
        self.page.wait_for_selector(f"#model option[value={model}]", state="attached")
        self.page.select_option("#model", model)
        self.page.fill("#prompts", "\n".join(prompts))
        self.page.fill("#filenames", "\n".join(names or []))
        self.page.fill("#params", params)
        self.page.click("#submit")
        self.page.wait_for_url(re.compile(r"/ui/jobs/job_"))
        return self.page.url.rsplit("/", 1)[1]

    def loaded_thumbnails(self) -> int:
        return self.page.eval_on_selector_all(
            "#grid img.thumb", "imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).length")

    def texts(self, selector: str) -> list[str]:
        return self.page.eval_on_selector_all(selector, "nodes => nodes.map(n => n.textContent)")

    def job_status(self) -> str:
        return self.page.get_attribute("#job-status", "data-status") or ""

    def wait_for_status(self, *statuses: str, seconds: float = 30) -> str:
        return wait_for(lambda: self.job_status() in statuses and self.job_status(), seconds, step=0.1,
                        message=lambda: f"job page status {self.job_status()!r}, not one of {statuses}")

    def check_key_kept_secret(self, key: str) -> None:
        """The key was in no URL requested, no cookie, no local storage, no page's HTML; the
        pages kept their CSP; the browser reported no error (a CSP violation is one)."""
        assert self.requested and not [url for url in self.requested if key in url]
        assert not [c for c in self.page.context.cookies() if key in c["value"] or key in c["name"]]
        assert key not in self.page.evaluate("JSON.stringify(Object.entries(localStorage))")
        assert key not in self.page.content()
        assert self.documents
        for response in self.documents:
            assert_locked_down(response.all_headers())
        assert not self.problems, self.problems


@pytest.fixture
def gallery(browser: Browser, service) -> Iterator[Gallery]:
    context = browser.new_context(viewport={"width": 1000, "height": 880})
    try:
        yield Gallery(context.new_page(), service.url)
    finally:
        context.close()


def test_every_gallery_response_is_locked_down(service):
    """Pages, static files and a /ui 404 all carry the strict headers; the pages hold no
    inline script, handler or style; the JSON API outside /ui is as it was."""
    for path in [*PAGE_PATHS, "/ui/static/gallery.css", "/ui/static/js/common.js", "/ui/no-such-page"]:
        response = service.get(path)
        assert response.status_code == (404 if "no-such" in path else 200), path
        assert_locked_down(response.headers)
    for path in PAGE_PATHS:
        html = service.get(path).text
        scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
        assert scripts and all("src=" in attrs and not body.strip() for attrs, body in scripts), path
        assert not re.search(r"\son[a-z]+\s*=|\sstyle\s*=|javascript:", html, re.I), path
    assert 'data-job-id="job_&lt;b&gt;"' in service.get("/ui/jobs/job_<b>").text  # an echoed id is escaped
    assert "Content-Security-Policy" not in service.get("/health").headers
    assert service.get("/jobs", headers=ADMIN).json()["jobs"] == []


def test_a_batch_submitted_through_the_form_fills_the_grid(gallery, service, emu, tmp_path):
    emu.set_faults(latency="uniform", latency_min_s=1.0, latency_max_s=3.0)
    gallery.sign_in(ADMIN_HEADER, ADMIN_KEY)
    job_id = gallery.submit_batch(PROMPTS, NAMES, params="aspect_ratio=1:1\noutput_format=png")

    seen: list[int] = []

    def grid_full() -> bool:
        seen.append(gallery.loaded_thumbnails())
        return seen[-1] == len(PROMPTS) and gallery.job_status() == "succeeded"

    wait_for(grid_full, 60, step=0.1, message=lambda: f"thumbnails loaded: {seen[-1:]}")
    assert min(seen) < len(PROMPTS)  # the page filled in as the job ran, without a reload
    assert gallery.texts("#grid .card .prompt") == PROMPTS  # prompt order
    assert gallery.texts("#grid .card .file") == [f"{name}.png" for name in NAMES]
    assert gallery.texts("#grid .card .status") == ["succeeded"] * len(PROMPTS)
    assert gallery.page.text_content("#job-counts").startswith(f"{len(PROMPTS)} of {len(PROMPTS)} done")
    assert gallery.page.is_disabled("#cancel") and gallery.page.is_disabled("#retry")
    job = service.get(f"/jobs/{job_id}", headers=ADMIN).json()
    assert [item["prompt"] for item in job["items"]] == PROMPTS
    assert {p["input"]["output_format"] for p in emu.predictions()} == {"png"}

    gallery.page.screenshot(path=str(tmp_path / "gallery.png"))
    if os.environ.get("UPDATE_GALLERY_SCREENSHOT") or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(exist_ok=True)
        gallery.page.screenshot(path=str(SCREENSHOT))

    gallery.page.click("#grid .card[data-index='2'] a")  # the image page, with its provenance
    gallery.page.wait_for_selector("#provenance dd[data-field=sha256]")
    assert gallery.page.text_content("#provenance dd[data-field=prompt]") == PROMPTS[2]
    wait_for(lambda: gallery.page.evaluate("document.getElementById('image').naturalWidth") > 0)
    wait_for(lambda: gallery.page.text_content("#image-note") == "SHA-256 matches the record")
    gallery.page.click("#back")
    gallery.page.wait_for_url(re.compile(rf"/ui/jobs/{job_id}$"))
    gallery.check_key_kept_secret(ADMIN_KEY)


def test_a_script_prompt_is_shown_as_text_and_runs_nothing(gallery, service, emu):
    gallery.sign_in(ADMIN_HEADER, ADMIN_KEY)
    gallery.open("/ui/jobs/new")
    gallery.page.wait_for_selector("#model option[value=flux-dev]", state="attached")
    gallery.page.fill("#prompts", "a cat")
    gallery.page.fill("#filenames", HOSTILE)  # refused by the service; its error names the value
    gallery.page.click("#submit")
    gallery.page.wait_for_selector("#form-error:not([hidden])")
    assert "custom_filenames" in gallery.page.text_content("#form-error")
    assert gallery.page.query_selector_all("#form-error *") == []  # the error is text, not markup
    gallery.problems.clear()  # the browser logs the 400 as a failed resource

    prompts = [HOSTILE, "</textarea><b>bold</b> & &amp; done"]
    gallery.submit_batch(prompts, params='{"output_format": "jpg"}')  # parameters as a JSON object
    wait_for(lambda: gallery.loaded_thumbnails() == len(prompts), 30)
    assert gallery.texts("#grid .card .prompt") == prompts
    assert gallery.page.evaluate("typeof window.__pwned") == "undefined"
    assert gallery.page.query_selector_all("#grid img:not(.thumb), #grid b, main script") == []
    assert [p["input"]["output_format"] for p in emu.predictions()] == ["jpg", "jpg"]

    gallery.page.click("#grid .card[data-index='0'] a")
    gallery.page.wait_for_selector("#provenance dd[data-field=prompt]")
    assert gallery.page.text_content("#provenance dd[data-field=prompt]") == HOSTILE
    assert gallery.page.evaluate("typeof window.__pwned") == "undefined"
    gallery.check_key_kept_secret(ADMIN_KEY)


def test_a_running_job_is_canceled_and_retried_from_its_page(gallery, service, emu):
    emu.set_faults(latency_s=120)
    submitted = service.post("/jobs", {"model_name": "flux-dev", "prompts": ["slow one", "slow two", "slow three"]},
                             headers=ADMIN)
    job_id = submitted.json()["job_id"]
    gallery.sign_in(ADMIN_HEADER, ADMIN_KEY)
    gallery.open(f"/ui/jobs/{job_id}")
    gallery.wait_for_status("running")
    wait_for(lambda: len(emu.predictions()) == 3)
    assert gallery.page.is_enabled("#cancel") and gallery.page.is_disabled("#retry")

    gallery.page.click("#cancel")
    gallery.wait_for_status("canceled")
    wait_for(lambda: gallery.texts("#grid .card .status") == ["canceled"] * 3)
    assert service.get(f"/jobs/{job_id}", headers=ADMIN).json()["status"] == "canceled"
    ids = {p["id"] for p in emu.predictions()}
    wait_for(lambda: set(emu.stats()["canceled_ids"]) == ids)  # canceled upstream too, not only here

    emu.set_faults(latency_s=0.05)
    wait_for(lambda: gallery.page.is_enabled("#retry"))

    def retried() -> bool:  # the last run may still be winding down: the page then says so
        gallery.page.click("#retry")
        gallery.page.wait_for_selector("#action-message:not([hidden])")
        return gallery.page.text_content("#action-message") == "Retrying 3 items."

    wait_for(retried, 30, step=0.5)
    wait_for(lambda: gallery.loaded_thumbnails() == 3, 30)
    gallery.wait_for_status("succeeded")
    assert finished_job(service.get, job_id)["counts"]["succeeded"] == 3
    gallery.check_key_kept_secret(ADMIN_KEY)


def test_the_jobs_page_lists_only_the_callers_jobs_with_progress(gallery, service, emu):
    user = {USER_HEADER: USER_TOKEN}
    mine = service.post("/jobs", {"model_name": "flux-dev", "prompts": ["u1", "u2"]}, headers=user).json()["job_id"]
    theirs = service.post("/jobs", {"model_name": "flux-dev", "prompt": "admin's"}, headers=ADMIN).json()["job_id"]
    finished_job(service.get, mine, headers=user)
    finished_job(service.get, theirs)

    gallery.open("/ui/jobs")  # no key yet: sent to the key page, and back after it
    gallery.page.wait_for_url(re.compile(r"/ui$"))
    gallery.page.check(f"input[name=kind][value={USER_HEADER}]")
    refused = "r8_refused token"
    gallery.page.fill("#key-value", refused)
    gallery.page.click("#key-submit")
    gallery.page.wait_for_selector("#key-error:not([hidden])")
    assert refused not in gallery.page.evaluate("JSON.stringify(Object.entries(sessionStorage))")  # not kept
    gallery.problems.clear()  # the 401 was logged by the browser as a failed resource

    gallery.page.fill("#key-value", USER_TOKEN)
    gallery.page.click("#key-submit")
    gallery.page.wait_for_url(re.compile(r"/ui/jobs$"))
    row = f"#jobs tr[data-job-id='{mine}']"
    gallery.page.wait_for_selector(f"{row} .status[data-status=succeeded]")
    assert gallery.texts("#jobs tbody tr code") == [mine]
    assert gallery.page.text_content(f"{row} td:last-child").startswith("2 of 2 done")
    assert gallery.page.text_content("#key-kind") == "Replicate token"
    gallery.check_key_kept_secret(USER_TOKEN)

    gallery.page.click("#forget-key")
    gallery.page.wait_for_url(re.compile(r"/ui$"))
    assert gallery.page.evaluate("sessionStorage.length") == 0


def test_the_package_ships_the_templates_and_static_files(tmp_path):
    """A wheel built from the tree holds every template and static file (the Docker image
    copies the whole `gateway` folder)."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "gateway", source / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "requirements.txt"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    str(source), "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=170)
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    assets = [p for folder in ("templates", "static") for p in (ROOT / "gateway/api" / folder).rglob("*")
              if p.is_file()]
    assert assets
    assert {str(p.relative_to(ROOT)) for p in assets} <= shipped


def test_the_readme_shows_the_gallery():
    readme = (ROOT / "README.md").read_text()
    assert "docs/gallery.png" in readme and SCREENSHOT.is_file()
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert SCREENSHOT.stat().st_size < 400_000
