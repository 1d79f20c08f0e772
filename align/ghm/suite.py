"""What the GHM stages share around the engine: the stage order, the packages every report
records, and the command-line runner with this project's traceback variable."""
import functools

from align.engine.cli import run_stage as _run_stage

# Set to show the traceback of a bad-input error (as for every command of the project).
TRACEBACK_ENV = "GHM_TRACEBACK"


def _stage_reports() -> tuple[str, ...]:
    """The report names of the stages, in `make align`'s order (``stages.txt``, which the Makefile reads too)."""
    from pathlib import Path

    lines = Path(__file__).with_name("stages.txt").read_text().splitlines()
    return tuple(line.split()[1] for line in lines if line.strip() and not line.startswith("#"))


# The order in which `make align` runs the stages (each builds on the ones before).
STAGE_ORDER = _stage_reports()

# Module name -> the distribution names it may be installed under.
PACKAGES = {
    "torch": ("torch",),
    "paddle": ("paddlepaddle", "paddlepaddle-gpu"),
    "mmdet": ("mmdet",),
    "mmcv": ("mmcv", "mmcv-full", "mmcv-lite"),
    "mmengine": ("mmengine",),
    "numpy": ("numpy",),
    "reprod_log": ("reprod_log", "reprod-log"),
}


def reference_versions() -> dict[str, str]:
    """The installed versions the reference side's results depend on (for cache keys), as
    installed: the same whether or not the modules are imported yet."""
    from importlib import metadata

    def installed(distributions) -> str:
        for name in distributions:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return "not installed"

    return {m: installed(PACKAGES[m]) for m in ("torch", "mmdet", "mmcv", "mmengine", "numpy")}


def reference_threads() -> int:
    """torch's math threads: the order of torch's CPU sums, so part of a cache key too."""
    import torch

    return torch.get_num_threads()


def environment():
    """`environment_info` of the packages above."""
    from align.engine.environment import environment_info

    return environment_info(PACKAGES)


def write_report(result, reports):
    """Write a stage's JSON and HTML into ``reports`` (with `environment` as its ``env`` when it
    has none) and refresh the index in this suite's order; returns ``result``."""
    from align.engine.report import write_stage_report

    if not result.env:
        result.env = environment()
    write_stage_report(result, reports, STAGE_ORDER)
    return result


# The engine's stage runner with this project's traceback variable.
run_stage = functools.partial(_run_stage, traceback_env=TRACEBACK_ENV)
