"""A test that runs a page with AppTest leaves the process fit for the next test's multiprocessing children."""

from __future__ import annotations

import multiprocessing as mp


def _page() -> None:
    import streamlit as st
    st.write("hello")


def _child(q) -> None:
    q.put("ran")


def test_1_a_page_runs_in_apptest():
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_function(_page, default_timeout=30)
    at.run()
    assert not at.exception


def test_2_a_spawned_child_runs_after_it():
    """Streamlit installs the page's script as __main__ and leaves it: a "spawn" child (the fault tests' sensor
    fleet) re-ran that script and died (NameError), so nothing streamed and every fault test failed at setup."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(60)
    assert p.exitcode == 0 and q.get(timeout=5) == "ran"
