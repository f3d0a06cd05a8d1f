"""The job journal on both of its databases: SQLite (a file) and PostgreSQL (a real server),
the same tests for each. Two `Journal`s on one database stand for two replicas."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from gateway.errors import ServiceError
from gateway.jobs.database import Conflict, DatabaseUnavailable, SqliteDatabase, open_database
from gateway.jobs.journal import Journal, replica_prefix
from gateway.jobs.migrations import LATEST, migrate, schema_version
from gateway.jobs.replica import ReplicaIdentity

from helpers import ADMIN, finished_job, free_port, wait_for

A, B = "host-a:5003/aaaa", "host-b:5003/bbbb"
PASSWORD = "a-password-never-shown-1234"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """A function that opens one more connection (a replica) to one fresh database."""
    if request.param == "postgresql":
        url, path = request.getfixturevalue("postgres_url"), None
    else:
        url, path = None, str(tmp_path / "jobs.sqlite3")
    opened = []

    def open_one():
        opened.append(open_database(url, path))
        return opened[-1]

    yield open_one
    for db in opened:
        db.close()


@pytest.fixture
def journal(database) -> Journal:
    return Journal(database())


def add(journal: Journal, job_id: str, owner: str = "admin", replica: str | None = A, lease: float = 30,
        items: int = 2, **extra) -> None:
    journal.add_job({"id": job_id, "owner": owner, "kind": "job", "model": "flux-dev", "params": {"seed": 1},
                     "folder": f"folder-{job_id}", **extra},
                    [(i, f"prompt {i}", f"stem{i}") for i in range(items)], replica=replica, lease=lease)


def finish(journal: Journal, job_id: str, ago: float = 0.0) -> None:
    journal.set_job(job_id, status="succeeded", finished_at=time.time() - ago)


def test_jobs_and_items_round_trip(journal):
    before = time.time()
    add(journal, "j1", idempotency_key="k", request_hash="h", webhook="http://x/y")
    job = journal.job("j1")
    assert job["owner"] == "admin" and job["status"] == "queued" and job["webhook_delivered"] == 0
    assert before - 1 <= job["created_at"] <= time.time() + 1
    assert abs(job["created_at"] - before) < 0.5  # a full float: PostgreSQL's 4-byte REAL would be off by minutes
    assert journal.by_idempotency_key("admin", "k")["id"] == "j1"
    assert journal.by_idempotency_key("user:x", "k") is None
    assert [(r["idx"], r["prompt"], r["stem"], r["status"], r["files"]) for r in journal.items("j1")] == [
        (0, "prompt 0", "stem0", "queued", "[]"), (1, "prompt 1", "stem1", "queued", "[]")]
    assert journal.job_of_folder("folder-j1")["id"] == "j1" and journal.job("nope") is None


def test_a_reused_idempotency_key_is_a_conflict_and_writes_nothing(journal):
    add(journal, "j1", idempotency_key="k")
    with pytest.raises(Conflict):
        add(journal, "j2", idempotency_key="k")
    assert journal.job("j2") is None and journal.items("j2") == []
    add(journal, "j3", owner="user:other", idempotency_key="k")  # keys are per owner


def test_item_updates_and_retry_reset(journal):
    add(journal, "j1")
    journal.mark_running("j1", 0, "p0", 100.0)
    journal.set_item("j1", 1, status="canceled", error="Canceled by request", files=[], finished_at=1.0)
    journal.mark_running("j1", 1, "p1", 101.0)  # a late create answer does not bring a canceled item back
    first, second = journal.items("j1")
    assert (first["status"], first["prediction_id"], first["started_at"]) == ("running", "p0", 100.0)
    assert (second["status"], second["prediction_id"]) == ("canceled", "p1")
    journal.set_item("j1", 0, status="succeeded", files=["/out/a.webp"])
    assert journal.items("j1")[0]["files"] == '["/out/a.webp"]'
    journal.reset_items("j1", [1])
    assert journal.items("j1")[1]["status"] == "queued" and journal.items("j1")[1]["prediction_id"] is None


def test_listing_is_newest_first_per_owner(journal):
    for n in range(3):
        add(journal, f"j{n}", owner="user:u" if n != 1 else "admin")
    assert [j["id"] for j in journal.jobs_of("user:u", 10, 0)] == ["j2", "j0"]
    assert [j["id"] for j in journal.jobs_of(None, 2, 1)] == ["j1", "j0"]
    assert {j["id"] for j in journal.unfinished_jobs()} == {"j0", "j1", "j2"}


def test_a_held_job_is_not_free_until_its_lease_runs_out(database):
    a, b = Journal(database()), Journal(database())
    add(a, "j1", replica=A)
    assert b.claim("j1", B, 30) is None          # A holds it
    assert b.adopt(B, 30, admin=True, sealed=True) == []
    a.set_job("j1", lease_until=time.time() - 1)  # A stopped renewing (timestamps: the database's clock)
    [adopted] = b.adopt(B, 30, admin=True, sealed=True)
    assert adopted["id"] == "j1" and adopted["claimed_by"] == B
    assert a.claim("j1", A, 30) is None          # and now B holds it
    assert b.renew(B, 30, {"j1"}) == {"j1"} and a.renew(A, 30, {"j1"}) == set()


def test_a_restart_on_the_same_host_and_port_takes_over_at_once(journal):
    earlier, restarted = "host-a:5003/0001", "host-a:5003/0002"
    assert replica_prefix(restarted) == "host-a:5003/"
    add(journal, "j1", replica=earlier)
    add(journal, "j2", replica="host-a:5004/0003")  # another replica on the same host
    assert [j["id"] for j in journal.adopt(restarted, 30, admin=True, sealed=False)] == ["j1"]


def test_adoption_takes_only_what_the_replica_can_run(journal):
    add(journal, "admin-job", lease=-1)
    add(journal, "sealed-user-job", owner="user:u1", lease=-1, token_sealed="gAAA...")
    add(journal, "user-job", owner="user:u2", lease=-1)
    assert journal.adopt(B, 30, admin=False, sealed=False) == []
    assert [j["id"] for j in journal.adopt(B, 30, admin=False, sealed=True)] == ["sealed-user-job"]
    assert [j["id"] for j in journal.adopt(B, 30, admin=True, sealed=True)] == ["admin-job"]
    assert [(j["id"], j["owner"]) for j in journal.orphans(B)] == [("user-job", "user:u2")]


def test_two_replicas_adopting_at_once_claim_each_job_once(database):
    seed = Journal(database())
    for n in range(30):
        add(seed, f"j{n:02}", lease=-1)
    replicas = {name: Journal(database()) for name in (A, B, "host-c:5003/cccc")}
    claimed: dict[str, list[str]] = {name: [] for name in replicas}

    def sweep(name: str) -> None:
        for _ in range(5):
            claimed[name] += [j["id"] for j in replicas[name].adopt(name, 30, admin=True, sealed=False, limit=4)]

    threads = [threading.Thread(target=sweep, args=(name,)) for name in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    every = [job_id for ids in claimed.values() for job_id in ids]
    assert sorted(every) == [f"j{n:02}" for n in range(30)]  # each once, none lost
    for name, ids in claimed.items():
        assert {j["id"] for j in seed.unfinished_jobs() if j["claimed_by"] == name} == set(ids)


def test_release_lets_others_adopt_at_once(database):
    a, b = Journal(database()), Journal(database())
    add(a, "j1", replica=A)
    add(a, "j2", replica=A)
    a.release("j1", A)
    assert [j["id"] for j in b.adopt(B, 30, admin=True, sealed=False)] == ["j1"]
    a.release_all(A)  # stopping
    assert [j["id"] for j in b.adopt(B, 30, admin=True, sealed=False)] == ["j2"]


def test_a_cancel_request_reaches_the_holder_only(database):
    a, b = Journal(database()), Journal(database())
    add(a, "j1", replica=A)
    add(a, "j2", replica=A)
    b.request_cancel("j1")
    assert a.cancel_requests(A) == ["j1"] and b.cancel_requests(B) == []
    a.cancel_unfinished_items("j1", "Canceled by request")
    assert {r["status"] for r in a.items("j1")} == {"canceled"}
    finish(a, "j2")
    b.request_cancel("j2")  # a finished job is not canceled any more
    assert a.job("j2")["cancel_requested"] == 0


def test_a_webhook_delivery_is_claimed_by_one_replica(database):
    a, b = Journal(database()), Journal(database())
    add(a, "j1", webhook="http://hooks/x")
    add(a, "j2", webhook="http://hooks/y")
    assert a.claim_webhooks(A, 30) == []          # not finished yet
    finish(a, "j1")
    finish(a, "j2")
    assert [j["id"] for j in a.claim_webhooks(A, 30, job_id="j1")] == ["j1"]
    assert [j["id"] for j in b.claim_webhooks(B, 30)] == ["j2"]  # j1 is being sent by A
    assert b.claim_webhooks(B, 30) == [] and a.claim_webhooks(A, 30) == []
    a.webhook_done("j1", delivered=True)
    b.set_job("j2", webhook_lease_until=time.time() - 1)  # B died mid-delivery
    assert [j["id"] for j in a.claim_webhooks(A, 30)] == ["j2"]
    a.webhook_done("j2", delivered=False)  # given up: not sent again
    assert a.claim_webhooks(A, 30) == [] and a.job("j2")["webhook_delivered"] == -1


def test_retention_removes_old_finished_jobs_that_nobody_holds(journal):
    add(journal, "old", replica=None)
    add(journal, "recent", replica=None)
    add(journal, "unfinished", replica=None)
    add(journal, "old-but-held", replica=A)
    finish(journal, "old", ago=40 * 86400)
    finish(journal, "recent", ago=86400)
    finish(journal, "old-but-held", ago=40 * 86400)  # its last run is still stopping somewhere
    assert journal.remove_finished(time.time() - 30 * 86400) == ["folder-old"]
    assert journal.job("old") is None and journal.items("old") == []
    assert {j["id"] for j in journal.jobs_of(None, 10, 0)} == {"recent", "unfinished", "old-but-held"}


def test_model_schemas_are_cached_and_replaced(journal):
    assert journal.load_schema("owner/name") is None
    journal.save_schema("owner/name", 1.5, {"a": 1})
    journal.save_schema("owner/name", 2.5, {"b": [2]})
    assert journal.load_schema("owner/name") == (2.5, {"b": [2]})


def test_an_older_schema_is_migrated_and_keeps_its_jobs(database):
    old = database()
    assert migrate(old, upto=1) == [1]
    with old.transaction() as tx:  # a job written by the release before claims existed
        tx.query("INSERT INTO jobs (id, owner, kind, model, params, folder, status, created_at) "
                 "VALUES ('legacy', 'admin', 'job', 'flux-dev', '{}', 'f', 'running', 1.0)")
    journal = Journal(database())
    assert schema_version(journal.db) == LATEST
    job = journal.job("legacy")
    assert job["claimed_by"] is None and job["cancel_requested"] == 0 and job["token_sealed"] is None
    assert [j["id"] for j in journal.adopt(B, 30, admin=True, sealed=False)] == ["legacy"]
    assert migrate(journal.db) == []  # nothing left to do


def test_migrations_racing_apply_each_version_once(database):
    connections = [database() for _ in range(4)]
    applied: list[list[int]] = []
    barrier = threading.Barrier(len(connections))

    def run(db) -> None:
        barrier.wait()
        applied.append(migrate(db))

    threads = [threading.Thread(target=run, args=(db,)) for db in connections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(v for versions in applied for v in versions) == list(range(1, LATEST + 1))
    rows = connections[0].query("SELECT version FROM schema_version ORDER BY version")
    assert [r["version"] for r in rows] == list(range(1, LATEST + 1))


def test_a_closed_journal_writes_nothing(tmp_path):
    journal = Journal(SqliteDatabase(str(tmp_path / "j.sqlite3")))
    journal.close()
    journal.set_job("x", status="failed")  # work winding down after stop: ignored
    assert journal.job("x") is None


def test_a_replica_slot_is_free_again_only_when_its_holder_is_gone(tmp_path):
    first, second = ReplicaIdentity(5003, str(tmp_path)), ReplicaIdentity(5003, str(tmp_path))
    assert replica_prefix(first.name) != replica_prefix(second.name)  # two workers of one host and port
    other_port = ReplicaIdentity(5004, str(tmp_path))
    assert replica_prefix(other_port.name).endswith(":5004.0/")
    first.release()  # gone (a dead process's lock goes the same way)
    again = ReplicaIdentity(5003, str(tmp_path))
    assert replica_prefix(again.name) == replica_prefix(first.name) and again.name != first.name
    for identity in (second, other_port, again):
        identity.release()


@pytest.mark.parametrize("delete_files", [False, True])
def test_finished_jobs_leave_the_journal_after_the_retention_period(make_service, emu, delete_files):
    service = make_service(JOB_RETENTION_DAYS=2 / 86400, DELETE_FILES_WITH_JOBS=str(delete_files).lower(),
                           CLAIM_LEASE_SECONDS=2)
    r = service.post("/jobs", {"model_name": "flux-dev", "prompt": "short-lived"}, ADMIN)
    job = finished_job(service.get, r.json()["job_id"])
    path = Path(job["items"][0]["files"][0])
    assert path.is_file()
    wait_for(lambda: service.get(f"/jobs/{job['job_id']}", headers=ADMIN).status_code == 404, seconds=15,
             message="the finished job was never removed")
    if delete_files:  # the folder goes right after the journal rows (rows first: a crash leaves files)
        wait_for(lambda: not path.exists(), seconds=5, message="the job's files were never removed")
    else:
        assert path.is_file()  # the files stay unless DELETE_FILES_WITH_JOBS


def test_an_unreachable_postgresql_is_named_without_its_password(make_service):
    port = free_port()  # nothing listens there
    with pytest.raises(DatabaseUnavailable) as caught:
        make_service(DATABASE_URL=f"postgresql://gateway:{PASSWORD}@127.0.0.1:{port}/jobs")
    assert "PostgreSQL" in str(caught.value) and PASSWORD not in str(caught.value)


def test_postgresql_going_away_answers_503_and_coming_back_serves_again(own_postgres_server, make_service, emu,
                                                                          caplog):
    """(The server is set up first, so it is stopped after the service.)"""
    url = own_postgres_server.create_database()
    service = make_service(DATABASE_URL=url)
    journal = service.app.extensions["gateway"].jobs.journal
    assert journal.problem() is None
    own_postgres_server.stop()
    assert "PostgreSQL" in journal.problem()
    r = service.get("/jobs", headers=ADMIN)
    assert r.status_code == 503 and "PostgreSQL" in r.json()["error"] and r.headers["Retry-After"]
    own_postgres_server.start()
    assert wait_for(lambda: service.get("/jobs", headers=ADMIN).status_code == 200, seconds=20)
    password = urlsplit(url).password
    assert password not in r.text and password not in caplog.text


def test_nul_characters_never_reach_the_database_as_an_error(journal):
    assert journal.job("job\x00x") is None and journal.job_of_folder("f\x00") is None
    if journal.db.dialect == "postgresql":  # its text cannot hold NUL: a 400 naming the prompt
        with pytest.raises(ServiceError) as caught:
            journal.add_job({"id": "j", "owner": "admin", "kind": "job", "model": "m", "params": {}, "folder": "f"},
                            [(0, "a\x00b", "s")])
        assert caught.value.status == 400 and caught.value.extra == {"field": "prompt"}
    else:
        journal.add_job({"id": "j", "owner": "admin", "kind": "job", "model": "m", "params": {}, "folder": "f"},
                        [(0, "a\x00b", "s")])
        assert journal.items("j")[0]["prompt"] == "a\x00b"
