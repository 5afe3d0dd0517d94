"""Database dependency for the routes: one pooled connection per request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import psycopg2.extensions
from fastapi import Depends

from ml_model.rest.state import State


def get_conn(state: State) -> Iterator[psycopg2.extensions.connection]:
    with state.pool.connection() as conn:
        yield conn


Conn = Annotated[psycopg2.extensions.connection, Depends(get_conn)]
