"""Two replicas sharing one PostgreSQL journal and one output folder, as real processes: the
emulator, PostgreSQL, and two gunicorn services (one worker each) on their own ports. Any
replica answers for any job, and a replica killed mid-job has its work finished by the
other, with nothing created twice. Leases are short here (CLAIM_LEASE_SECONDS=2)."""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest
import requests
from cryptography.fernet import Fernet

from gateway.jobs.database import open_database
from gateway.jobs.migrations import LATEST, migrate
from replicate_emulator import read_stamp

from helpers import ADMIN, GUNICORN, USER_TOKEN, children, finished_job, free_port, service_env, start, wait_for

LEASE = "2"
SECRET = "whsec_dGVzdC13ZWJob29rLXNlY3JldC1ieXRlcw=="


class Replica:
    """One gunicorn service; its output is drained (and kept) so the pipe never fills."""

    def __init__(self, emulator_server, tmp_path, database_url: str, **extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = service_env(emulator_server, tmp_path, self.port, DATABASE_URL=database_url,
                          **{"CLAIM_LEASE_SECONDS": LEASE, **extra})
        self.process = start([sys.executable, *GUNICORN], env, tmp_path)
        self.output: list[str] = []
        self._drain = threading.Thread(target=lambda: self.output.extend(self.process.stdout), daemon=True)
        self._drain.start()

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            self._drain.join(5)
            raise AssertionError(f"replica exited early:\n{''.join(self.output)[-3000:]}")
        try:
            return requests.get(self.url + "/health", timeout=1).ok
        except requests.ConnectionError:
            return False

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=10, **kwargs)

    def post(self, path: str, body=None, headers=None) -> requests.Response:
        return requests.post(self.url + path, json=body, headers=headers or ADMIN, timeout=30)

    def kill(self) -> None:
        """SIGKILL, worker and master: no goodbyes, no claims released."""
        for pid in children(self.process.pid) + [self.process.pid]:
            os.kill(pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._drain.join(5)


@pytest.fixture
def replicas(emulator_server, tmp_path, postgres_url):
    """`replicas(n, **env)`: n replicas on one database and one OUTPUT_DIR, healthy."""
    started: list[Replica] = []

    def make(count: int = 2, **extra: str) -> list[Replica]:
        group = [Replica(emulator_server, tmp_path, postgres_url, **extra) for _ in range(count)]
        started.extend(group)
        for replica in group:
            wait_for(replica.healthy, 30, step=0.1, message="replica never became healthy")
        return group

    yield make
    for replica in started:
        replica.stop()
    for replica in started:
        assert "pg-secret-for-tests" not in "".join(replica.output)  # DATABASE_URL's password


def submit(replica: Replica, prompts: list[str], headers=None, **body) -> str:
    r = replica.post("/jobs", {"model_name": "flux-dev", "prompts": prompts, **body}, headers)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def database_dump(url: str) -> str:
    """Every row of every table, as text."""
    with psycopg.connect(url) as connection:
        tables = [r[0] for r in connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()]
        return "\n".join(json.dumps(row[0]) for table in tables
                         for row in connection.execute(f'SELECT row_to_json(t) FROM "{table}" t').fetchall())


def test_a_job_is_seen_downloaded_cancelled_and_retried_on_any_replica(replicas, emu):
    a, b = replicas()
    done = submit(a, ["a red kite", "a blue kite"], custom_filenames=["red", "blue"])
    job = finished_job(b.get, done)  # watched on B
    assert job["status"] == "succeeded"
    assert done in [j["job_id"] for j in b.get("/jobs", headers=ADMIN).json()["jobs"]]
    for item in job["items"]:
        image = b.get(item["urls"][0], headers=ADMIN)  # saved by A, served by B
        assert image.status_code == 200 and read_stamp(image.content)["prompt"] == item["prompt"]

    emu.set_faults(latency_s=30)
    slow = submit(a, [f"slow {i}" for i in range(4)])
    wait_for(lambda: len(emu.predictions()) >= 6, seconds=10)  # A runs them
    assert b.post(f"/jobs/{slow}/cancel").status_code == 200
    job = finished_job(b.get, slow, seconds=15)  # A picks the request up from the journal
    assert job["status"] == "canceled" and job["counts"]["canceled"] == 4
    wait_for(lambda: len(emu.stats()["canceled_ids"]) >= 4, seconds=10)  # canceled upstream too

    emu.set_faults(latency_s=0.05)
    retried = wait_for(lambda: (r := b.post(f"/jobs/{slow}/retry")).status_code == 202 and r, seconds=15,
                       message="retry on B kept being refused")
    assert retried.json()["retried"] == [0, 1, 2, 3]
    job = finished_job(a.get, slow)
    assert job["status"] == "succeeded" and all(a.get(i["urls"][0], headers=ADMIN).ok for i in job["items"])
    assert emu.stats()["counters"]["creates"] == 2 + 4 + 4


@pytest.mark.parametrize("prefer_wait", [60, 1], ids=["answers-lost-in-flight", "ids-journaled"])
def test_sigkill_of_a_replica_mid_job_the_other_finishes_it(replicas, emu, prefer_wait):
    """A killed while 8 of 20 predictions are in flight: B adopts the job once A's lease runs
    out, reads back or finds again what A created, creates the rest: 20 creates in all."""
    emu.set_faults(latency_s=2.5)
    a, b = replicas(REPLICATE_CONCURRENT_LIMIT="8", REPLICATE_PREFER_WAIT_SECONDS=str(prefer_wait))
    job_id = submit(a, [f"durable {i}" for i in range(20)])
    wait_for(lambda: len(emu.predictions()) >= 8, seconds=10)
    time.sleep(prefer_wait == 1 and 1.3)  # past the 1 s wait: the ids are journaled
    a.kill()
    assert 8 <= len(emu.predictions()) < 20
    job = finished_job(b.get, job_id, seconds=float(LEASE) + 60)
    assert job["status"] == "succeeded", [i["error"] for i in job["items"] if i["error"]]
    for item in job["items"]:
        assert read_stamp(item["files"][0])["prompt"] == f"durable {item['index']}"
    assert emu.stats()["counters"]["creates"] == 20


def test_a_replica_stopped_gracefully_hands_its_jobs_over_at_once(replicas, emu):
    """A stop releases the claims: B adopts without waiting for the (here long) lease."""
    emu.set_faults(latency_s=3)
    a, b = replicas(REPLICATE_CONCURRENT_LIMIT="4", REPLICATE_PREFER_WAIT_SECONDS="1", CLAIM_LEASE_SECONDS="300")
    job_id = submit(a, [f"handed over {i}" for i in range(6)])
    wait_for(lambda: len(emu.predictions()) >= 4, seconds=10)
    time.sleep(1.3)  # past the 1 s wait: the ids are journaled
    a.stop()
    job = finished_job(b.get, job_id, seconds=60)  # far less than the lease
    assert job["status"] == "succeeded", [i["error"] for i in job["items"] if i["error"]]
    assert emu.stats()["counters"]["creates"] == 6


def test_input_postgresql_cannot_store_is_a_400_not_a_500(replicas, emu):
    [a] = replicas(1)
    r = a.post("/jobs", {"model_name": "flux-dev", "prompt": "nul \u0000 inside"})
    assert r.status_code == 400 and r.json()["field"] == "prompt"
    assert a.get("/jobs/job%00x", headers=ADMIN).status_code == 404
    assert a.get("/files/x%00/y.webp", headers=ADMIN).status_code == 404
    assert emu.stats()["counters"] == {}


def test_concurrent_submits_with_one_key_across_replicas_make_one_job(replicas, emu):
    a, b = replicas()
    headers = {**ADMIN, "Idempotency-Key": "order-7"}
    body = {"model_name": "flux-dev", "prompts": ["one", "two", "three"]}
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda n: (a, b)[n % 2].post("/jobs", body, headers), range(20)))
    assert sorted(r.status_code for r in answers) == [200] * 19 + [202], [r.text for r in answers]
    [job_id] = {r.json()["job_id"] for r in answers}
    assert finished_job(a.get, job_id)["status"] == "succeeded"
    assert emu.stats()["counters"]["creates"] == 3
    assert len(b.get("/jobs", headers=ADMIN).json()["jobs"]) == 1


