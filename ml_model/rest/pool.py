"""A small blocking PostgreSQL connection pool for the API's threadpool routes.

psycopg2's own pools raise when exhausted; here a request waits (bounded) for a free connection and a
database outage surfaces as `DatabaseUnavailable` (mapped to 503) instead of a 500.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from semg import db
from semg.config import Settings
from semg.db import first_line

log = logging.getLogger("semg.api.pool")


class DatabaseUnavailable(RuntimeError):  # noqa: N818 - reads as the HTTP status it maps to
    """PostgreSQL cannot be reached (or the pool stayed exhausted); the message says which."""


class ConnectionPool:
    def __init__(self, settings: Settings, maxconn: int = 16, wait_s: float = 10.0):
        self.settings = settings
        self.wait_s = wait_s
        self._idle: queue.LifoQueue[psycopg2.extensions.connection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(maxconn)
        self._closed = False

    def _new(self) -> psycopg2.extensions.connection:
        try:
            return db.connect(self.settings, connect_timeout=3, application_name="semg-api")
        except psycopg2.OperationalError as e:
            raise DatabaseUnavailable(f"database unavailable: {first_line(e)}") from None

    def getconn(self) -> psycopg2.extensions.connection:
        if self._closed:
            raise DatabaseUnavailable("database pool is closed (the API is shutting down)")
        if not self._slots.acquire(timeout=self.wait_s):
            raise DatabaseUnavailable(f"database busy: no free connection within {self.wait_s:.0f} s")
        try:
            while True:
                try:
                    conn = self._idle.get_nowait()
                except queue.Empty:
                    return self._new()
                if not conn.closed:
                    return conn
        except BaseException:
            self._slots.release()
            raise

    def putconn(self, conn: psycopg2.extensions.connection, broken: bool = False) -> None:
        try:
            if not broken and not conn.closed:
                try:
                    if conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                        conn.rollback()
                except psycopg2.Error:
                    broken = True
            if broken or conn.closed or self._closed:
                with contextlib.suppress(Exception):
                    conn.close()
                if broken:
                    self.discard_idle()  # after an outage every idle connection is likely dead too
            else:
                self._idle.put(conn)
        finally:
            self._slots.release()

    def discard_idle(self) -> None:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(Exception):
                conn.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg2.extensions.connection]:
        """A pooled connection; an OperationalError inside marks it broken and becomes DatabaseUnavailable."""
        conn = self.getconn()
        broken = False
        try:
            yield conn
        except psycopg2.errors.TransactionRollbackError:
            raise  # a deadlock or serialization failure: the database and this connection are fine (errors.py)
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
            broken = True
            raise DatabaseUnavailable(f"database unavailable: {first_line(e)}") from None
        finally:
            self.putconn(conn, broken=broken)

    def close(self) -> None:
        self._closed = True
        self.discard_idle()
