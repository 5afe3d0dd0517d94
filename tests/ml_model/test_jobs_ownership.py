"""A job belongs to the worker that claimed it, through the real database: a cancel that arrives while the
model is saved wins; a job another worker runs is never trained twice; a worker that stalled past the stale
timeout changes nothing of the recovered job; the model and `completed` are committed together; a worker
that loses its database connection mid-job survives and the job is not stuck.

Timing is forced by wrapping one step of the real code (artifacts.save_artifact, load_job_data) the way a
slow machine would interleave it; the queue, the SQL and the database are the real ones."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time

import pytest
from test_jobs import REPO, record_session, train_in_background

from ml_model import artifacts, jobs
from semg import db, repo

OTHER = "other-host:4242"  # a second worker, on another machine


def n_artifacts(conn, job_id):
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM model_artifacts WHERE job_id = %s", (job_id,))
        return cur.fetchone()[0]


@pytest.fixture
def published(monkeypatch):
    """models.updated messages the jobs would send (NATS itself is not what these tests are about)."""
    sent = []
    monkeypatch.setattr(jobs, "_publish_model_updated", lambda s, user_id, job_id, artifact_id: sent.append(job_id))
    return sent


def _take_over(job_id, retake: bool):
    """What the other workers do while the first one is frozen: its heartbeat is stale, stale recovery
    re-queues (or fails) the job, and with `retake` another worker claims it. One transaction, so the frozen
    worker's heartbeat thread cannot slip a beat in between."""
    with contextlib.closing(db.connect()) as c:
        with c.cursor() as cur:
            cur.execute("UPDATE training_jobs SET heartbeat_at = now() - interval '10 minutes' WHERE id = %s",
                        (job_id,))
        assert jobs.recover_stale_jobs(c) == [job_id]  # commits the stale heartbeat with it
        if retake:
            assert jobs.claim_next(c, OTHER) == job_id


def test_cancel_while_the_model_is_saved_ends_canceled_and_serves_nothing(clean_db, user_device, monkeypatch,
                                                                           published):
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"])
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 3})
    real_save = artifacts.save_artifact
    answer = {}

    def save_while_the_user_cancels(*a, **kw):  # after the last progress callback: no epoch sees the cancel
        with contextlib.closing(db.connect()) as c:
            answer.update(repo.cancel_job(c, job["id"]))  # what POST /jobs/{id}/cancel does
        return real_save(*a, **kw)

    monkeypatch.setattr(artifacts, "save_artifact", save_while_the_user_cancels)
    assert jobs.run_job(job["id"]) == "canceled"
    assert answer["status"] == "in-progress" and answer["cancel_requested"]
    j = repo.get_job(clean_db, job["id"])
    assert j["status"] == "canceled" and j["finished_at"] and j["artifact_id"] is None
    assert repo.latest_model(clean_db, u["id"]) is None and published == []
    assert "no model was stored" in repo.job_logs(clean_db, job["id"])[-1]["message"]


def test_a_job_another_worker_runs_is_never_trained_again(clean_db, user_device, published):
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"])
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 3})
    assert jobs.claim_next(clean_db, OTHER) == job["id"]
    before = repo.get_job(clean_db, job["id"])
    errors = []

    def train_it():
        try:
            errors.append(jobs.run_job(job["id"]))
        except jobs.JobUnavailable as e:
            errors.append(e)

    threads = [threading.Thread(target=train_it) for _ in range(2)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert len(errors) == 2 and all(isinstance(e, jobs.JobUnavailable) for e in errors), errors
    assert "in-progress" in str(errors[0]) and OTHER in str(errors[0])
    # the CLI says so (exit 2) and leaves the job alone
    r = subprocess.run([sys.executable, str(REPO / "ml_model" / "TrainMLJob.py"), "train", str(job["id"])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "only a scheduled job can be trained" in r.stderr, (r.returncode, r.stderr)
    j = repo.get_job(clean_db, job["id"])
    assert (j["status"], j["worker"], j["attempts"], j["error"]) == ("in-progress", OTHER, 1, None)
    assert j["heartbeat_at"] == before["heartbeat_at"]
    assert n_artifacts(clean_db, job["id"]) == 0 and published == []


def test_cli_train_claims_the_job_and_beats_its_heartbeat(clean_db, user_device, monkeypatch, published):
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"])
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 3})
    monkeypatch.setattr(jobs, "HEARTBEAT_S", 0.1)
    real_load = jobs.load_job_data
    seen = {}

    def slow_load(conn, job_id, *args, **kwargs):  # loading takes a while: no progress callback beats meanwhile
        with contextlib.closing(db.connect()) as c:
            seen["claimed"] = repo.get_job(c, job_id)
            time.sleep(1.0)
            seen["later"] = repo.get_job(c, job_id)
        return real_load(conn, job_id, *args, **kwargs)

    monkeypatch.setattr(jobs, "load_job_data", slow_load)
    assert jobs.run_job(job["id"]) == "completed"
    claimed = seen["claimed"]
    assert claimed["status"] == "in-progress" and claimed["worker"] == jobs._worker_name()
    assert claimed["attempts"] == 1
    assert seen["later"]["heartbeat_at"] > claimed["heartbeat_at"]
    j = repo.get_job(clean_db, job["id"])
    assert j["status"] == "completed" and n_artifacts(clean_db, job["id"]) == 1 and published == [job["id"]]


@pytest.mark.parametrize("then", ["failed", "retaken"])
def test_a_stalled_worker_cannot_overwrite_the_recovered_job(clean_db, user_device, monkeypatch, published, then):
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"])
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 3})
    if then == "failed":  # the worker's claim is the last attempt: stale recovery fails the job
        with clean_db.cursor() as cur:
            cur.execute("UPDATE training_jobs SET attempts = %s WHERE id = %s", (jobs.MAX_ATTEMPTS - 1, job["id"]))
    real_save = artifacts.save_artifact

    def freeze_then_save(*a, **kw):  # the worker "freezes" here (paused VM) past the stale timeout
        _take_over(job["id"], retake=then == "retaken")
        return real_save(*a, **kw)

    monkeypatch.setattr(artifacts, "save_artifact", freeze_then_save)
    assert jobs.run_job(job["id"]) == "lost"
    j = repo.get_job(clean_db, job["id"])
    if then == "failed":
        assert j["status"] == "failed" and "stopped responding" in j["error"]
    else:
        assert (j["status"], j["worker"], j["progress"], j["epoch_metrics"]) == ("in-progress", OTHER, 0, [])
    assert n_artifacts(clean_db, job["id"]) == 0 and repo.latest_model(clean_db, u["id"]) is None
    assert published == []
    assert "lost this job" in repo.job_logs(clean_db, job["id"])[-1]["message"]


