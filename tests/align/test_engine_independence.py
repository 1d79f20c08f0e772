"""The alignment engine imports nothing of the model it checks: not the Paddle model package, not
mmdet's reference, not the converter, not mmdet itself, not the GHM client."""
from __future__ import annotations

import subprocess
import sys

from tests.paths import ROOT

BLOCKED = ("paddle_impl", "torch_ref", "weights_convert", "mmdet", "mmengine", "mmcv", "align.ghm", "align.examples",
           "align.pair",
           "align.forward", "align.loss", "align.backward", "align.data", "align.predict", "align.metric",
           "align.train", "align.deploy")

# A meta-path finder that refuses the blocked packages, then every engine module imported,
# and a scan of the engine's source for GHM names.
PROBE = f"""
import importlib, pkgutil, sys
BLOCKED = {BLOCKED!r}

class Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError("blocked: " + name)
        return None

sys.meta_path.insert(0, Block())
import align.engine
names = [m.name for m in pkgutil.iter_modules(align.engine.__path__, "align.engine.")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
print("modules", len(names), "leaked", leaked)
"""


def test_engine_imports_with_model_packages_blocked():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "leaked []" in done.stdout
    # Every module of the engine was imported, not just its package.
    assert int(done.stdout.split()[1]) >= 6


def test_the_probe_catches_a_blocked_import(tmp_path):
    # The same probe against a module that imports the Paddle model package must fail.
    package = tmp_path / "fake_engine"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bad.py").write_text("import paddle_impl.config\n")
    probe = PROBE.replace("import align.engine", "import fake_engine as engine_pkg")
    probe = probe.replace("align.engine.__path__, \"align.engine.\"", "engine_pkg.__path__, \"fake_engine.\"")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0 and "blocked: paddle_impl" in done.stderr


def test_engine_source_names_no_model():
    for path in (ROOT / "align" / "engine").rglob("*.py"):
        text = path.read_text().lower()
        for word in ("ghm", "retinanet", "mmdet", "paddle_impl", "torch_ref"):
            assert word not in text, f"{path.relative_to(ROOT)} mentions {word}"
