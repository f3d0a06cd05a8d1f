"""Operating the service: the control plane stays answerable under any request load, and
`make run` (serve.py) starts and stops cleanly, binds the demo to loopback and makes the
README's examples work as written. Every service here is a real process (gunicorn, serve.py,
make) driven over HTTP."""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gateway.config import ConfigError, Settings

from helpers import ADMIN, GUNICORN, ROOT, free_port, service_env, start, stop, wait_for, wait_healthy

DEMO_ADMIN = {"X-Admin-API-Key": "demo-admin-key"}
BUSY = ("Too many synchronous requests in progress (6, MAX_SYNC_REQUESTS); "
        "submit a job with POST /jobs or retry later")


# -- the control plane under load ----------------------------------------------------------

def answered_within(seconds: float, method: str, url: str, **kwargs) -> requests.Response:
    """The response, or a failure naming the endpoint if it took longer than `seconds`."""
    try:
        return requests.request(method, url, timeout=seconds, **kwargs)
    except requests.Timeout:
        pytest.fail(f"{method} {url} did not answer within {seconds} s")


def test_control_plane_answers_while_sync_requests_exceed_the_threads(emulator_server, emu, tmp_path):
    """12 synchronous requests that hang upstream, against 8 gunicorn threads: before
    MAX_SYNC_REQUESTS, they took every thread for GENERATION_TIMEOUT and /health, /status and
    /configure waited behind them. Now 6 run, 6 are refused at once, and the control plane
    answers at once."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, *GUNICORN],
                 service_env(emulator_server, tmp_path, port, GUNICORN_THREADS="8", MAX_SYNC_REQUESTS="6",
                             GENERATION_TIMEOUT="10"), tmp_path)
    answers: list[requests.Response] = []
    try:
        wait_healthy(url, proc)

        def one(i: int) -> None:
            answers.append(requests.post(f"{url}/generate", json={"model_name": "flux-dev", "prompt": f"[[hang]] {i}"},
                                         headers=ADMIN, timeout=60))
        senders = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for sender in senders:
            sender.start()
        wait_for(lambda: len(emu.predictions()) >= 6, seconds=20, step=0.1)
        assert len(emu.predictions()) >= 6
        assert answered_within(1, "GET", f"{url}/health").status_code == 200
        assert answered_within(1, "GET", f"{url}/status").status_code == 200
        configured = answered_within(1, "POST", f"{url}/configure", json={"concurrent_limit": 61}, headers=ADMIN)
        assert configured.status_code == 200 and configured.json()["concurrency_status"]["concurrent_limit"] == 61
        for sender in senders:
            sender.join(60)
    finally:
        stop(proc)
    refused = [r for r in answers if r.status_code == 503]
    assert len(answers) == 12 and len(refused) == 6, [r.status_code for r in answers]
    for r in refused:
        assert r.json() == {"error": BUSY, "request_id": r.headers["X-Request-ID"]}
        assert r.headers["Retry-After"].isdigit()
    assert {r.status_code for r in answers if r not in refused} == {504}  # they ran to their timeout
    assert len(emu.predictions()) == 6  # a refused request cost nothing upstream


@pytest.mark.parametrize("threads,configured,expected", [
    ("128", None, 112), ("8", None, 6), ("3", None, 1), ("8", "7", 7), ("8", "1", 1)])
def test_max_sync_requests_default_and_bound(threads, configured, expected):
    settings = Settings.from_mapping({"GUNICORN_THREADS": threads, "MAX_SYNC_REQUESTS": configured})
    assert settings.max_sync_requests == expected and settings.gunicorn_threads == int(threads)


@pytest.mark.parametrize("threads,configured", [("8", "8"), ("8", "100"), (None, "128")])
def test_max_sync_requests_must_leave_threads_for_the_control_plane(threads, configured):
    with pytest.raises(ConfigError, match=r"MAX_SYNC_REQUESTS=\d+ is not valid: expected fewer than GUNICORN_THREADS"):
        Settings.from_mapping({"GUNICORN_THREADS": threads, "MAX_SYNC_REQUESTS": configured})


def test_the_sync_request_bound_is_per_app(make_service, emu):
    """Each app counts its own requests (no module-level state shared between services)."""
    first = make_service(GUNICORN_THREADS="3", MAX_SYNC_REQUESTS="1", GENERATION_TIMEOUT="3")
    second = make_service(GUNICORN_THREADS="3", MAX_SYNC_REQUESTS="1")
    holder = threading.Thread(target=first.post, args=("/generate", {"model_name": "flux-dev", "prompt": "[[hang]]"},
                                                       ADMIN))
    holder.start()
    wait_for(emu.predictions, seconds=10)
    busy = first.post("/generate", {"model_name": "flux-dev", "prompt": "a"}, ADMIN)
    assert busy.status_code == 503 and "(1, MAX_SYNC_REQUESTS)" in busy.json()["error"]
    assert second.post("/generate", {"model_name": "flux-dev", "prompt": "b"}, ADMIN).status_code == 200
    holder.join(30)
    assert first.post("/generate", {"model_name": "flux-dev", "prompt": "c"}, ADMIN).status_code == 200  # released


# -- serve.py / make run ---------------------------------------------------------------------

def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int) -> set[int]:
    table = _processes()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    table = _processes()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]) if len(address) == 8
                          else address)
    return found


class Demo:
    """`make run`'s launcher in demo mode, started by `command` from the project folder."""

    def __init__(self, command: list[str], folder: Path, **extra: str) -> None:
        self.port, self.emulator_port = free_port(), free_port()
        while self.emulator_port == self.port:
            self.emulator_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "serve.log"
        self.output = folder / "out"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
        # Empty values win over a developer's .env: demo mode, default host and secrets.
        env.update({"REPLICATE_API_TOKEN": "", "FLASK_HOST": "", "WEBHOOK_SECRET": "", "JOBS_DB": "",
                    "CONCURRENT_DOCKER_ADMIN_API_KEY": "", "FLASK_PORT": str(self.port),
                    "EMULATOR_PORT": str(self.emulator_port), "OUTPUT_DIR": str(self.output), **extra})
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.started: set[int] = set()

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_healthy(self, seconds: float = 60) -> dict:
        def health() -> dict | None:
            assert self.process.poll() is None, f"exited early: {self.log()}"
            try:
                answer = requests.get(self.url + "/health", timeout=2).json()
            except requests.ConnectionError:
                return None
            self.started = descendants(self.process.pid)
            return answer
        return wait_for(health, seconds, step=0.2, message=lambda: f"never became healthy: {self.log()}")

    def assert_all_stopped(self, seconds: float = 15) -> None:
        """Both ports refuse connections and no process it started is left, within `seconds`."""
        wait_for(lambda: port_free(self.port) and port_free(self.emulator_port) and not alive(self.started),
                 seconds, step=0.2,
                 message=lambda: (f"still running: ports {self.port}: {not port_free(self.port)}, "
                                  f"{self.emulator_port}: {not port_free(self.emulator_port)}; "
                                  f"processes {alive(self.started)}\n{self.log()}"))

    def cleanup(self) -> None:
        """Whatever a failed test left running of what this Demo started."""
        for pid in alive(self.started | {self.process.pid}):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(10)


