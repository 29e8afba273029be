"""`warmserve operator`, `warmserve worker` and `warmserve router` hand their arguments to the components' own
parsers."""

from __future__ import annotations

import pytest

from warmserve.cli import main


@pytest.mark.parametrize(
    ("command", "usage"),
    [
        ("operator", "usage: warmserve operator"),
        ("worker", "usage: warmserve worker"),
        ("router", "usage: warmserve router"),
    ],
)
def test_component_help_comes_from_the_component(command, usage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert usage in capsys.readouterr().out


def test_simulate_still_rejects_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--bogus"])
    assert exit_info.value.code == 2
    assert "--bogus" in capsys.readouterr().err
