"""Soak run: simulated users stream to the whole platform for a long time; nothing lost, memory flat, latency steady.

Nothing may be lost, no service may grow, latency must stay steady.

    python bench/soak.py                          # 50 users for 10 minutes (about 12 minutes in all)
    python bench/soak.py --users 10 --duration 30 # the short version

Starts the platform exactly as an operator does (./start_all.sh on a temporary SEMG_STATE_DIR with free ports,
every service under supervisord; ./stop_all.sh at the end) -- or uses a running instance given as a
tests/faults/faultstack.SupervisedStack (run_soak(), as tests/faults does). Each user has a binary device
(200 Hz x 8 channels, a signed packet every 50 ms, from a separate sender process) and a served model, so
decisions flow. Measured:

- memory of every service, sampled every few seconds: RSS of its process tree (PostgreSQL: the tree's
  private memory, RSS minus shared -- its RSS grows as the shared buffer cache fills, which is not a leak),
  the median over a window just after the warm-up against the median over the last window: flat means
  within 10 %;
- sent vs stored (sample_blocks) vs published (emg.samples.*, seen by an admin subscriber), per packet by
  sequence numbers: nothing lost;
- latency: UDP packet that completes a window sent -> its decision received on NATS, p99 per minute
  (per sixth of the run when shorter than 6 minutes) after the warm-up: steady means every bucket's p99 is
  within 2x (or 25 ms) of the median bucket's.

Progress goes to stderr; ONE JSON line is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "faults"))

import faultstack as fs  # noqa: E402

FLAT_PCT = 10.0


def _median_memory(samples: list[tuple[float, dict]], t0: float, t1: float) -> dict[str, dict[str, float]]:
    """Per service, the median over the samples taken between t0 and t1 (a passing spike -- an autovacuum
    worker, a garbage collection -- does not move it)."""
    chosen = [m for t, m in samples if t0 <= t <= t1] or [min(samples, key=lambda s: abs(s[0] - t0))[1]]
    out: dict[str, dict[str, float]] = {}
    for name in chosen[0]:
        vals = [m[name] for m in chosen if name in m]
        out[name] = {k: float(np.median([v[k] for v in vals])) for k in ("rss_mb", "anon_mb")}
    return out


def run_soak(stack: fs.SupervisedStack, users: int = 50, duration: float = 600.0, warmup: float | None = None,
             rate: float = 200.0, channels: int = 8, packet_ms: float = 50.0, boot: int = 1) -> dict:
    """Stream `users` devices for `duration` s against a running stack and measure; returns the figures."""
    warmup = min(120.0, 0.25 * duration) if warmup is None else warmup
    devices = fs.provision(stack, users, rate, channels, tag=f"soak{boot}")
    fs.prime(stack, devices)
    observer = fs.Observer(stack).start()
    fleet = fs.Fleet(stack, devices, duration, boot=boot, packet_ms=packet_ms).start()
    sample_every = float(np.clip(duration / 30, 2.0, 10.0))
    memory: list[tuple[float, dict]] = []
    load: list[float] = []  # the machine's 1-min load average: latency on a shared machine depends on it
    m0 = stack.udp_metrics()
    try:
        got = observer.first_decisions_after(time.monotonic(), {d.user_id for d in devices}, timeout=60)
        fs.log(f"soak: {len(got)}/{users} users have decisions; streaming {duration:.0f} s")
        next_sample = time.monotonic()
        next_log = time.monotonic() + 60
        while fleet.proc.is_alive() and time.monotonic() < fleet.t_start + duration + 60:
            now = time.monotonic()
            if now >= next_sample:
                mem = fs.service_memory(stack)
                memory.append((now - fleet.t_start, {k: {"rss_mb": v["rss_mb"], "anon_mb": v["anon_mb"]}
                                                     for k, v in mem.items()}))
                load.append(os.getloadavg()[0])
                next_sample += sample_every
            if now >= next_log:
                fs.log(f"soak: {now - fleet.t_start:.0f} s, {len(observer.decisions):,} decisions")
                next_log += 60
            time.sleep(0.2)
        fleet.wait(30)
        # settle: everything accepted is stored and published
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            m = stack.udp_metrics()
            if m["buffered"]["unstored_samples"] == 0 and m["buffered"]["unpublished_samples"] == 0:
                break
            time.sleep(0.5)
        time.sleep(1.5)
        conn = stack.connect_db()
        try:
            audit = fs.audit(conn, fleet, observer, [])
        finally:
            conn.close()
        lat = fs.per_packet_latencies(observer, fleet)
    finally:
        fleet.stop()
        observer.close()

    # memory: after warm-up vs end
    window = max(sample_every * 1.5, 0.1 * duration)
    warm = _median_memory(memory, warmup, warmup + window)
    end = _median_memory(memory, duration - window, duration + 60)
    mem_out, flat = {}, True
    for name in sorted(end):
        metric = "anon_mb" if name == "postgres" else "rss_mb"
        a, b = warm.get(name, {}).get(metric), end[name][metric]
        growth = None if not a else (b - a) / a * 100
        ok = growth is not None and abs(growth) <= FLAT_PCT
        flat &= ok
        mem_out[name] = {"metric": "tree_anon" if name == "postgres" else "tree_rss", "after_warmup_mb": round(a or 0, 1),
                         "end_mb": round(b, 1), "growth_pct": None if growth is None else round(growth, 1)}

    # latency per bucket of send time, after the warm-up
    bucket = 60.0 if duration >= 360 else duration / 6
    rel = lat[:, 0] - fleet.t_start if len(lat) else np.zeros(0)
    keep = rel >= warmup
    buckets = []
    for b0 in np.arange(warmup, duration, bucket):
        sel = keep & (rel >= b0) & (rel < b0 + bucket)
        if sel.sum() >= 20:
            buckets.append(round(float(np.percentile(lat[sel, 1], 99)) * 1000, 1))
    med = float(np.median(buckets)) if buckets else float("nan")
    trend = float(np.polyfit(np.arange(len(buckets)), buckets, 1)[0]) if len(buckets) >= 3 else None
    steady = bool(buckets) and all(v <= max(2 * med, med + 25) and v >= min(med / 2, med - 25) for v in buckets)
    all_after = lat[keep, 1] * 1000 if len(lat) else np.zeros(0)

    pp = fleet.per_packet
    sent_per_device = (~np.isnan(fleet.sent_times())).sum(axis=1) * pp
    expected = int(sum(max(0, (n - d.window) // d.step + 1) for n, d in zip(sent_per_device, devices, strict=True)))
    m1 = stack.udp_metrics()
    result = {
        "users": users, "duration_s": duration, "warmup_s": round(warmup, 1), "rate_hz": rate, "channels": channels,
        "sent_samples": audit["sent_packets"] * pp, "stored_samples": audit["stored_packets"] * pp,
        "published_samples": audit.get("published_packets", 0) * pp, "lost_samples": audit["lost"] * pp,
        "stored_not_published_samples": audit.get("stored_not_published", 0) * pp,
        "udp_rejected": m1["packets"]["rejected"] - m0["packets"]["rejected"],
        "kernel_drops": m1["socket"]["kernel_drops"],
        "decisions": int(len(lat)), "decisions_per_s": round(len(lat) / duration, 1),
        "decisions_expected": expected, "decision_ratio": round(len(lat) / expected, 3) if expected else None,
        "latency_ms": {"p50": round(float(np.percentile(all_after, 50)), 1) if len(all_after) else None,
                       "p99": round(float(np.percentile(all_after, 99)), 1) if len(all_after) else None,
                       "max": round(float(np.max(all_after)), 1) if len(all_after) else None},
        "p99_bucket_s": round(bucket, 1), "p99_per_bucket_ms": buckets, "p99_steady": steady,
        "p99_trend_ms_per_bucket": None if trend is None else round(trend, 1),
        "memory": mem_out, "memory_flat": flat, "memory_samples": len(memory),
        "memory_series_mb": {name: [round(m[name]["anon_mb" if name == "postgres" else "rss_mb"], 1)
                                    for _, m in memory if name in m] for name in sorted(end)},
        "memory_series_every_s": round(sample_every, 1),
        "loadavg_1m": {"mean": round(float(np.mean(load)), 2), "max": round(float(np.max(load)), 2)} if load else None,
    }
    result["nothing_lost"] = (audit["lost"] == 0 and audit["stored_not_published"] == 0
                              and audit["published_not_stored"] == 0 and audit["stored_unsent"] == 0)
    result["ok"] = bool(result["nothing_lost"] and flat and steady)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of streaming")
    p.add_argument("--warmup", type=float, default=None, help="seconds before the memory/latency baseline "
                                                              "(default: a quarter of the run, at most 120)")
    p.add_argument("--packet-ms", type=float, default=50.0)
    p.add_argument("--keep", action="store_true", help="keep the state dir (logs) afterwards")
    args = p.parse_args(argv)
    if not 1 <= args.users <= 200 or not 10 <= args.duration <= 3600:
        p.error("--users must be 1..200 and --duration 10..3600 s")
    parent = Path(tempfile.mkdtemp(prefix="semg-soak-", dir="/tmp"))
    stack = fs.SupervisedStack(fs.make_state_dir(parent), LOG_LEVEL="WARNING")
    try:
        fs.log(f"starting the platform in {stack.state_dir}")
        fs.log(f"started in {stack.start():.1f} s")
        result = run_soak(stack, args.users, args.duration, args.warmup, packet_ms=args.packet_ms)
    finally:
        r = stack.stop()
        left = stack.leftovers()
        fs.log(f"stop_all.sh -> {r.returncode}, processes left: {left}")
        if args.keep:
            fs.log(f"state and logs kept in {stack.state_dir}")
        else:
            shutil.rmtree(parent, ignore_errors=True)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
