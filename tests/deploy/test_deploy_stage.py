"""The deploy stage: bad input refused before any work, and the whole stage at a small scale, as
given and with a perturbed weight in the exported copy (tests/deploy/test_deploy.py covers the
export and the engines one by one)."""
from __future__ import annotations

import pytest

from align.deploy.__main__ import main
from align.deploy.stage import DeployOptions, first_divergence, run_deploy
from tests.align.test_report_layout import assert_figures_lead

SMALL_SCALE = (320, 192)


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


@pytest.mark.slow
def test_the_stage_passes_and_catches_a_perturbed_export(tmp_path_factory):
    build = tmp_path_factory.mktemp("build")
    reports = tmp_path_factory.mktemp("reports")
    result = run_deploy(DeployOptions(scale=SMALL_SCALE, reports=reports, build_dir=build))
    assert result.passed, [(t.name, t.reason) for t in result.tensors if not t.passed][:5]
    assert result.meta["worst_raw_rel"] <= 1e-5
    for suffix in ("_paddle.npy", "_torch.npy", ".json", ".html"):
        assert (reports / f"deploy{suffix}").is_file(), suffix
    # The page leads with the verdict and the raw outputs' figure, the tables below.
    assert_figures_lead((reports / "deploy.html").read_text(), figures=1)

    perturbed = run_deploy(DeployOptions(scale=SMALL_SCALE, reports=tmp_path_factory.mktemp("perturbed"),
                                         build_dir=build, perturb="neck.fpn_convs.0.conv.weight"))
    assert not perturbed.passed
    # The perturbed FPN output feeds P3's head first; the dynamic graph is untouched.
    first = str(first_divergence(perturbed))
    assert "raw." in first and "P3" in first and ".dynamic." not in first, first
