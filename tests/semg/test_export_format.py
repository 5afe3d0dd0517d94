"""The user export writes what the database holds: the samples CSV (semg.repo.sample_csv_rows) is exactly what
csv.writer makes of the same fields, and predictions.json every row as semg.repo._jsonable makes it."""

import csv
import io
import json
import zipfile
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg2.extras
from hypothesis import given, settings
from hypothesis import strategies as st

from semg import repo


def csv_writer_rows(device_id, boot, seq0, n, channels, rate, millis0, t0, ts, values) -> str:
    """The export's former writer: a csv.writer row per sample."""
    text = io.StringIO()
    w = csv.writer(text)
    k = np.arange(n)
    vals = np.asarray(values, dtype=np.int64).reshape(n, channels)
    millis = millis0 + k * 1000.0 / rate
    times = t0 + k / rate
    w.writerows([device_id, boot, seq0 + i, f"{millis[i]:.3f}", f"{times[i]:.6f}", f"{ts:.6f}", *vals[i].tolist()]
                for i in range(n))
    return text.getvalue()


@st.composite
def blocks(draw):
    n = draw(st.integers(1, 60))
    channels = draw(st.integers(1, repo.MAX_CHANNELS))
    values = draw(st.lists(st.integers(-32768, 32767), min_size=n * channels, max_size=n * channels))
    return (draw(st.integers(1, 2**31 - 1)), draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**40)), n,
            channels, draw(st.floats(0.5, 10_000.0)), draw(st.floats(0, 2.0**32)),
            draw(st.floats(0, 4e9)), draw(st.floats(0, 4e9)), values)


@settings(max_examples=300, deadline=None)
@given(blocks())
def test_the_block_formatter_writes_what_csv_writer_writes(block):
    assert repo.sample_csv_rows(*block) == csv_writer_rows(*block)


def test_a_block_as_exported():
    text = repo.sample_csv_rows(7, 2, 100, 2, 3, 500.0, 12.5, 1_763_827_200.123456, 1_763_827_200.2, [1, -2, 3, 4, 5, 6])
    assert text == ("7,2,100,12.500,1763827200.123456,1763827200.200000,1,-2,3\r\n"
                    "7,2,101,14.500,1763827200.125456,1763827200.200000,4,5,6\r\n")


def test_the_export_holds_every_row_across_fetch_batches(clean_db, monkeypatch):
    """Blocks and decisions over several fetches of the export's cursors (3 rows each here): nothing lost or doubled
    at a batch boundary, predictions.json one valid array, each value as the database has it."""
    monkeypatch.setattr(repo, "_EXPORT_FETCH", 3)
    conn = clean_db
    uid = repo.create_user(conn, "Zoë", "zoe@example.org")["id"]
    dev = repo.register_device(conn, uid, 3, 250.0, name="armband")
    t0 = datetime(2026, 11, 22, 16, 0, 0, 123456, tzinfo=UTC)
    blocks = [(uid, dev["id"], boot, seq0, n, 3, 250.0, seq0 * 4.0, t0 + timedelta(seconds=seq0 / 250),
               t0 + timedelta(seconds=seq0 / 250 + 0.05), list(range(-n * 3 + seq0, seq0)))
              for boot, seq0, n in [(0, 0, 5), (0, 5, 7), (0, 12, 1), (0, 13, 5), (1, 0, 4), (1, 4, 6), (2, 0, 2)]]
    with conn.cursor() as cur:
        psycopg2.extras.execute_values(cur, """INSERT INTO sample_blocks (user_id, device_id, boot, seq0, n, channels,
            sample_rate_hz, device_millis0, device_time0, server_ts, values) VALUES %s""", blocks)
        for i in range(7):
            cur.execute("""INSERT INTO predictions (user_id, gesture, confidence, device_id, device_millis,
                                                    sample_received, decided_at, latency_ms, channel_faults)
                           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                        (uid, ["fist", "café ✊", "REST"][i % 3], 0.1 * i, dev["id"] if i != 3 else None,
                         None if i == 2 else 1000.5 * i, None if i == 2 else t0 + timedelta(seconds=i),
                         t0 + timedelta(seconds=i, milliseconds=30), None if i == 4 else 12.25,
                         None if i % 2 else psycopg2.extras.Json([{"channel": 2, "fault": "flat"}])))
    conn.commit()
    repo.reset_device_boot(conn, dev["id"])  # after a re-flash: its next boot 1 is stored as boot 4

    with zipfile.ZipFile(io.BytesIO(repo.export_user_data(conn, uid))) as zf:
        samples_csv = zf.read(f"samples/device_{dev['id']}.csv").decode()
        predictions = json.loads(zf.read("predictions.json"))
        manifest = json.loads(zf.read("manifest.json"))
        devices = json.loads(zf.read("devices.json"))
    # the CSV's boot is the platform's number: the export says how it relates to the device's own counter
    assert [d["boot_offset"] for d in devices] == [3] and "boot_offset" in manifest["samples_csv_columns"]

    header = "device_id,boot,seq,device_millis,device_time_unix,server_ts_unix,ch0,ch1,ch2\r\n"
    expected = header + "".join(
        csv_writer_rows(dev["id"], boot, seq0, n, ch, rate, millis0, t0_.timestamp(), ts.timestamp(), values)
        for _u, _d, boot, seq0, n, ch, rate, millis0, t0_, ts, values in blocks)
    assert samples_csv == expected
    assert manifest["counts"]["samples"] == 30 and manifest["counts"]["predictions"] == 7
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute("""SELECT id, model_id, gesture, confidence, device_id, device_millis, sample_received, decided_at,
                              latency_ms, channel_faults FROM predictions ORDER BY id""")
        assert predictions == [repo._jsonable(dict(r)) for r in cur.fetchall()]