class Receiver:
    """A webhook receiver that answers 500 to its first `failures` deliveries, then 204."""

    def __init__(self, failures: int) -> None:
        self.received: list[tuple[str, int]] = []   # (webhook-id, status answered)
        self.failures = failures
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                status = 500 if len(outer.received) < outer.failures else 204
                outer.received.append((self.headers["webhook-id"], status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> list[str]:
        return [message for message, status in self.received if status == 204]


def test_a_webhook_is_delivered_once_with_both_replicas_up(replicas, emu):
    """A's first three deliveries fail, so the delivery stays pending for 7 s (backoff 1, 2,
    4 s), longer than the 5 s between the replicas' sweeps for pending webhooks: only the
    delivery's claim keeps B (and A's own sweep) from sending it again."""
    receiver = Receiver(failures=3)
    a, b = replicas(WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOW_PRIVATE="true")
    job_id = submit(a, ["hooked"], webhook=receiver.url)
    finished_job(b.get, job_id)
    wait_for(receiver.delivered, seconds=20)
    time.sleep(6)  # more than a sweep of both replicas (every 5 s): nothing more may come
    receiver.server.shutdown()
    assert receiver.delivered() == [f"msg_{job_id}"] and len(receiver.received) == 4


def test_a_webhook_is_sent_by_another_replica_after_a_crash(replicas, emu):
    receiver = Receiver(failures=1000)  # A's deliveries all fail, and then A dies
    a, b = replicas(WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOW_PRIVATE="true")
    job_id = submit(a, ["hooked"], webhook=receiver.url)
    wait_for(lambda: receiver.received, seconds=20)
    a.kill()
    receiver.failures = 0
    wait_for(receiver.delivered, seconds=float(LEASE) + 15, message="B never delivered A's webhook")
    receiver.server.shutdown()
    assert receiver.delivered() == [f"msg_{job_id}"]


def test_a_user_job_resumes_after_sigkill_with_an_encryption_key(replicas, emu, postgres_url):
    emu.set_faults(latency_s=2.5)
    a, b = replicas(REPLICATE_CONCURRENT_LIMIT="2", TOKEN_ENCRYPTION_KEY=Fernet.generate_key().decode())
    user = {"X-Replicate-API-Key": USER_TOKEN}
    job_id = submit(a, [f"mine {i}" for i in range(6)], headers=user)
    wait_for(lambda: len(emu.predictions()) >= 2, seconds=10)
    dump = database_dump(postgres_url)
    assert USER_TOKEN not in dump and '"token_sealed": "gAAAA' in dump  # sealed, never in clear
    a.kill()
    # Nobody calls with the user's token: B opens the sealed one (the admin only watches).
    job = finished_job(b.get, job_id, seconds=float(LEASE) + 60)
    assert job["status"] == "succeeded" and job["counts"]["succeeded"] == 6
    assert emu.stats()["by_token"][USER_TOKEN]["creates"] == 6
    dump = database_dump(postgres_url)
    assert USER_TOKEN not in dump and '"token_sealed": null' in dump  # erased once the job ended


def test_two_replicas_starting_at_once_on_an_empty_database_create_the_schema_once(replicas, emu, postgres_url):
    a, b = replicas()  # started together; each migrates at start-up
    with psycopg.connect(postgres_url) as connection:
        versions = [r[0] for r in connection.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, LATEST + 1))
    assert finished_job(b.get, submit(a, ["after start"]))["status"] == "succeeded"


def test_a_new_version_migrates_an_older_schema_and_resumes_its_jobs(replicas, emu, postgres_url):
    old = open_database(postgres_url, "")
    try:
        assert migrate(old, upto=1) == [1]
        with old.transaction() as tx:  # an unfinished job, as the release before claims wrote it
            tx.query("INSERT INTO jobs (id, owner, kind, model, params, folder, status, created_at) VALUES "
                     "('job_legacy', 'admin', 'job', 'flux-dev', '{}', 'legacy', 'running', ?)", (time.time(),))
            tx.query("INSERT INTO items (job_id, idx, prompt, stem, status) VALUES "
                     "('job_legacy', 0, 'from the old release', 'old', 'queued')")
    finally:
        old.close()
    [a] = replicas(1)
    job = finished_job(a.get, "job_legacy")
    assert job["status"] == "succeeded" and job["items"][0]["urls"][0].endswith("/legacy/old.webp")
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == LATEST
