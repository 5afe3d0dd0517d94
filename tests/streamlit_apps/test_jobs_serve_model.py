"""Jobs page: which model live recognition uses, "Serve this model" on another finished job's model (roll back
without retraining) and "Serve the newest model instead" on a chosen one; the change is announced on
models.updated so that the API and the inference workers switch at once."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from ui_checks import assert_clean, texts

from semg import repo


class Announcements:
    """models.updated messages, received on a NATS connection of its own thread (the page runs synchronously)."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self._ready, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)

    async def _listen(self) -> None:
        from semg import natsio
        from semg.messages import MODELS_UPDATED, ModelUpdated

        nc = await natsio.connect("admin")

        async def got(msg) -> None:
            self.seen.append(ModelUpdated.model_validate_json(msg.data).model_dump())

        await nc.subscribe(MODELS_UPDATED, cb=got)
        await nc.flush()
        self._ready.set()
        for _ in range(600):  # at most a minute
            if self._stop.is_set():
                break
            await asyncio.sleep(0.1)
        await nc.close()

    def __enter__(self) -> Announcements:
        self._thread.start()
        assert self._ready.wait(30), "could not subscribe to models.updated"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(70)

    def wait_for(self, artifact_id: int) -> dict:
        deadline = time.monotonic() + 20
        while not any(m["artifact_id"] == artifact_id for m in self.seen):
            assert time.monotonic() < deadline, f"models.updated for model {artifact_id} not sent: {self.seen}"
            time.sleep(0.05)
        return next(m for m in self.seen if m["artifact_id"] == artifact_id)


@pytest.fixture
def two_jobs(seeded):
    """The seeded user's completed job (older) and a second, newer completed job: each with a model."""
    import ui_seed

    conn, uid = seeded["conn"], seeded["user"]["id"]
    newer = ui_seed.seed_job(conn, uid, [seeded["session"]["id"]])
    older = repo.get_job(conn, seeded["job"]["id"])
    for job in (older, newer):
        ui_seed.make_servable(conn, job["artifact_id"])
    return {"user_id": uid, "older": older, "newer": newer, "conn": conn}


def _show(page, uid: int, job_id: int):
    at = page("jobs", user_id=uid)
    at.run()
    at.selectbox(key="jobs_pick").set_value(job_id)
    at.run()
    assert_clean(at)
    return at


def _focus_targets(at) -> list[str]:
    """What uikit.focus_after_rerun asked this run to put the keyboard focus on (its script's targets)."""
    import json
    import re

    for el in at.get("html"):
        if m := re.search(r"const targets = (\[.*?\]), deadline", str(el.proto.body)):
            return json.loads(m.group(1))
    return []


def _button(at, label: str):
    found = [b for b in at.button if b.label == label]
    return found[0] if found else None


def test_an_earlier_model_is_served_from_its_job_and_the_newest_again(page, two_jobs):
    uid, older, newer, conn = two_jobs["user_id"], two_jobs["older"], two_jobs["newer"], two_jobs["conn"]
    assert repo.latest_model(conn, uid)["id"] == newer["artifact_id"]

    at = _show(page, uid, newer["id"])
    assert "live recognition uses this model, the model of the newest training" in texts(at)
    assert _button(at, "Serve this model") is None and _button(at, "Serve the newest model instead") is None

    at = _show(page, uid, older["id"])
    shown = texts(at)
    assert f"Not served: live recognition uses model #{newer['artifact_id']} of job #{newer['id']}" in shown
    serve = _button(at, "Serve this model")
    assert serve is not None and "the model that training stores replaces it" in serve.help
    table = at.dataframe[0].value
    assert list(table["model"]) == [f"#{newer['artifact_id']} · served", f"#{older['artifact_id']}"]

    with Announcements() as sent:
        serve.click().run()
        assert_clean(at)
        assert sent.wait_for(older["artifact_id"]) == {"v": 1, "userid": uid, "job_id": older["id"],
                                                        "artifact_id": older["artifact_id"]}
    served = repo.latest_model(conn, uid)
    assert served["id"] == older["artifact_id"] and served["chosen_at"] is not None
    shown = texts(at)
    assert "live recognition uses this model: you chose it" in shown
    # the clicked button is gone: the keyboard focus goes to the one in its place
    assert _focus_targets(at) == ["Serve the newest model instead", f"Job #{older['id']} — completed"]
    assert _button(at, "Serve this model") is None
    back = _button(at, "Serve the newest model instead")
    assert back is not None and "newest training job" in back.help

    at2 = _show(page, uid, newer["id"])  # the newer job's model is no longer served, and says by what
    assert (f"Not served: live recognition uses model #{older['artifact_id']} of job #{older['id']}, chosen"
            in texts(at2))
    assert list(at2.dataframe[0].value["model"]) == [f"#{newer['artifact_id']}",
                                                     f"#{older['artifact_id']} · served"]

    with Announcements() as sent:
        back.click().run()
        assert_clean(at)
        sent.wait_for(newer["artifact_id"])
    assert repo.latest_model(conn, uid)["id"] == newer["artifact_id"]
    assert repo.latest_model(conn, uid)["chosen_at"] is None
    assert _button(at, "Serve this model") is not None and _button(at, "Serve the newest model instead") is None
    assert _focus_targets(at) == ["Serve this model", f"Job #{older['id']} — completed"]


def test_the_live_page_shows_the_chosen_model(page, two_jobs):
    """The Realtime page names the model live recognition uses: the chosen one, not the newest."""
    uid, older, conn = two_jobs["user_id"], two_jobs["older"], two_jobs["conn"]
    repo.choose_served_model(conn, uid, older["artifact_id"])
    at = page("live", user_id=uid)
    at.run()
    assert_clean(at)
    assert f"Model #{older['artifact_id']} ·" in texts(at)


def test_a_model_that_does_not_load_is_not_served(page, two_jobs):
    """"Serve this model" on a model whose weights do not load says so and changes nothing (before, it was stored
    as chosen and the page said it was served, while the API kept the previous model)."""
    uid, older, newer, conn = two_jobs["user_id"], two_jobs["older"], two_jobs["newer"], two_jobs["conn"]
    with conn.cursor() as cur:
        cur.execute("UPDATE model_artifacts SET weights = %s WHERE id = %s", (b"not a model", older["artifact_id"]))
    at = _show(page, uid, older["id"])
    with Announcements() as sent:
        _button(at, "Serve this model").click().run()
        time.sleep(1)  # an announcement would have been sent before the click's run ended; none may come
        assert sent.seen == []
    assert any(e.value.startswith(f"Not served: model {older['artifact_id']} cannot be served: it does not load")
               for e in at.error), [e.value for e in at.error]
    served = repo.latest_model(conn, uid)
    assert (served["id"], served["chosen_at"]) == (newer["artifact_id"], None)
