"""A model chosen on the web UI's Training Jobs page (an earlier one: a roll back) decides the live stream as soon as
models.updated arrives, not at the worker's catalogue poll (30 s)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from tests.inference.test_worker import RATE, WARMUP_SEQ0, _live, _stream, _wait_workers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "streamlit_apps"))


def _job(conn, user_id: int, queued: str) -> int:
    with conn.cursor() as cur:
        cur.execute("""INSERT INTO training_jobs (user_id, status, progress, created_at, finished_at)
                       VALUES (%s, 'completed', 100, now() - %s::interval, now()) RETURNING id""", (user_id, queued))
        return cur.fetchone()[0]


def test_an_earlier_model_chosen_in_the_web_ui_decides_at_once(workers, model_user, db_conn, clean_db):
    import data  # the web UI's data access: what its "Serve this model" button calls

    from ml_model.rest.demo_models import insert_artifact, random_artifact
    from tests.inference.conftest import announce_model

    uid, dev, meta = model_user()
    earlier = meta["artifact_id"]
    with db_conn.cursor() as cur:  # the earlier model's training was asked for first
        cur.execute("UPDATE model_artifacts SET job_id = %s WHERE id = %s", (_job(db_conn, uid, "2 hours"), earlier))
    weights, new_meta = random_artifact(8, RATE, seed=42, classes=("REST", "x", "y"))
    newest = insert_artifact(clean_db, uid, weights, new_meta, job_id=_job(db_conn, uid, "1 hour"))
    announce_model(uid, newest)
    workers(1)
    _wait_workers(db_conn, 1)

    async def scenario() -> tuple[list, float]:
        nc, coll = await _live([(uid, dev)])
        deadline = time.monotonic() + 30
        while not any(d.model_id == newest for d in coll.of(uid)):
            assert time.monotonic() < deadline, "the newest model never decided"
            await asyncio.sleep(0.1)
        stream = asyncio.create_task(_stream(nc, [(uid, dev)], 1000, speed=1.0))  # 5 s, far less than the poll
        await asyncio.sleep(1.0)
        chosen_at = time.time()
        await asyncio.to_thread(data.serve_model, uid, earlier)
        await stream
        await asyncio.sleep(1.0)
        await nc.close()
        return [d for d in coll.of(uid) if d.seq < WARMUP_SEQ0], chosen_at

    decided, chosen_at = asyncio.run(scenario())
    assert any(d.model_id == newest for d in decided if d.decided_time < chosen_at)
    after = [d for d in decided if d.decided_time > chosen_at]
    assert after and after[-1].model_id == earlier, [d.model_id for d in after[-5:]]
    switched = next(i for i, d in enumerate(after) if d.model_id == earlier)
    assert all(d.model_id == earlier for d in after[switched:])  # and it stays
