"""Fuzz the sensor packet parsers (udpserver/protocol.py) against an independent reading of udpserver/PROTOCOL.md.

    python bench/fuzz_parsers.py                       # 1,000,000 structured inputs (+ 1,000,000 with atheris)
    python bench/fuzz_parsers.py --inputs 20000 --engine structured      # the short version CI runs

Every input goes through protocol.parse() and, directly, parse_binary() and parse_legacy(); an accepted binary
packet also through verify_tag() and values_array(). A second, deliberately simple implementation written from
PROTOCOL.md (`reference()` below) decides what each input should be. Counted:

- exceptions_escaped: a parser raised instead of returning a packet or a rejection reason (must be 0);
- accepted_invalid: a parser accepted what the protocol forbids, or parsed fields differently (must be 0);
- rejected_valid: a parser rejected what the protocol allows (reported with examples; not a safety issue);
- reason_mismatch: both reject, for different documented reasons (informational).

Engines: `structured` (seeded: random bytes, valid packets, mutations of them, field values at and beyond
every documented bound, legacy text from a grammar of good and bad fields) and `atheris` (coverage-guided
libFuzzer mutations seeded with valid packets; run in a child process, which exits when done). Prints progress
to stderr and ONE JSON line last.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

if os.environ.get("SEMG_FUZZ_ATHERIS_CHILD"):  # instrument the parsers for coverage before importing them
    import atheris
    with atheris.instrument_imports(include=["udpserver"]):
        from udpserver import protocol
else:
    from udpserver import protocol

KEY = b"fuzz-key-0123456789abcdef0123456"

# ---- the protocol as PROTOCOL.md states it (independent of udpserver/protocol.py) ----------------------------
_HDR = struct.Struct("<BBBBIIIIHH")  # magic0 magic1 version channels device boot seq0 millis0 rate n
_PLAIN_INT = re.compile(rb"-?[0-9]+")


def reference_binary(data: bytes):
    size = len(data)
    if size > 8192:
        return "reject", "oversize"
    if size < 24 + 16:
        return "reject", "truncated"
    m0, m1, version, channels, device, boot, seq0, millis0, rate, n = _HDR.unpack_from(data)
    if m0 != 0xE5 or m1 != 0x47:
        return "reject", "bad_header"
    if version != 1:
        return "reject", "bad_version"
    if not 1 <= channels <= 16 or not 1 <= rate <= 10000 or n < 1 or device < 1:
        return "reject", "bad_header"
    total = 24 + 2 * n * channels + 16
    if size < total:
        return "reject", "truncated"
    if size > total:
        return "reject", "oversize"
    end = total - 16
    return "binary", (device, boot, seq0, millis0, rate, channels, n, data[24:end], data[:end], data[end:])


def reference_legacy(data: bytes):
    if len(data) > 256:
        return "reject", "oversize"
    if not data:
        return "reject", "empty"
    body = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
    fields = body.split(b",")
    if not 3 <= len(fields) <= 18:
        return "reject", "bad_field_count"
    for i, f in enumerate(fields):  # the first field that is not a plain decimal integer decides
        if not _PLAIN_INT.fullmatch(f):
            return "reject", "non_numeric"
        if i < 2 and f.startswith(b"-"):
            return "reject", "out_of_range"  # userid >= 1, millis 0..2^32-1: no sign
    userid, millis, values = int(fields[0]), int(fields[1]), [int(f) for f in fields[2:]]
    if not 1 <= userid <= 2**63 - 1 or millis > 2**32 - 1 or any(not -32768 <= v <= 32767 for v in values):
        return "reject", "out_of_range"
    return "legacy", (userid, millis, tuple(values))


def reference(data: bytes):
    if not data:
        return "reject", "empty"
    if data[0] == 0xE5:
        return reference_binary(data)
    if 0x30 <= data[0] <= 0x39:
        return reference_legacy(data)
    return "reject", "oversize" if len(data) > 8192 else "malformed"


# ---- checking one input ---------------------------------------------------------------------------------------------
class Tally:
    def __init__(self) -> None:
        self.inputs = 0
        self.exceptions = 0
        self.accepted_invalid = 0
        self.rejected_valid = 0
        self.reason_mismatch = 0
        self.accepted = collections.Counter()
        self.rejected = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def example(self, kind: str, data: bytes, note: str) -> None:
        if len(self.examples[kind]) < 5:
            self.examples[kind].append(f"{note}: {data[:120].hex()}{'…' if len(data) > 120 else ''} ({len(data)} B)")

    def as_dict(self) -> dict:
        return {"inputs": self.inputs, "exceptions_escaped": self.exceptions, "accepted_invalid": self.accepted_invalid,
                "rejected_valid": self.rejected_valid, "reason_mismatch": self.reason_mismatch,
                "accepted": dict(self.accepted), "rejected": dict(self.rejected.most_common()),
                "examples": dict(self.examples)}

    def merge(self, other: dict) -> None:
        self.inputs += other["inputs"]
        self.exceptions += other["exceptions_escaped"]
        self.accepted_invalid += other["accepted_invalid"]
        self.rejected_valid += other["rejected_valid"]
        self.reason_mismatch += other["reason_mismatch"]
        self.accepted.update(other["accepted"])
        self.rejected.update(other["rejected"])
        for k, v in other["examples"].items():
            self.examples[k] = (self.examples[k] + v)[:5]


def _fields(pkt) -> tuple:
    if isinstance(pkt, protocol.BinaryPacket):
        return "binary", (pkt.device_id, pkt.boot, pkt.seq0, pkt.millis0, pkt.rate_hz, pkt.channels, pkt.n,
                          bytes(pkt.values), bytes(pkt.signed), bytes(pkt.tag))
    return "legacy", (pkt.userid, pkt.millis, tuple(pkt.values))


def _compare(t: Tally, data: bytes, got, want, where: str) -> None:
    if isinstance(got, protocol.Reject):
        if want[0] != "reject":
            t.rejected_valid += 1
            t.example("rejected_valid", data, f"{where} said {got.value}")
        elif got.value != want[1]:
            t.reason_mismatch += 1
            t.example("reason_mismatch", data, f"{where} said {got.value}, reference {want[1]}")
        return
    kind, fields = _fields(got)
    if want[0] != kind or want[1] != fields:
        t.accepted_invalid += 1
        t.example("accepted_invalid", data, f"{where} accepted as {kind}; reference {want[0]} {want[1]!r:.80}")
        return
    if kind == "binary":  # what the server does next with an accepted packet must not raise either
        protocol.verify_tag(got, KEY)
        arr = protocol.values_array(got.values, got.channels)
        if arr.shape != (got.n, got.channels):
            t.accepted_invalid += 1
            t.example("accepted_invalid", data, f"values_array shape {arr.shape}")


def check(t: Tally, data: bytes) -> None:
    t.inputs += 1
    want = reference(data)
    try:
        got = protocol.parse(data)
        _compare(t, data, got, want, "parse")
        if isinstance(got, protocol.Reject):
            t.rejected[got.value] += 1
        else:
            t.accepted[_fields(got)[0]] += 1
        # the format parsers on their own, on anything (the dispatcher only ever hands them their own kind)
        if data:
            _compare(t, data, protocol.parse_binary(data), reference_binary(data), "parse_binary")
            _compare(t, data, protocol.parse_legacy(data), reference_legacy(data), "parse_legacy")
    except Exception as e:  # noqa: BLE001 - counting them is the point
        t.exceptions += 1
        t.example("exceptions", data, f"{type(e).__name__}: {e}")


# ---- structured inputs -------------------------------------------------------------------------------------------------
_B_EDGES = {"channels": [0, 1, 2, 8, 15, 16, 17, 255], "rate": [0, 1, 2, 500, 9999, 10000, 10001, 65535],
            "n": [0, 1, 2, 50, 255, 256, 4064, 65535], "device": [0, 1, 2, 2**31, 2**32 - 1],
            "version": [0, 1, 2, 255], "u32": [0, 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]}
_L_FIELDS = [b"0", b"1", b"7", b"-1", b"-0", b"00", b"0007", b"32767", b"32768", b"-32768", b"-32769", b"99999",
             b"100000", b"000001", b"4294967295", b"4294967296", b"9223372036854775807", b"9223372036854775808",
             b"12345678901234567890", b"", b" ", b"1 ", b" 1", b"+5", b"5.0", b"1e3", b"0x10", b"--1", b"-", b"a",
             b"\x00", b"\xff", b"1_000", b"\xd9\xa1", b"\t1", b"1\n", b"\r"]


def _valid_binary(rnd: random.Random) -> bytes:
    import numpy as np
    ch = rnd.choice([1, 2, 4, 8, 16, rnd.randint(1, 16)])
    n = rnd.randint(1, max(1, min(200, (8192 - 40) // (2 * ch))))
    if rnd.random() < 0.05:
        n = (8192 - 40) // (2 * ch)  # the largest allowed
    vals = np.frombuffer(rnd.randbytes(2 * n * ch), dtype="<i2").reshape(n, ch)
    return protocol.build_binary(rnd.randint(1, 2**32 - 1), rnd.randint(0, 2**32 - 1), rnd.randint(0, 2**32 - 1),
                                 rnd.randint(0, 2**32 - 1), rnd.randint(1, 10000), vals, KEY)


def _valid_legacy(rnd: random.Random) -> bytes:
    k = rnd.randint(1, 16)
    vals = [rnd.choice([rnd.randint(-32768, 32767), 0, 4095, -32768, 32767]) for _ in range(k)]
    text = protocol.build_legacy(rnd.choice([1, rnd.randint(1, 10**6), 2**63 - 1]),
                                 rnd.choice([0, rnd.randint(0, 2**32 - 1), 2**32 - 1]), vals)
    return text + rnd.choice([b"", b"", b"\n", b"\r\n"])


def _header_edit(rnd: random.Random, pkt: bytes) -> bytes:
    f = list(_HDR.unpack_from(pkt))
    which = rnd.randrange(10)
    if which == 0:
        f[0] = rnd.choice([0xE5, 0xE4, 0x00])
    elif which == 1:
        f[1] = rnd.choice([0x47, 0x46, 0x00, 0xFF])
    elif which == 2:
        f[2] = rnd.choice(_B_EDGES["version"])
    elif which == 3:
        f[3] = rnd.choice(_B_EDGES["channels"])
    elif which == 4:
        f[4] = rnd.choice(_B_EDGES["device"])
    elif which in (5, 6, 7):
        f[which] = rnd.choice(_B_EDGES["u32"])
    elif which == 8:
        f[8] = rnd.choice(_B_EDGES["rate"])
    else:
        f[9] = rnd.choice(_B_EDGES["n"])
    return _HDR.pack(*f) + pkt[24:]


def _mutate(rnd: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(6)
        if op == 0 and b:
            b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
        elif op == 1 and b:
            b[rnd.randrange(len(b))] = rnd.choice([0, 0xFF, 0x2C, 0x2D, 0x30, 0x39, 0x0A, 0x0D, 0xE5])
        elif op == 2 and b:
            del b[rnd.randrange(len(b)):]
        elif op == 3:
            b += rnd.randbytes(rnd.choice([1, 2, 16, rnd.randint(1, 64)]))
        elif op == 4 and b:
            i = rnd.randrange(len(b))
            del b[i:i + rnd.randint(1, 8)]
        else:
            i = rnd.randrange(len(b) + 1)
            b[i:i] = rnd.randbytes(rnd.randint(1, 8))
    return bytes(b)


def _legacy_grammar(rnd: random.Random) -> bytes:
    k = rnd.choice([0, 1, 2, 3, 4, 8, 16, 17, 18, 19, 20, rnd.randint(0, 30)])
    fields = []
    for i in range(k):
        if rnd.random() < 0.7:
            fields.append(str(rnd.randint(-40000, 40000) if i >= 2 else rnd.randint(0, 2**33)).encode())
        else:
            fields.append(rnd.choice(_L_FIELDS))
    text = b",".join(fields)
    if rnd.random() < 0.3:
        text += rnd.choice([b"\n", b"\r\n", b"\n\n", b"\r", b",", b" ", b"\r\n\r\n"])
    if rnd.random() < 0.05:
        text = text * rnd.randint(2, 20)
    return text


def structured_inputs(n: int, seed: int):
    rnd = random.Random(seed)
    valid_b = [_valid_binary(rnd) for _ in range(200)]
    valid_l = [_valid_legacy(rnd) for _ in range(200)]
    for _ in range(n):
        r = rnd.random()
        if r < 0.08:
            yield rnd.randbytes(rnd.choice([0, 1, 2, 23, 39, 40, 41, rnd.randint(0, 300)]))
        elif r < 0.10:
            yield rnd.randbytes(rnd.choice([255, 256, 257, 8191, 8192, 8193, 9000]))
        elif r < 0.22:
            yield _valid_binary(rnd) if rnd.random() < 0.2 else rnd.choice(valid_b)
        elif r < 0.40:
            yield _header_edit(rnd, rnd.choice(valid_b))
        elif r < 0.55:
            yield _mutate(rnd, rnd.choice(valid_b))
        elif r < 0.65:
            yield _valid_legacy(rnd) if rnd.random() < 0.3 else rnd.choice(valid_l)
        elif r < 0.77:
            yield _mutate(rnd, rnd.choice(valid_l))
        elif r < 0.97:
            yield _legacy_grammar(rnd)
        else:  # a legacy body behind a binary magic byte and the other way round
            yield bytes([rnd.choice([0xE5, 0x31, 0x20])]) + rnd.choice(valid_l + valid_b)[1:]


def run_structured(n: int, seed: int, max_seconds: float) -> dict:
    t = Tally()
    t0 = time.monotonic()
    report = t0 + 10
    for data in structured_inputs(n, seed):
        check(t, data)
        if t.inputs % 1000 == 0:
            now = time.monotonic()
            if now > report:
                print(f"structured: {t.inputs:,} inputs, {t.inputs / (now - t0):,.0f}/s, exceptions {t.exceptions}, "
                      f"accepted_invalid {t.accepted_invalid}", file=sys.stderr, flush=True)
                report = now + 10
            if now - t0 > max_seconds:
                break
    out = t.as_dict()
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


# ---- atheris (child process) -------------------------------------------------------------------------------------------
def _atheris_child(n: int, seed: int, out_path: str, corpus: Path) -> None:
    t = Tally()
    t0 = time.monotonic()

    def test_one_input(data: bytes) -> None:
        check(t, data)
        if t.inputs >= n:
            res = t.as_dict()
            res["seconds"] = round(time.monotonic() - t0, 1)
            Path(out_path).write_text(json.dumps(res))
            sys.stdout.flush()
            os._exit(0)  # libFuzzer would exit without running Python's atexit handlers anyway

    corpus.mkdir(parents=True, exist_ok=True)  # libFuzzer adds what it finds; the parent removes it
    rnd = random.Random(seed)
    for i in range(64):
        (corpus / f"b{i}").write_bytes(_valid_binary(rnd))
        (corpus / f"l{i}").write_bytes(_valid_legacy(rnd))
    atheris.Setup([sys.argv[0], f"-seed={seed + 1}", "-max_len=9000", f"-runs={n + 10}", "-print_final_stats=0",
                   str(corpus)], test_one_input)
    atheris.Fuzz()


def run_atheris(n: int, seed: int, max_seconds: float) -> dict | None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: skipping the coverage-guided engine", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory(prefix="semg-fuzz-") as d:
        out = Path(d) / "result.json"
        err = Path(d) / "libfuzzer.log"
        t0 = time.monotonic()
        with open(err, "wb") as errf:
            r = subprocess.run([sys.executable, __file__, "--atheris-child", str(out), "--inputs", str(n),
                                "--seed", str(seed), "--corpus", str(Path(d) / "corpus")],
                               env={**os.environ, "SEMG_FUZZ_ATHERIS_CHILD": "1"},
                               stdout=subprocess.DEVNULL, stderr=errf, timeout=max_seconds + 120)
        if not out.exists():
            tail = err.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(f"atheris run failed ({r.returncode}):\n" + "\n".join(tail))
        res = json.loads(out.read_text())
        res["seconds"] = round(time.monotonic() - t0, 1)
        return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=1_000_000, help="inputs per engine")
    p.add_argument("--engine", choices=["structured", "atheris", "both"], default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=1800, help="stop an engine after this long")
    p.add_argument("--atheris-child", metavar="RESULT", help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.atheris_child:
        _atheris_child(args.inputs, args.seed, args.atheris_child, args.corpus)
        return 0
    if not 1 <= args.inputs <= 100_000_000:
        p.error("--inputs must be 1..100,000,000")
    t0 = time.monotonic()
    total = Tally()
    engines = {}
    if args.engine in ("structured", "both"):
        engines["structured"] = run_structured(args.inputs, args.seed, args.max_seconds)
    if args.engine in ("atheris", "both"):
        res = run_atheris(args.inputs, args.seed, args.max_seconds)
        if res is not None:
            engines["atheris"] = res
    for res in engines.values():
        total.merge(res)
    out = total.as_dict()
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["engines"] = {k: {x: v[x] for x in ("inputs", "exceptions_escaped", "accepted_invalid", "rejected_valid",
                                            "reason_mismatch", "seconds")} for k, v in engines.items()}
    print(json.dumps(out))
    return 0 if out["exceptions_escaped"] == 0 and out["accepted_invalid"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
