"""Strings a user controls, made safe for a page link or a terminal (surgery.untrusted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery.untrusted import href


@pytest.mark.parametrize(
    "target, url",
    [
        ("run/report.html", "./run/report.html"),
        ("../runs/run/report.html", "../runs/run/report.html"),  # climbing: already no scheme
        ("javascript:alert(1)/report.html", "./javascript%3Aalert%281%29/report.html"),
        ("data:text/html,<b>/report.html", "./data%3Atext/html%2C%3Cb%3E/report.html"),
        ("a b#c?d/report.html", "./a%20b%23c%3Fd/report.html"),
        ("%2e%2e/report.html", "./%252e%252e/report.html"),
        ('x"onmouseover=1/report.html', "./x%22onmouseover%3D1/report.html"),
        (Path("/tmp/a b/report.html"), "file:///tmp/a%20b/report.html"),
        (None, ""),
    ],
)
def test_href(target, url: str) -> None:
    assert href(target) == url
