"""The short version of bench/fuzz_parsers.py (the million-input run is a bench command): the packet parsers
never raise and never accept what PROTOCOL.md forbids, on structured, coverage-guided (atheris) and
Hypothesis-generated inputs; and the oracle itself catches a planted bug."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udpserver import protocol

_PATH = Path(__file__).resolve().parents[2] / "bench" / "fuzz_parsers.py"
_spec = importlib.util.spec_from_file_location("semg_bench_fuzz_parsers", _PATH)
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


def _clean(res: dict) -> None:
    assert res["exceptions_escaped"] == 0, res["examples"].get("exceptions")
    assert res["accepted_invalid"] == 0, res["examples"].get("accepted_invalid")


def test_structured_inputs():
    res = fuzz.run_structured(30_000, seed=1, max_seconds=120)
    _clean(res)
    assert res["inputs"] == 30_000
    # the generator reaches both formats and every structural rejection
    assert res["accepted"]["binary"] > 1000 and res["accepted"]["legacy"] > 1000
    assert {"empty", "oversize", "truncated", "bad_version", "bad_header", "malformed", "bad_field_count",
            "non_numeric", "out_of_range"} <= set(res["rejected"]), res["rejected"]


def test_coverage_guided_inputs():
    pytest.importorskip("atheris")
    res = fuzz.run_atheris(20_000, seed=2, max_seconds=120)
    _clean(res)
    assert res["inputs"] == 20_000


_valid = st.builds(lambda seed: fuzz._valid_binary(random.Random(seed)), st.integers(0, 2**32)) | \
    st.builds(lambda seed: fuzz._valid_legacy(random.Random(seed)), st.integers(0, 2**32))
_edited = st.builds(lambda data, i, b: data[:i % (len(data) + 1)] + bytes([b]) + data[i % (len(data) + 1) + 1:],
                    _valid, st.integers(0, 10_000), st.integers(0, 255))


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
@given(st.binary(max_size=9000) | _valid | _edited | st.builds(lambda d, n: d[:n], _valid, st.integers(0, 9000)))
def test_any_bytes_are_a_packet_or_a_documented_rejection(data):
    t = fuzz.Tally()
    fuzz.check(t, data)
    _clean(t.as_dict())


def test_the_oracle_catches_a_planted_bug(monkeypatch):
    """If parse_binary accepted version 2 (and refused version 1), the fuzzer must say so."""
    monkeypatch.setattr(protocol, "VERSION", 2)
    res = fuzz.run_structured(3000, seed=3, max_seconds=60)
    assert res["accepted_invalid"] > 0 and res["rejected_valid"] > 0
