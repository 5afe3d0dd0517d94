"""Capture sessions: the timing plan, and the actual start/end of the session and of each interval."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from ml_model.rest import queries
from ml_model.rest.auth import Caller, UserScoped
from ml_model.rest.deps import Conn
from ml_model.rest.schemas import (
    Interval,
    IntervalAdd,
    IntervalMark,
    PlannedInterval,
    PlanRequest,
    Session,
    SessionCreate,
    SessionEnd,
    SessionStart,
)
from semg import repo

router = APIRouter(tags=["capture sessions"])
PathId = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.post("/sessions/plan", response_model=list[PlannedInterval])
def plan(body: PlanRequest, _: Caller) -> list[dict]:
    """Preview a timing plan (nothing is stored): rest, gesture, rest, ... with offsets in ms."""
    return repo.plan_intervals(body.gestures, body.repetitions, body.hold_s, body.rest_s)


@router.get("/users/{user_id}/sessions", response_model=list[Session])
def list_sessions(user_id: UserScoped, conn: Conn) -> list[dict]:
    repo.get_user(conn, user_id)
    return repo.list_sessions(conn, user_id)


@router.post("/users/{user_id}/sessions", response_model=Session, status_code=201)
def create_session(user_id: UserScoped, body: SessionCreate, conn: Conn) -> dict:
    """Create a session from a timing plan over gestures of the user's bank (status 'planned')."""
    repo.get_user(conn, user_id)
    return repo.create_session(conn, user_id, body.device_id, body.gestures, body.repetitions, body.hold_s,
                               body.rest_s, body.name)


@router.get("/sessions/{session_id}", response_model=Session)
def get_session(session_id: PathId, caller: Caller, conn: Conn) -> dict:
    """The session with its intervals (planned offsets and actual times)."""
    session = repo.get_session(conn, session_id)
    caller.check_user(session["user_id"])
    return session


@router.post("/sessions/{session_id}/start", response_model=Session)
def start_session(session_id: PathId, caller: Caller, conn: Conn, body: SessionStart | None = None) -> dict:
    """Mark the actual start of recording (status 'recording')."""
    caller.check_user(queries.session_owner(conn, session_id))
    return repo.start_session(conn, session_id, at=body.at if body else None)


@router.post("/sessions/{session_id}/end", response_model=Session)
def end_session(session_id: PathId, caller: Caller, conn: Conn, body: SessionEnd | None = None) -> dict:
    """Mark the actual end: 'completed' (trainable) or 'aborted'."""
    caller.check_user(queries.session_owner(conn, session_id))
    body = body or SessionEnd()
    return repo.end_session(conn, session_id, status=body.status, at=body.at)


@router.post("/sessions/{session_id}/intervals", response_model=Interval, status_code=201)
def add_interval(session_id: PathId, body: IntervalAdd, caller: Caller, conn: Conn) -> dict:
    """Append an interval (to redo a failed repetition after discarding it)."""
    caller.check_user(queries.session_owner(conn, session_id))
    return repo.add_interval(conn, session_id, body.kind, body.label, body.repetition, body.planned_start_ms,
                             body.planned_end_ms)


@router.post("/intervals/{interval_id}/mark", response_model=Interval)
def mark_interval(interval_id: PathId, body: IntervalMark, caller: Caller, conn: Conn) -> dict:
    """Record when an interval's cue actually started and ended (training labels samples by these times)."""
    caller.check_user(queries.interval_owner(conn, interval_id))
    return repo.mark_interval(conn, interval_id, body.started_at, body.ended_at)


@router.post("/intervals/{interval_id}/discard", response_model=Interval)
def discard_interval(interval_id: PathId, caller: Caller, conn: Conn) -> dict:
    """Leave a failed repetition out of training (its times are kept)."""
    caller.check_user(queries.interval_owner(conn, interval_id))
    return repo.discard_interval(conn, interval_id)