@pytest.fixture
def demo_of(tmp_path) -> Iterator:
    demos: list[Demo] = []

    def launch(command: list[str], **extra: str) -> Demo:
        demos.append(Demo(command, tmp_path, **extra))
        return demos[-1]
    yield launch
    for demo in demos:
        demo.cleanup()


SERVE = [sys.executable, "serve.py"]


def test_sigterm_to_serve_py_stops_gunicorn_and_the_emulator(demo_of):
    demo = demo_of(SERVE)
    demo.wait_healthy()
    assert len(demo.started) >= 3  # the emulator, gunicorn's master and its worker
    demo.process.send_signal(signal.SIGTERM)
    demo.assert_all_stopped()
    assert demo.process.wait(15) == 0


def test_sigterm_to_make_run_stops_everything(demo_of):
    demo = demo_of(["make", "--no-print-directory", "-C", str(ROOT), "run"])
    demo.wait_healthy()
    assert len(demo.started) >= 4  # serve.py, the emulator, gunicorn's master and its worker
    demo.process.send_signal(signal.SIGTERM)
    demo.assert_all_stopped()


def test_serve_py_stops_everything_when_its_parent_dies(demo_of):
    """A killed parent sends nothing on: serve.py must notice by itself (PR_SET_PDEATHSIG)."""
    demo = demo_of(["sh", "-c", f'"{sys.executable}" serve.py; exit $?'])  # not exec'd: sh stays the parent
    demo.wait_healthy()
    assert len(demo.started) >= 4  # serve.py, the emulator, gunicorn's master and its worker
    demo.process.send_signal(signal.SIGKILL)
    demo.assert_all_stopped()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[Demo]:
    running = Demo(SERVE, tmp_path_factory.mktemp("demo"))
    try:
        running.wait_healthy()
        yield running
        running.process.send_signal(signal.SIGTERM)
        running.assert_all_stopped()
    finally:
        running.cleanup()


