"""The model served to a user (semg.repo.SERVED_MODELS_SQL) against the real database: the model of the training
job queued last (not the one that finished last), a model the user chose, and what ends a choice."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from semg import db, repo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "streamlit_apps"))
import ui_seed  # noqa: E402  (a completed session to schedule a real job on)
from test_repo_races import _Call, _lock_waiting, _until  # noqa: E402  (calls held by row locks, in threads)


@pytest.fixture
def user(clean_db):
    return repo.create_user(clean_db, "Ann", "ann@example.org")


def _job(conn, user_id: int, queued: str) -> int:
    """A completed training job queued `queued` (a PostgreSQL interval) before now."""
    with conn.cursor() as cur:
        cur.execute("""INSERT INTO training_jobs (user_id, status, progress, created_at, started_at, finished_at)
                       VALUES (%s, 'completed', 100, now() - %s::interval, now() - %s::interval, now())
                       RETURNING id""", (user_id, queued, queued))
        return cur.fetchone()[0]


def _model(conn, user_id: int | None, job_id: int | None, stored: str = "0 s") -> int:
    """A model stored `stored` before now (the columns the rule reads are real; the weights are not read)."""
    with conn.cursor() as cur:
        cur.execute("""INSERT INTO model_artifacts (user_id, job_id, weights, sha256, size_bytes, classes, channels,
                           sample_rate_hz, window_ms, step_ms, scaler, metadata, created_at)
                       VALUES (%s, %s, '\\x00', 'x', 1, '["REST", "fist"]', '{0}', 200, 200, 50, '{}', '{}',
                               now() - %s::interval) RETURNING id""", (user_id, job_id, stored))
        return cur.fetchone()[0]


def _served(conn, user_id: int) -> tuple[int | None, bool]:
    m = repo.latest_model(conn, user_id)
    return (m["id"], m["chosen_at"] is not None) if m else (None, False)


def test_the_model_of_the_job_queued_last_is_served_not_the_one_that_finished_last(clean_db, user):
    """A long from-scratch job queued before a quick fine-tuning job finished after it: its model, of the older
    request, replaced the newer one's."""
    uid = user["id"]
    long_job, quick_job = _job(clean_db, uid, "2 hours"), _job(clean_db, uid, "1 hour")
    quick = _model(clean_db, uid, quick_job, stored="50 minutes")
    slow = _model(clean_db, uid, long_job, stored="1 minute")  # finished last
    _model(clean_db, None, None)  # a shared base stored after both is nobody's served model
    assert _served(clean_db, uid) == (quick, False)
    assert repo.served_models(clean_db) == {uid: {"artifact_id": quick, "chosen_at": None}}
    listed = {m["id"]: m["served"] for m in repo.list_models(clean_db, uid)}
    assert listed == {quick: True, slow: False}
    # a model without a job (its job deleted) counts as asked for when it was stored
    orphan = _model(clean_db, uid, None, stored="10 minutes")
    assert _served(clean_db, uid) == (orphan, False)


def test_a_chosen_model_is_served_until_a_job_queued_after_the_choice_stores_one(clean_db, user):
    uid = user["id"]
    older = _model(clean_db, uid, _job(clean_db, uid, "3 hours"), stored="2 hours")
    newer = _model(clean_db, uid, _job(clean_db, uid, "1 hour"), stored="30 minutes")
    running = _job(clean_db, uid, "10 minutes")  # queued before the choice
    assert _served(clean_db, uid) == (newer, False)

    chosen = repo.choose_served_model(clean_db, uid, older)
    assert chosen["id"] == older and chosen["chosen_at"] is not None
    assert _served(clean_db, uid) == (older, True)
    listed = {m["id"]: (m["served"], m["chosen_at"]) for m in repo.list_models(clean_db, uid)}
    assert listed == {older: (True, chosen["chosen_at"]), newer: (False, None)}

    # the job queued before the choice ends after it: the choice stands
    _model(clean_db, uid, running)
    assert _served(clean_db, uid) == (older, True)

    # a training asked for after the choice replaces it
    after = _model(clean_db, uid, _job(clean_db, uid, "0 s"))
    assert _served(clean_db, uid) == (after, False)
    assert repo.served_models(clean_db, [uid]) == {uid: {"artifact_id": after, "chosen_at": None}}


