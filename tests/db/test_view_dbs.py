import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_view_dbs_lists_tables_counts_and_hides_secrets(clean_db, test_env):
    from semg import repo
    u = repo.create_user(clean_db, "V", "v@example.org")
    repo.register_device(clean_db, u["id"], 4, 500)
    r = subprocess.run([sys.executable, str(REPO / "db" / "view_dbs.py"), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = {t["table"]: t for t in json.loads(r.stdout)}
    assert info["users"]["rows"] == 1 and info["devices"]["rows"] == 1
    assert "secret_key" in [c["name"] for c in info["devices"]["columns"]]
    assert "secret_key" not in info["devices"]["sample"][0]
    r = subprocess.run([sys.executable, str(REPO / "db" / "view_dbs.py"), "users"], capture_output=True, text=True)
    assert r.returncode == 0 and "v@example.org" in r.stdout
    assert r.stdout.startswith(f"database sensordb on 127.0.0.1:{test_env['POSTGRES_PORT']} (embedded)\n"), r.stdout
    r = subprocess.run([sys.executable, str(REPO / "db" / "view_dbs.py"), "nosuch"], capture_output=True, text=True)
    assert r.returncode != 0 and "no such table" in r.stderr


def test_view_dbs_unreachable_database_is_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SEMG_STATE_DIR": str(tmp_path), "POSTGRES_PORT": "1"}
    r = subprocess.run([sys.executable, str(REPO / "db" / "view_dbs.py")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
