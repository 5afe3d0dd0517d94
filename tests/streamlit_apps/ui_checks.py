"""Assertions shared by the page tests."""

from __future__ import annotations

import re


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


def headings(at) -> list[tuple[int, str]]:
    """The page's headings in document order, sidebar first as in the browser, as (level, text): st.title, st.header
    and st.subheader carry their tag (h1-h3), markdown its '#' lines (outside code blocks)."""
    found: list[tuple[int, str]] = []

    def walk(node) -> None:
        if node.type in ("title", "header", "subheader"):
            found.append((int(node.proto.tag[1:]), node.value))
        elif node.type == "markdown":
            fenced = False
            for line in node.value.splitlines():
                if line.lstrip().startswith("```"):
                    fenced = not fenced
                elif not fenced and (m := re.match(r" {0,3}(#{1,6})\s+(.*)", line)):
                    found.append((len(m.group(1)), m.group(2)))
        for i in sorted(getattr(node, "children", {})):
            walk(node.children[i])

    walk(at.sidebar)
    walk(at.main)
    return found


def assert_headings_in_order(at) -> None:
    """One h1 first, and no heading more than one level below the one before (axe heading-order): a screen reader
    user skimming by headings takes a jump from h1 to h3 for a missing section."""
    levels = headings(at)
    assert levels and levels[0][0] == 1, levels
    jumps = [(a, b) for a, b in zip(levels, levels[1:]) if b[0] > a[0] + 1]
    assert not jumps, f"headings skip a level: {jumps} (all: {levels})"