def test_the_demo_listens_on_loopback_only(demo):
    """The demo's admin key is public: it must not be reachable from other machines."""
    assert requests.get(demo.url + "/health", timeout=5).status_code == 200
    assert listening_addresses(demo.port) == {"127.0.0.1"}
    assert f"Listening at: http://127.0.0.1:{demo.port}" in demo.log()


def test_flask_host_still_decides_where_the_demo_listens(demo_of):
    demo = demo_of(SERVE, FLASK_HOST="0.0.0.0")
    demo.wait_healthy()
    assert listening_addresses(demo.port) == {"0.0.0.0"}
    demo.process.send_signal(signal.SIGTERM)
    demo.assert_all_stopped()


def readme_first_job_example() -> list[str]:
    """The first `curl ... /jobs` command of the README's Jobs section, as argv."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Jobs"):]
    section = section[:section.index("\n## ", 1)]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    command = re.search(r"^curl [^\n]*/jobs\b.*?[^\\]\n", block, re.S | re.M).group(0)
    return shlex.split(command.replace("\\\n", " "))


def test_the_readmes_first_job_example_works_against_the_demo(demo):
    argv = readme_first_job_example()
    options = {"-X": None, "-H": [], "-d": None}
    url = None
    words = iter(argv[1:])
    for word in words:
        if word in ("-X", "-d"):
            options[word] = next(words)
        elif word == "-H":
            options["-H"].append(next(words))
        elif not word.startswith("-"):
            url = word
    headers = dict(h.split(": ", 1) for h in options["-H"])
    headers = {k: ("demo-admin-key" if v == "KEY" else v) for k, v in headers.items()}
    url = "http://" + url.replace("localhost:5003", f"127.0.0.1:{demo.port}")
    submitted = requests.request(options["-X"], url, data=options["-d"], headers=headers, timeout=30)
    assert submitted.status_code == 202, submitted.text
    job_url = f"{demo.url}{submitted.json()['status_url']}"

    def finished() -> dict | None:
        job = requests.get(job_url, headers=DEMO_ADMIN, timeout=10).json()
        return job if job["status"] not in ("queued", "running") else None
    job = wait_for(finished, 60, step=0.5, message=f"{job_url} not finished")
    assert job["status"] == "succeeded", job
    for item in job["items"]:
        assert Path(item["files"][0]).is_file()


def test_the_demo_accepts_webhooks(demo):
    """WEBHOOK_SECRET is set in demo mode: a webhook job is refused only for its target."""
    r = requests.post(demo.url + "/jobs", json={"model_name": "flux-dev", "prompt": "p",
                                                "webhook": "http://127.0.0.1:9/hook"}, headers=DEMO_ADMIN, timeout=10)
    assert r.status_code == 400 and "WEBHOOK_SECRET" not in r.json()["error"], r.json()


# -- what /models shows is what validation enforces -------------------------------------------

def test_models_shows_kontext_safety_tolerance_as_enforced(service):
    [kontext] = [m for m in service.get("/models").json()["models"] if m["id"] == "flux-kontext-max"]
    assert kontext["parameters"]["safety_tolerance"]["allowed"] == "a whole number from 0 to 2"
    body = {"model_name": "flux-kontext-max", "prompt": "p", "input_image": "https://e.com/a.png"}
    r = service.post("/generate", {**body, "safety_tolerance": 3}, ADMIN)
    assert r.status_code == 400 and r.json()["field"] == "safety_tolerance"
    assert "from 0 to 2" in r.json()["allowed"]
