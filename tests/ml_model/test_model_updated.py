"""A training job that finishes while NATS is down says why models.updated could not be sent (the API finds
the model by polling) -- it used to wait 5 s for its own timeout and log an empty reason."""

from __future__ import annotations

import logging
import socket

from ml_model import jobs


def test_a_job_finishing_while_nats_is_down_names_the_reason(settings, caplog):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    with caplog.at_level(logging.WARNING, logger="semg.trainer"):
        jobs._publish_model_updated(settings.model_copy(update={"nats_port": free, "nats_server": None}), 1, 2, 3)
    (line,) = [r.getMessage() for r in caplog.records if "models.updated" in r.getMessage()]
    assert "for job 2 (nats: no servers available" in line, line
