"""What a user API key may make the API parse: errors.json_values, the count the per-request value limit uses,
against json's own parser; and the limit through the API."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ml_model.rest.errors import USER_MAX_JSON_VALUES, json_values

# strings that look like structure to a byte scan: quotes, backslashes, brackets and commas inside them
_text = st.text(alphabet=st.sampled_from(list('"\\[]{},:ab é\u2028\n')) | st.characters(blacklist_categories=("Cs",)), max_size=12)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_text, inner, max_size=5),
    max_leaves=40,
)


def _values_below(v) -> int:
    """Values below `v`, plus one per empty list or object (each container counts at least once)."""
    if isinstance(v, list):
        return max(len(v), 1) + sum(_values_below(x) for x in v)
    if isinstance(v, dict):
        return max(len(v), 1) + sum(_values_below(x) for x in v.values())
    return 0


@settings(max_examples=300, deadline=None)
@given(_json, st.sampled_from([{}, {"ensure_ascii": False}, {"indent": 1}, {"separators": (",", ":")}]))
def test_json_values_counts_what_the_parser_reads(value, style):
    text = json.dumps(value, **style)
    assert json_values(text.encode()) == _values_below(value)
    # UTF-16/32, which json.loads also accepts, is never counted short
    for enc in ("utf-16", "utf-32-le"):
        assert json_values(text.encode(enc)) >= _values_below(value)


@settings(max_examples=200, deadline=None)
@given(_json, st.data())
def test_a_cut_body_counts_no_more_than_the_whole(value, data):
    """Invalid JSON (a body cut anywhere) counts at most what the whole body does: a prefix never hides values
    that a parser reading the prefix would see."""
    body = json.dumps(value, ensure_ascii=False).encode()
    cut = data.draw(st.integers(0, len(body)))
    assert json_values(body[:cut]) <= json_values(body)


def test_strings_are_one_value_however_much_structure_they_spell():
    assert json_values(json.dumps({"notes": "[{," * 3000}).encode()) == 1
    assert json_values(json.dumps({"a": '\\"[,', "b": [1, 2]}).encode()) == 4  # an escaped quote does not end it
    assert json_values(b'{"a": "\\\\", "b": [1, 2]}') == 4  # an escaped backslash does not escape the quote


def test_a_user_key_may_send_so_many_json_values(api, keys, served, parses):
    """Within its 256 KiB a user key could send 43k one-value windows, which took the event loop ~0.1 s to parse
    and validate (probes of the live path waited ~90 ms while one key sent them back to back). The number of
    values is now bounded too, before anything is parsed; strings are one value however long."""
    user, _, _ = served()
    mine = {**keys("user", user["id"]), "Content-Type": "application/json"}
    window = np.zeros((8, 50), dtype=int).tolist()  # 409 values
    fits = USER_MAX_JSON_VALUES // 409
    r = api.post("/predict", json={"user_id": user["id"], "windows": [window] * fits}, headers=mine)
    assert r.status_code == 200 and len(r.json()["results"][0]["predictions"]) == fits, r.text[:300]
    worst = b'{"user_id": %d, "windows": [' % user["id"] + b",".join([b"[[0]]"] * 5000) + b"]}"
    for body in (json.dumps({"user_id": user["id"], "windows": [window] * (fits + 1)}).encode(), worst):
        assert json_values(body) > USER_MAX_JSON_VALUES
        parses.clear()
        for content in (body, iter([body[:1000], body[1000:]])):  # declared, and streamed in two chunks
            r = api.post("/predict", content=content, headers=mine)
            assert r.status_code == 413, r.text[:300]
            detail = r.json()["detail"]
            assert f"at most {USER_MAX_JSON_VALUES}" in detail and "data_b64" in detail
        assert parses == []
        r = api.post("/predict", content=body, headers={**keys.service, "Content-Type": "application/json"})
        assert r.status_code in (200, 422), r.text[:300]  # trusted keys: parsed and answered ([[0]] has 1 sample)
    # the longest note a user may keep, all brackets and commas, is one value
    note = "[{," * 3333
    r = api.patch(f"/users/{user['id']}", json={"notes": note}, headers=mine)
    assert r.status_code == 200 and r.json()["notes"] == note, r.text[:300]
    docs = api.get("/openapi.json").json()["paths"]["/predict"]["post"]
    assert f"{USER_MAX_JSON_VALUES} JSON values" in docs["description"]
    assert str(USER_MAX_JSON_VALUES) in docs["responses"]["413"]["description"]


def test_keys_nobody_can_verify_share_the_in_flight_limit(monkeypatch):
    """While the database is down a key that is not cached cannot be verified: KeyBeforeBody lets such a request
    through with the user limits, and counted its in-flight requests under the key it named. Every made-up key was
    a new count, so anyone, with no key at all, could have any number of bodies parsed at once during an outage
    (the route then answers 503 anyway). Unverified keys now share one count."""
    import asyncio
    from types import SimpleNamespace

    from ml_model.rest import auth
    from ml_model.rest.pool import DatabaseUnavailable

    async def unverifiable(state, key):
        raise DatabaseUnavailable("database unavailable: test")

    monkeypatch.setattr(auth, "verified_principal", unverifiable)

    async def run() -> list[int]:
        release = asyncio.Event()
        entered = 0

        async def inner(scope, receive, send):  # the route: holds its place until released
            nonlocal entered
            entered += 1
            await release.wait()
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        mw = auth.KeyBeforeBody(inner)
        app = SimpleNamespace(state=SimpleNamespace(semg=object()))
        statuses: list[int] = []

        async def request(key: str) -> None:
            scope = {"type": "http", "path": "/predict", "method": "POST", "app": app,
                     "headers": [(b"content-length", b"2"), (b"x-api-key", key.encode())]}

            async def receive():
                return {"type": "http.request", "body": b"{}", "more_body": False}

            async def send(message):
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            await mw(scope, receive, send)

        tasks = [asyncio.create_task(request(f"semg_made_up_{i}")) for i in range(auth.USER_MAX_IN_FLIGHT + 3)]
        for _ in range(50):
            await asyncio.sleep(0)
        held = entered
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert not mw.in_flight, mw.in_flight  # every place freed
        return [held, *statuses]

    held, *statuses = asyncio.run(run())
    assert held == auth.USER_MAX_IN_FLIGHT, f"{held} requests with unverifiable keys under way at once"
    assert statuses.count(429) == 3, statuses
