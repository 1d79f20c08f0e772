"""Model-agnostic alignment engine: compare arrays, capture layer outputs, write stage reports.

- `compare`: `diff_arrays` (the one pass/fail rule; NaN and Inf always fail) and reprod_log logs.
- `capture`: torch forward hooks record layer outputs; Paddle hooks diff against them live.
- `report`: one JSON and one self-contained HTML page per stage, and an index.
"""
import warnings

# Paddle warns at import that ccache is absent; it only matters for compiling
# custom operators, which nothing here does.
warnings.filterwarnings("ignore", message="No ccache found")

from .compare import TensorDiff, diff_arrays, first_failure, reprod_log_diff, reprod_log_passed
from .capture import PaddleComparer, TorchRecorder, perturb_parameter
from .report import StageResult, environment_info, sha256_of, write_index, write_stage_report

__all__ = [
    "TensorDiff",
    "diff_arrays",
    "first_failure",
    "reprod_log_diff",
    "reprod_log_passed",
    "TorchRecorder",
    "PaddleComparer",
    "perturb_parameter",
    "StageResult",
    "write_stage_report",
    "write_index",
    "environment_info",
    "sha256_of",
]
