"""Open a local HTML page in headless Chromium: figures drawn, images shown, console errors, a screenshot.

Debian's ``chromium`` (``make browser`` installs it) driven by Playwright. The machine may have
no network, so the flags keep Chromium from reaching out (it would log refused connections).
Run as a script to check pages by hand: ``python tests/browser.py PAGE.html [SHOT.png]``.
"""

import contextlib
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: a plotly figure has drawn when its div holds plotly's SVG
DRAWN = "[...document.querySelectorAll('.js-plotly-plot')].filter(d => d.querySelector('.main-svg')).length"


@dataclass
class Page:
    """What a page showed: plotly figures drawn, images loaded, console errors, its screenshot.

    ``scroll_width``: the page's width in CSS pixels; above the window's, something runs off it.
    """

    plots: int
    images: int
    scroll_width: int
    errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None


def chromium() -> str | None:
    """The Chromium executable, or ``None`` (then the browser tests skip, saying so)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def open_page(path: Path, screenshot: Path, *, plots: int, width: int = 1280, timeout_s: float = 60) -> Page:
    """Load ``path``, wait until ``plots`` figures drew (or ``timeout_s``), screenshot the full page."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=chromium(),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": width, "height": 900},
        )
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.resolve().as_uri(), wait_until="load")
        if plots:
            # fewer figures than expected end the wait at the timeout: the count below says how many
            with contextlib.suppress(Exception):
                page.wait_for_function(f"{DRAWN} >= {plots}", timeout=timeout_s * 1000)
        drawn = page.evaluate(DRAWN)
        images = page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth).length")
        scroll_width = page.evaluate("document.documentElement.scrollWidth")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        context.close()
    return Page(plots=drawn, images=images, scroll_width=scroll_width, errors=errors, screenshot=screenshot)


if __name__ == "__main__":
    page = Path(sys.argv[1])
    shot = Path(sys.argv[2]) if len(sys.argv) > 2 else page.with_suffix(".png")
    print(open_page(page, shot, plots=0 if len(sys.argv) < 4 else int(sys.argv[3])))
