"""List the tables of the configured database with their columns, row counts and a few sample rows.

    python db/view_dbs.py                 # every table
    python db/view_dbs.py users devices   # just these
    python db/view_dbs.py --rows 5 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import psycopg2
from psycopg2 import sql

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from semg import db  # noqa: E402
from semg.config import SettingsError, get_settings  # noqa: E402

# Columns whose contents must never be printed.
SECRET_COLUMNS = {"secret_key", "key_hash", "weights"}


def _show(value: object, width: int = 40) -> str:
    if isinstance(value, memoryview | bytes):
        return f"<{len(value)} bytes>"
    text = json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def describe(conn, tables: list[str] | None, rows: int) -> list[dict]:
    with conn.cursor() as cur:
        cur.execute("""SELECT table_name FROM information_schema.tables
                       WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name""")
        names = [r[0] for r in cur.fetchall()]
        unknown = sorted(set(tables or []) - set(names))
        if unknown:
            raise SystemExit(f"view_dbs: no such table: {', '.join(unknown)} (tables: {', '.join(names)})")
        out = []
        for name in tables or names:
            cur.execute("""SELECT column_name, data_type, is_nullable FROM information_schema.columns
                           WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position""", (name,))
            cols = [{"name": c, "type": t, "nullable": n == "YES"} for c, t, n in cur.fetchall()]
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(name)))
            count = cur.fetchone()[0]
            shown = [c["name"] for c in cols if c["name"] not in SECRET_COLUMNS]
            cur.execute(sql.SQL("SELECT {} FROM {} LIMIT %s").format(
                sql.SQL(", ").join(map(sql.Identifier, shown)), sql.Identifier(name)), (rows,))
            sample = [dict(zip(shown, r, strict=True)) for r in cur.fetchall()]
            out.append({"table": name, "rows": count, "columns": cols, "sample": sample})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tables", nargs="*", help="only these tables")
    p.add_argument("--rows", type=int, default=3, help="sample rows per table (default 3)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    try:
        s = get_settings()
        with contextlib.closing(db.connect(s)) as conn:
            info = describe(conn, args.tables, max(0, args.rows))
    except SettingsError as e:
        print(f"view_dbs: {e}", file=sys.stderr)
        return 2
    except psycopg2.Error as e:
        print(f"view_dbs: cannot read {s.postgres_db}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    print(f"database {s.postgres_db} on {s.postgres_address}:{s.postgres_port}{'' if s.postgres_host else ' (embedded)'}")
    for t in info:
        print(f"\n== {t['table']} ({t['rows']} rows)")
        for c in t["columns"]:
            hidden = "  [hidden]" if c["name"] in SECRET_COLUMNS else ""
            print(f"   {c['name']:<20} {c['type']}{'' if c['nullable'] else ' NOT NULL'}{hidden}")
        for row in t["sample"]:
            print("   | " + ", ".join(f"{k}={_show(v)}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
