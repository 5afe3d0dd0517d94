"""Drives the Streamlit UI in a real browser (Playwright) the way a person does: sidebar navigation, labelled
widgets, visible text. Shared by the end-to-end test; every step waits for what the user would wait for."""

from __future__ import annotations

import re
import time
from pathlib import Path

from playwright.sync_api import Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


def _same_value(shown: str, typed: str) -> bool:
    """A number input may show 500.00 for 500.0."""
    if shown == typed:
        return True
    try:
        return float(shown) == float(typed)
    except ValueError:
        return False


class Ui:
    def __init__(self, page: Page, base_url: str, shots: Path):
        self.page, self.base_url, self.shots = page, base_url.rstrip("/"), shots
        self.shots.mkdir(parents=True, exist_ok=True)
        self.taken: list[Path] = []

    # ---- basics ------------------------------------------------------------------------------------
    def wait_idle(self, timeout: float = 30) -> None:
        """Until Streamlit's 'running' indicator is gone (fragments that poll may flash it; tolerate that)."""
        deadline = time.monotonic() + timeout
        quiet_since = None
        while time.monotonic() < deadline:
            running = self.page.locator('[data-testid="stStatusWidget"]').count() > 0
            if running:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 0.6:
                return
            time.sleep(0.1)

    def text(self, text: str | re.Pattern, timeout: float = 30, exact: bool = False):
        loc = self.page.get_by_text(text, exact=exact).first
        expect(loc).to_be_visible(timeout=timeout * 1000)
        return loc

    def shot(self, name: str) -> Path:
        """A screenshot of the whole page: Streamlit scrolls inside its main block, so the viewport is made as
        tall as that block for the picture."""
        self.wait_idle()
        # plotly draws (and redraws after a resize) asynchronously; the other elements are laid out at once
        plots = self.page.locator('[data-testid="stPlotlyChart"], .js-plotly-plot').count() > 0
        if plots:
            time.sleep(0.8)  # let plotly finish drawing
        size = self.page.viewport_size
        height = self.page.evaluate(
            "() => { const m = document.querySelector('[data-testid=\"stMain\"]');"
            " return m ? m.scrollHeight : document.body.scrollHeight; }")
        path = self.shots / f"{len(self.taken) + 1:02d}-{name}.png"
        try:
            if height > size["height"]:
                self.page.set_viewport_size({"width": size["width"], "height": min(int(height) + 40, 6000)})
                if plots:
                    time.sleep(0.8)  # plotly resizes to the new layout
                else:  # two animation frames: the new layout is painted (data grids redraw their canvas)
                    self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
            self.page.screenshot(path=str(path), full_page=True)
        finally:
            self.page.set_viewport_size(size)
        self.taken.append(path)
        return path

    def login(self, password: str) -> None:
        self.page.goto(self.base_url + "/")
        self.page.get_by_label("Password", exact=True).fill(password)
        self.page.get_by_role("button", name="Sign in").click()
        self.text("Your first five minutes")

    def goto(self, nav_label: str, title: str) -> None:
        """Client-side navigation through the sidebar, as a person clicks (a full reload would start a new session).

        As a person would, it waits for the page to settle first: a link clicked while a button's rerun was still
        being delivered was seen lost on a loaded machine (the browser stayed on the old page for 30 s). The
        click is repeated once if the page has not switched after 15 s."""
        self.wait_idle()
        link = self.page.locator('[data-testid="stSidebarNav"] a').filter(has_text=nav_label).first
        heading = self.page.get_by_role("heading", name=re.compile(re.escape(title))).first
        link.click()
        try:
            heading.wait_for(timeout=15_000)
        except PlaywrightTimeoutError:
            link.click()
            heading.wait_for(timeout=30_000)
        self.wait_idle()

    def click(self, name: str, exact: bool = False) -> None:
        self.page.get_by_role("button", name=name, exact=exact).first.click()

    def fill(self, label: str, value: str, scope=None) -> None:
        root = scope or self.page
        field = root.get_by_label(label, exact=True).first
        for _attempt in range(3):
            field.fill(str(value))
            field.press("Tab")  # commit the value (Enter would submit a form)
            # A rerun that was under way when the value was typed re-renders the widget with its old value
            # (seen on a loaded machine: a device registered with the default channel count); type it again.
            time.sleep(0.3)
            if _same_value(field.input_value(), str(value)):
                return
        raise AssertionError(f"the field {label!r} does not keep the value {value!r} (shows {field.input_value()!r})")

    def multiselect(self, label_text: str, options: list[str]) -> None:
        box = self.page.locator('[data-testid="stMultiSelect"]').filter(has_text=label_text).first
        for opt in options:
            box.locator("input").click()
            self.page.get_by_role("option", name=opt, exact=True).click()
        self.page.keyboard.press("Escape")

    def select(self, label_text: str, option: str | re.Pattern) -> None:
        box = self.page.locator('[data-testid="stSelectbox"]').filter(has_text=label_text).first
        box.locator("input").click()
        self.page.get_by_role("option", name=option).first.click()

    # ---- the user's journey --------------------------------------------------------------------------
    def create_user(self, name: str, email: str) -> None:
        self.goto("User Management", "User Management")
        form = self.page.locator('[data-testid="stForm"]').filter(has_text="New user")
        self.fill("Name", name, form)
        self.fill("Email", email, form)
        form.get_by_role("button", name="Create user").click()
        self.text(f"Created {name}")

    def add_gestures(self, names: list[str]) -> None:
        self.goto("Gesture Management", "Gesture Management")
        self.multiselect("Quick-add from the library", names)
        self.click("Add selected")
        for n in names:
            self.page.locator('[data-testid="stDataFrame"]').first.wait_for()
        self.wait_idle()

    def register_device(self, channels: int, rate: float) -> tuple[int, str]:
        form = self.page.locator('[data-testid="stForm"]').filter(has_text="Register a device")
        self.fill("Channels", str(channels), form)
        self.fill("Sample rate (Hz)", str(rate), form)
        form.get_by_role("button", name="Register device").click()
        self.text("shown only once")
        code = self.page.locator('[data-testid="stCode"]').first.inner_text()
        device_id = int(re.search(r"#define SEMG_DEVICE_ID (\d+)", code).group(1))
        key = re.search(r'#define SEMG_DEVICE_KEY_HEX "([0-9a-f]+)"', code).group(1)
        return device_id, key

    def start_webcam(self, timeout: float = 60) -> bool:
        """Press START in the streamlit-webrtc component; True once the (fake) camera video plays."""
        frame = self.page.frame_locator('iframe[title*="webrtc"]').first
        frame.get_by_role("button", name=re.compile("^start$", re.I)).click(timeout=30_000)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            playing = frame.locator("video").evaluate_all(
                "vs => vs.some(v => v.readyState >= 2 && !v.paused && v.videoWidth > 0)")
            if playing:
                return True
            time.sleep(0.5)
        return False
