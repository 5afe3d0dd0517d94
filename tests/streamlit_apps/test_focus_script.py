"""uikit.focus_after_rerun: the script it puts on the next run keeps the texts it looks for as data, and runs once.
(Where the focus lands is checked in Chromium: tests/e2e/test_keyboard_focus.py.)"""

from __future__ import annotations

import json
import re

from test_ui_pages import button


def _targets_in(script: str) -> list[str]:
    found = re.search(r"const targets = (.*?), deadline = ", script)
    assert found, script
    return json.loads(found.group(1))


def test_the_targets_stay_data_in_the_script():
    """A name is someone's text: "</script>" in it would end the script and start markup, and a placeholder's
    name in it must not be replaced."""
    import uikit
    targets = ('Delete Zoe </SCRIPT><script>document.title="pwned"</script>…', 'a "quoted" \\ name',
               "x & <!-- y --> ]]> \u2028", "RUN TARGETS")
    script = uikit._focus_script(targets, 7)
    assert script.startswith("<script>") and script.endswith("</script>")
    inner = script[len("<script>"):-len("</script>")]
    assert not re.search(r"[<>&]", inner.split("const targets = ")[1].split(", deadline")[0]), inner
    assert "</script" not in inner.lower() and "<!--" not in inner
    assert _targets_in(script) == list(targets)
    assert "// run 7" in script


def test_the_focus_is_moved_on_the_next_run_only(page, seeded):
    """Cancel on the delete confirmation asks the next run to focus "Delete <name>…"; the run after it does not
    (the person's focus is theirs again)."""
    at = page("users", user_id=seeded["user"]["id"])
    at.run()
    button(at, f"Delete {seeded['user']['name']}").click()
    at.run()
    at.button(key="cancel_delete").click()
    at.run()
    scripts = [h.proto.body for h in at.sidebar.get("html") if "const targets" in h.proto.body]
    assert len(scripts) == 1 and _targets_in(scripts[0]) == [f"Delete {seeded['user']['name']}…"], scripts
    at.run()
    assert not [h for h in at.sidebar.get("html") if "const targets" in h.proto.body]
