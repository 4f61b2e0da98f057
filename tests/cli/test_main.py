import pytest

from cnc_ad import __version__
from cnc_ad.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_without_command(capsys):
    assert main([]) == 0
    assert "typical workflow" in capsys.readouterr().out
