"""`runtime.choose_device`: one default device for every command (the spec's, a run's recorded
one), `auto` made concrete from what the machine has, an explicit --device winning."""

from __future__ import annotations

import pytest

from surgery.cli import build_parser
from surgery.train.runtime import choose_device


@pytest.mark.parametrize(
    "flag, spec_device, cuda, mps, expected",
    [
        (None, "auto", True, False, "cuda"),
        (None, "auto", False, False, "cpu"),
        (None, "auto", False, True, "mps"),
        (None, "cpu", True, False, "cpu"),  # the spec's own choice, even with a GPU
        (None, "cuda:1", True, False, "cuda:1"),
        ("cpu", "cuda", True, False, "cpu"),  # --device wins
        ("auto", "cpu", True, False, "cuda"),
        ("cuda", "auto", False, False, "cuda"),  # not checked here: resolve_device says it is absent
    ],
)
def test_the_device_is_the_flag_else_the_spec_s_with_auto_made_concrete(
    flag: str | None, spec_device: str, cuda: bool, mps: bool, expected: str
) -> None:
    assert choose_device(flag, spec_device, cuda=cuda, mps=mps) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "s.yaml"],
        ["sweep", "s.yaml"],
        ["lr-find", "s.yaml"],
        ["predict", "RUN", "x.png"],
        ["evaluate", "RUN"],
        ["explain", "RUN", "x.png"],
    ],
)
def test_every_command_defaults_to_the_spec_s_device(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).device is None  # None: choose_device takes the spec's
