"""The command line's flags and words: -v after the command, --num-images' bounds, --lag-threshold without
--residuals, and messages that name flags (and leave eval --set's field names as the library spells them)."""

from __future__ import annotations

import pytest

from prkit.cli import build_parser

COMMANDS = (["train", "--images", "imgs", "--out", "x.safetensors"], ["sample", "--prompt", "a photo"],
            ["info", "x.safetensors"], ["export", "x.safetensors", "--out", "y.safetensors"], ["eval"])


@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_verbose_goes_before_or_after_the_command(command):
    """`prkit train ... -v` was refused ("unrecognized arguments: -v"): only `prkit -v train ...` took it."""
    parser = build_parser()
    assert parser.parse_args(command).verbose is False
    for flag in ("-v", "--verbose"):
        assert parser.parse_args([flag, *command]).verbose is True  # the existing form
        assert parser.parse_args([*command, flag]).verbose is True
        assert parser.parse_args([flag, *command, flag]).verbose is True
