"""Assertions shared by the page tests."""

from __future__ import annotations


def texts(at) -> str:
    """Everything the page shows as text (for 'does it tell the user what to do' assertions)."""
    parts = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error", "success",
                 "metric", "text"):
        for el in at.get(kind):
            parts.append(str(getattr(el, "value", "")) + " " + str(getattr(el, "label", "") or ""))
    for el in at.get("html"):
        parts.append(str(el.proto.body))
    return "\n".join(parts)


def assert_clean(at) -> None:
    """No exception element and no 'Something went wrong' fallback on the page."""
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error if "Something went wrong" in e.value]
    assert not errors, errors