def test_going_back_to_the_newest_model_forgets_the_choice(clean_db, user):
    uid = user["id"]
    older = _model(clean_db, uid, _job(clean_db, uid, "2 hours"), stored="1 hour")
    newer = _model(clean_db, uid, _job(clean_db, uid, "1 hour"))
    repo.choose_served_model(clean_db, uid, older)
    assert _served(clean_db, uid) == (older, True)
    back = repo.serve_newest_model(clean_db, uid)
    assert back["id"] == newer and back["chosen_at"] is None
    assert _served(clean_db, uid) == (newer, False)
    # the newest model can be chosen too (served as chosen)
    repo.choose_served_model(clean_db, uid, newer)
    assert _served(clean_db, uid) == (newer, True)
    other = repo.create_user(clean_db, "Bob", "bob@example.org")
    assert repo.serve_newest_model(clean_db, other["id"]) is None  # no model: nothing to serve, no error
    with pytest.raises(repo.NotFound, match="user 999999 not found"):
        repo.serve_newest_model(clean_db, 999999)


def test_another_users_model_a_shared_base_or_a_missing_one_cannot_be_chosen(clean_db, user):
    uid = user["id"]
    mine = _model(clean_db, uid, _job(clean_db, uid, "1 hour"))
    other = repo.create_user(clean_db, "Bob", "bob@example.org")
    theirs = _model(clean_db, other["id"], _job(clean_db, other["id"], "1 hour"))
    base = _model(clean_db, None, None)
    for artifact_id in (theirs, base, 424242):
        with pytest.raises(repo.NotFound, match=f"user {uid} has no model {artifact_id}"):
            repo.choose_served_model(clean_db, uid, artifact_id)
    with pytest.raises(repo.NotFound, match="user 999999 not found"):
        repo.choose_served_model(clean_db, 999999, mine)
    assert _served(clean_db, uid) == (mine, False) and _served(clean_db, other["id"]) == (theirs, False)


def test_deleting_the_chosen_model_falls_back_to_the_newest_never_to_none(clean_db, user):
    """No page or endpoint deletes one model (only a user with all theirs): deleted here in SQL, as an operator
    could; the choice goes with it (ON DELETE SET NULL)."""
    uid = user["id"]
    older = _model(clean_db, uid, _job(clean_db, uid, "2 hours"), stored="1 hour")
    newer = _model(clean_db, uid, _job(clean_db, uid, "1 hour"))
    repo.choose_served_model(clean_db, uid, older)
    with clean_db.cursor() as cur:
        cur.execute("DELETE FROM model_artifacts WHERE id = %s", (older,))
        cur.execute("SELECT served_artifact_id FROM users WHERE id = %s", (uid,))
        assert cur.fetchone()[0] is None
    assert _served(clean_db, uid) == (newer, False)
    # and deleting a user whose chosen model goes first (delete_user deletes models one by one) works
    repo.choose_served_model(clean_db, uid, newer)
    repo.delete_user(clean_db, uid)
    assert repo.served_models(clean_db) == {}


def test_a_choice_and_a_job_scheduled_at_the_same_time_agree_with_the_order_they_were_stored(clean_db):
    """now() is when a transaction started, not when it committed: a job whose scheduling transaction started
    before the choice's but was stored after it was taken for one asked for before the choice, so its model never
    replaced the choice (though the user saw the job appear after choosing). Held here mid-scheduling by a lock on
    its session; whichever of the two is stored first, the rule must follow that order."""
    base = ui_seed.seed_user(clean_db)
    uid, did = base["user"]["id"], base["device"]["id"]
    session = ui_seed.seed_session(clean_db, uid, did, datetime.now(UTC) - timedelta(minutes=5), repetitions=2)
    older = _model(clean_db, uid, _job(clean_db, uid, "2 hours"), stored="1 hour")
    _model(clean_db, uid, _job(clean_db, uid, "1 hour"))
    clean_db.commit()
    holder = db.connect()
    try:
        with holder.cursor() as cur:  # the job's session link waits on it: scheduling is held before its commit
            cur.execute("SELECT 1 FROM capture_sessions WHERE id = %s FOR UPDATE", (session["id"],))
        job = _Call(repo.schedule_job, uid, [session["id"]], {"epochs": 1})
        job.start()
        _until(lambda: _lock_waiting(clean_db, job.pid), "the scheduling to wait on the held session")
        choice = _Call(repo.choose_served_model, uid, older)
        choice.start()
        _until(lambda: not choice.is_alive() or _lock_waiting(clean_db, choice.pid), "the choice to settle")
        choice_stored_first = not choice.is_alive()
    finally:
        holder.rollback()
        holder.close()
    job.join(20)
    choice.join(20)
    assert not job.is_alive() and not choice.is_alive()
    assert job.error is None and choice.error is None, (job.error, choice.error)
    trained = _model(clean_db, uid, job.result["id"])  # the job ends and stores its model
    expected = (trained, False) if choice_stored_first else (older, True)
    assert _served(clean_db, uid) == expected, f"choice stored {'before' if choice_stored_first else 'after'} the job"