def test_a_worker_that_lost_its_job_stops_training_and_beating(clean_db, user_device, published):
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"], reps=4)
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 500})
    t, result = train_in_background(clean_db, job["id"])
    _take_over(job["id"], retake=True)
    t.join(120)
    assert result["status"] == "lost"  # its next progress update matched no row: training stopped
    j = repo.get_job(clean_db, job["id"])
    assert (j["status"], j["worker"], j["progress"], j["epoch_metrics"]) == ("in-progress", OTHER, 0, [])
    # nor does its heartbeat keep the other worker's job alive
    with clean_db.cursor() as cur:
        cur.execute("UPDATE training_jobs SET heartbeat_at = now() - interval '1 minute' WHERE id = %s", (job["id"],))
    assert not jobs._Heartbeat(None, job["id"], jobs._worker_name()).beat()
    assert jobs._Heartbeat(None, job["id"], OTHER).beat()
    assert n_artifacts(clean_db, job["id"]) == 0 and published == []


@pytest.fixture
def commit_of_completed_fails(clean_db):
    """A real PostgreSQL error at the COMMIT that marks a job completed (deferred constraint trigger)."""
    with clean_db.cursor() as cur:
        cur.execute("""CREATE FUNCTION test_fail_completion() RETURNS trigger LANGUAGE plpgsql AS
                       $$ BEGIN RAISE EXCEPTION 'injected failure at commit'; END $$""")
        cur.execute("""CREATE CONSTRAINT TRIGGER test_fail_completion AFTER UPDATE ON training_jobs
                       DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.status = 'completed')
                       EXECUTE FUNCTION test_fail_completion()""")
    yield
    with clean_db.cursor() as cur:
        cur.execute("DROP TRIGGER IF EXISTS test_fail_completion ON training_jobs")
        cur.execute("DROP FUNCTION IF EXISTS test_fail_completion()")


def test_model_and_completion_commit_together(clean_db, user_device, published, commit_of_completed_fails):
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"])
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 3})
    assert jobs.run_job(job["id"]) == "failed"
    j = repo.get_job(clean_db, job["id"])
    assert j["status"] == "failed" and "injected failure at commit" in j["error"]
    assert n_artifacts(clean_db, job["id"]) == 0 and repo.latest_model(clean_db, u["id"]) is None
    assert published == []


def test_worker_survives_losing_its_database_connection(clean_db, user_device, monkeypatch, published):
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"], reps=4)
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 500})
    real_connect = db.connect
    # the worker's connections get their own name so that exactly those are cut below
    monkeypatch.setattr(db, "connect", lambda *a, **kw: real_connect(*a, **{**kw,
                                                                          "application_name": "semg-test-worker"}))
    stop = threading.Event()
    outcome = {}

    def run():
        try:
            jobs.worker_loop(poll_s=0.2, stop=stop)
            outcome["exit"] = "returned"
        except BaseException as e:  # noqa: BLE001 - what the test looks for
            outcome["exit"] = f"raised {type(e).__name__}: {e}"

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 120
        while repo.get_job(clean_db, job["id"])["progress"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        with clean_db.cursor() as cur:  # a database restart / failover, as the worker sees it
            cur.execute("""SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                           WHERE application_name = 'semg-test-worker'""")
            assert cur.fetchone()[0] >= 1
        # the job goes back to the queue and the surviving worker takes it again
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            j = repo.get_job(clean_db, job["id"])
            if j["attempts"] >= 2 and j["status"] == "in-progress" or not t.is_alive():
                break
            time.sleep(0.2)
        assert t.is_alive(), outcome
        assert j["attempts"] == 2 and j["status"] == "in-progress", j
        assert any("database connection lost" in r["message"] for r in repo.job_logs(clean_db, job["id"]))
        repo.cancel_job(clean_db, job["id"])
        deadline = time.monotonic() + 120
        while repo.get_job(clean_db, job["id"])["status"] == "in-progress" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert repo.get_job(clean_db, job["id"])["status"] == "canceled"
    finally:
        stop.set()
        t.join(120)
    assert outcome.get("exit") == "returned", outcome
    assert n_artifacts(clean_db, job["id"]) == 0 and published == []
