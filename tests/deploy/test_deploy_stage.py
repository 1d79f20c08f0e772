"""The deploy stage refuses bad input before any work (the whole stage runs in `make align-deploy`:
about 3 minutes, too long for the suite; tests/deploy/test_deploy.py covers its comparisons)."""
from __future__ import annotations

import pytest

from align.deploy.__main__ import main


def test_an_unknown_perturbed_parameter_is_one_line_and_writes_no_report(tmp_path, capsys):
    status = main(["--perturb", "neck.fpn_convs.9.conv.weight", "--reports", str(tmp_path / "reports"),
                   "--build-dir", str(tmp_path / "build")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(err) == 1 and "--perturb neck.fpn_convs.9.conv.weight" in err[0], err
    assert not (tmp_path / "reports" / "deploy.json").exists()
    assert not (tmp_path / "build").exists()


def test_a_bad_scale_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--scale", "640"])
    assert stop.value.code == 2
    assert "--scale" in capsys.readouterr().err
