"""Open a page in headless Chromium (the command line, no Selenium) and read back what it rendered:
the DOM's text and a screenshot. Tests skip, saying why, where no chromium binary exists;
.ci/run installs Debian's `chromium` when it runs as root."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageStat

BINARIES = ("chromium", "chromium-browser", "google-chrome")


class _Text(HTMLParser):
    """The text a reader sees (no style or script contents), and the tags the DOM holds."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.tags: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        self._skip += tag in ("style", "script", "title")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("style", "script", "title") and self._skip > 0

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def page_text(html: str) -> tuple[str, list[str]]:
    """(the visible text with whitespace collapsed, every tag name in document order)."""
    parser = _Text()
    parser.feed(html)
    return " ".join(" ".join(parser.parts).split()), parser.tags


@dataclass
class Rendered:
    dom: str
    text: str
    tags: list[str]
    screenshot: Image.Image


def render(page: Path, workdir: Path, width: int = 1280, height: int = 2000) -> Rendered:
    """Load `page` from disk in headless Chromium; its DOM after loading and a screenshot."""
    binary = next((b for b in map(shutil.which, BINARIES) if b), None)
    if binary is None:
        pytest.skip("no chromium binary on PATH (`apt-get install chromium`; .ci/run installs it as root)")
    shot = workdir / "screenshot.png"
    # --no-sandbox: Chromium refuses to start as root without it; a private profile per call keeps
    # parallel tests (pytest -n) from sharing one
    proc = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={workdir / 'chromium-profile'}",
            "--dump-dom",
            f"--screenshot={shot}",
            f"--window-size={width},{height}",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and shot.is_file(), f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    text, tags = page_text(proc.stdout)
    return Rendered(proc.stdout, text, tags, Image.open(shot).convert("RGB"))


def assert_not_blank(image: Image.Image) -> None:
    """A page that rendered: many colours (text, tables, plots) and real variation, not one flat fill."""
    small = image.resize((image.width // 4, image.height // 4))
    colours = small.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 200, f"only {len(colours)} colours: the screenshot looks blank"
    assert max(ImageStat.Stat(small).stddev) > 10, "almost no variation in the screenshot: it looks blank"


def keep_screenshot(image: Image.Image, name: str) -> None:
    """Copy a screenshot to $SURGERY_SCREENSHOTS (when set), to look at after the test."""
    import os

    folder = os.environ.get("SURGERY_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        image.save(Path(folder) / name)
