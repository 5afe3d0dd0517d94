"""A user's live decisions as they are made, over HTTP: Server-Sent Events from NATS `emg.predictions.<user>`.

For the apps that act on them (a prosthesis or haptic controller, a phone, a script): one long GET with the user's
own API key, over the API's port and TLS, instead of NATS credentials that read every user's decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, HTTPException, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from ml_model.rest import auth
from ml_model.rest.auth import UserScoped
from ml_model.rest.state import State
from semg import repo
from semg.messages import PredictionMessage, predictions_subject

router = APIRouter(tags=["predictions"])
log = logging.getLogger("semg.api.live")

KEEPALIVE_S = 15.0  # a comment line this often: the client (and any proxy) sees a dead connection
KEY_RECHECK_S = 5.0  # a revoked key (or a deleted user) ends its streams this long after (or at the keep-alive)
BUFFER = 256  # decisions kept for a client that reads slower than they come; the oldest go first
MAX_STREAMS_PER_USER = 4  # of one user's decisions, whatever keys open them (a user may have many keys)
MAX_STREAMS = 64
# No decision for this long (or 3 of the intervals they last came at, if longer): `event: stalled`, once per silence.
# Decisions come every model step (25 ms by default) while the sensor streams, REST included, so silence means no
# live data (a sensor off or out of Wi-Fi, an outage on the way); without the event a controller saw only the
# keep-alive 15 s later and went on acting on the last gesture meanwhile.
STALL_S = 1.0
_streams: Counter[int] = Counter()  # open streams per streamed user (the event loop is the only writer)


def _check_user(state, user_id: int) -> None:
    with state.pool.connection() as conn:
        repo.get_user(conn, user_id)  # NotFound -> 404


def _event(data: str, event: str | None = None) -> bytes:
    return ((f"event: {event}\n" if event else "") + f"data: {data}\n\n").encode()


@router.get(
    "/users/{user_id}/predictions/live", response_class=StreamingResponse,
    responses={200: {"description": "text/event-stream: one `data:` line per decision (the JSON published on NATS "
                                    "emg.predictions.<user_id>: gesture, confidence, raw_gesture, model_id, device_id, "
                                    "boot, seq, device_millis, sample_recv_time, sample_taken_time, decided_time, "
                                    "channel_faults), a comment "
                                    f"line every {KEEPALIVE_S:g} s, `event: stalled` once when no decision came for "
                                    f"{STALL_S:g} s (no live data), `event: dropped` when a slow reader missed some, "
                                    "and `event: end` before the server ends the stream",
                     "content": {"text/event-stream": {}}},
               429: {"description": f"{MAX_STREAMS_PER_USER} streams of this user's decisions are open already (or the server "
                                    f"{MAX_STREAMS})"},
               503: {"description": "NATS is not reachable yet (Retry-After)"}},
)
async def live_predictions(
    user_id: UserScoped, caller: auth.Caller, state: State,
    key: Annotated[str | None, Security(auth.api_key_header)],
) -> StreamingResponse:
    """The user's live decisions as the inference worker makes them (Server-Sent Events), until the client goes,
    its key is revoked or the API stops. Nothing is replayed: `GET /users/{user_id}/predictions` has the stored
    ones. Example: `curl -N -H "X-API-Key: $KEY" http://127.0.0.1:8000/users/1/predictions/live`."""
    await run_in_threadpool(_check_user, state, user_id)  # a connection only for this: a stream may last days
    nc = state.nats
    if nc is None or not nc.is_connected:
        raise HTTPException(503, "live decisions come over NATS, which the API cannot reach now: retry shortly",
                            headers={"Retry-After": "5"})
    if _streams[user_id] >= MAX_STREAMS_PER_USER or sum(_streams.values()) >= MAX_STREAMS:
        raise HTTPException(429, f"at most {MAX_STREAMS_PER_USER} live streams per user ({MAX_STREAMS} on the "
                                 "server) are open at once: close one first", headers={"Retry-After": "10"})
    pending: deque[bytes] = deque(maxlen=BUFFER)
    arrived = asyncio.Event()
    missed = [0]
    last: list = [None, time.monotonic(), STALL_S]  # the newest decision, when it came, the silence that stalls

    async def on_decision(msg) -> None:
        try:
            decision = PredictionMessage.model_validate_json(msg.data)
        except ValidationError:
            return  # the inference worker validates what it publishes; anything else is not a decision
        if len(pending) == pending.maxlen:
            missed[0] += 1
        prev, stall = last[0], STALL_S
        if (prev is not None and decision.seq is not None and prev.seq is not None
                and (prev.device_id, prev.boot) == (decision.device_id, decision.boot) and decision.seq > prev.seq):
            # a model with long steps; bounded, as the step after a gap in the data is the gap
            stall = min(KEEPALIVE_S, max(STALL_S, 3 * (decision.device_millis - prev.device_millis) / 1000))
        last[:] = decision, time.monotonic(), stall
        pending.append(_event(decision.model_dump_json()))
        arrived.set()

    sub = await nc.subscribe(predictions_subject(user_id), cb=on_decision)
    _streams[user_id] += 1

    next_check = [time.monotonic() + KEY_RECHECK_S]

    async def revoked() -> bool:
        """Whether the key no longer reaches the user, asked when a check is due: before each decision is sent,
        so a client that reads slowly (decisions always waiting for it) or stopped reading for a while gets none
        decided after its key was revoked, beyond KEY_RECHECK_S."""
        if time.monotonic() < next_check[0]:
            return False
        next_check[0] = time.monotonic() + KEY_RECHECK_S
        try:
            still = await run_in_threadpool(auth._verify, state, key)
        except Exception:  # noqa: BLE001 - an outage ends no live feed; checked again later
            still = caller
        return still is None or not still.can_access(user_id)

    def stalled_event() -> bytes:
        d = last[0]
        seen = None if d is None else {"device_id": d.device_id, "boot": d.boot, "seq": d.seq,
                                       "decided_time": d.decided_time}
        return _event(json.dumps({"seconds": round(time.monotonic() - last[1], 3), "last": seen}), "stalled")

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield b": live decisions of user %d\n\n" % user_id
            sent_at, stalled_for = time.monotonic(), None  # when something was last sent; the silence flagged
            while True:
                stall_at = last[1] + last[2] if stalled_for != last[1] else math.inf
                # wake for a decision, a silence to flag, the keep-alive, or the key's check (also when idle)
                wake_at = min(sent_at + KEEPALIVE_S, stall_at, next_check[0])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), max(0.0, wake_at - time.monotonic()))
                arrived.clear()
                if not pending and time.monotonic() >= stall_at:
                    stalled_for = last[1]
                    sent_at = time.monotonic()
                    yield stalled_event()
                elif not pending and time.monotonic() >= sent_at + KEEPALIVE_S:
                    sent_at = time.monotonic()
                    yield b": keep-alive\n\n"
                if missed[0]:
                    yield _event(f'{{"missed": {missed[0]}}}', "dropped")
                    missed[0] = 0
                ended = await revoked()
                while pending and not ended:
                    sent_at = time.monotonic()
                    yield pending.popleft()
                    ended = await revoked()
                if ended:
                    yield _event('{"reason": "the API key was revoked (or its user deleted)"}', "end")
                    return
        finally:
            _streams[user_id] -= 1
            if _streams[user_id] <= 0:
                del _streams[user_id]
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
