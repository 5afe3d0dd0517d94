"""Training jobs (schedule, status and logs, cancel) and stored live predictions."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query

from ml_model.rest import queries
from ml_model.rest.auth import Caller, UserScoped
from ml_model.rest.deps import Conn
from ml_model.rest.schemas import Job, JobCreate, JobLog, StoredPrediction
from semg import journal, repo

router = APIRouter()
PathId = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.get("/jobs", response_model=list[Job], tags=["training jobs"])
def list_jobs(
    caller: Caller, conn: Conn,
    user_id: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="only this user's jobs")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[dict]:
    """Newest jobs first: all users' (admin/service) or the caller's own (user key)."""
    if not caller.is_admin:
        if user_id is not None:
            caller.check_user(user_id)
        user_id = caller.user_id
    return repo.list_jobs(conn, user_id=user_id, limit=limit)


@router.post("/users/{user_id}/jobs", response_model=Job, status_code=201, tags=["training jobs"])
def schedule_job(user_id: UserScoped, body: JobCreate, conn: Conn) -> dict:
    """Queue training on completed capture sessions of the user; a training worker picks it up."""
    # Labels a capture window could not store yet (kept in journals on this server) are stored first.
    journal.replay_interval_journals(connection=lambda: contextlib.nullcontext(conn))
    return repo.schedule_job(conn, user_id, body.session_ids, body.params)


@router.get("/jobs/{job_id}", response_model=Job, tags=["training jobs"])
def get_job(job_id: PathId, caller: Caller, conn: Conn) -> dict:
    """Status, progress and per-epoch metrics (artifact_id once a model was stored)."""
    job = repo.get_job(conn, job_id)
    caller.check_user(job["user_id"])
    return job


@router.get("/jobs/{job_id}/logs", response_model=list[JobLog], tags=["training jobs"])
def job_logs(
    job_id: PathId, caller: Caller, conn: Conn,
    after_id: Annotated[int, Query(ge=0, le=2**63 - 1, description="only lines after this log id")] = 0,
) -> list[dict]:
    caller.check_user(queries.job_owner(conn, job_id))
    return repo.job_logs(conn, job_id, after_id=after_id)


@router.post("/jobs/{job_id}/cancel", response_model=Job, tags=["training jobs"])
def cancel_job(job_id: PathId, caller: Caller, conn: Conn) -> dict:
    """Cancel a scheduled job at once, or ask a running one to stop (409 if it already finished)."""
    caller.check_user(queries.job_owner(conn, job_id))
    return repo.cancel_job(conn, job_id)


@router.get("/users/{user_id}/predictions", response_model=list[StoredPrediction], tags=["predictions"])
def recent_predictions(
    user_id: UserScoped, conn: Conn,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
    since: Annotated[datetime | None, Query(description="only decisions after this time")] = None,
) -> list[dict]:
    """The user's most recent live decisions, newest first."""
    repo.get_user(conn, user_id)
    return repo.recent_predictions(conn, user_id, limit=limit, since=since)
