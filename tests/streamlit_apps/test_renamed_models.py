"""A gesture renamed after its model was trained: what the Gesture Management and Real-time pages say live
recognition answers (the API follows the rename: tests/api/test_predict.py)."""

from __future__ import annotations

from psycopg2.extras import Json
from ui_checks import assert_clean, texts

from semg import repo


def _button(at, label: str):
    return next(b for b in at.button if b.label == label)


def _learnt_from(conn, job_id: int, session: dict) -> None:
    """Give the seeded model what a training job records of the intervals it learnt from (meta["data"])."""
    intervals = [[iv["id"], iv["label"], iv["repetition"], 0, 1] for iv in repo.get_session(conn, session["id"])["intervals"]]
    with conn.cursor() as cur:
        cur.execute("UPDATE model_artifacts SET metadata = %s WHERE job_id = %s",
                    (Json({"data": {"sessions": [{"id": session["id"], "intervals": intervals}]}}), job_id))
    conn.commit()


def _rename(page, uid: int, gid: int, old: str, new: str):
    at = page("gestures", user_id=uid)
    at.run()
    at.selectbox(key="edit_gesture").set_value(gid).run()
    next(t for t in at.text_input if t.value == old).input(new)
    _button(at, "Save").click()
    at.run()
    assert_clean(at)
    return " ".join(t.value for t in at.info)


def test_a_rename_is_answered_live_without_retraining_and_the_pages_say_so(page, seeded):
    conn, uid = seeded["conn"], seeded["user"]["id"]
    _learnt_from(conn, seeded["job"]["id"], seeded["session"])
    fist = next(g for g in repo.list_gestures(conn, uid) if g["name"] == "fist")
    said = _rename(page, uid, fist["id"], "fist", "power grip")
    assert "Live recognition answers power grip within 30 s, without retraining" in said, said
    assert "until you train" not in said
    live = page("live", user_id=uid)
    live.run()
    assert_clean(live)
    shown = texts(live)
    assert "classes REST, power grip, open hand" in shown and "renamed since: fist → power grip" in shown, shown


def test_a_model_that_does_not_know_what_it_learnt_from_keeps_its_old_names_and_says_so(page, seeded):
    """Models trained before jobs recorded their intervals cannot follow a rename: the page says so."""
    conn, uid = seeded["conn"], seeded["user"]["id"]
    fist = next(g for g in repo.list_gestures(conn, uid) if g["name"] == "fist")
    said = _rename(page, uid, fist["id"], "fist", "power grip")
    assert "Live recognition still answers fist until you train a new model" in said, said
    live = page("live", user_id=uid)
    live.run()
    assert "classes REST, fist, open hand" in texts(live) and "renamed since" not in texts(live)
