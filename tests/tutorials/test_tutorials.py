"""Every tutorial runs end to end in its fast mode, so none of them rots."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))


@pytest.mark.parametrize("script", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_runs_in_fast_mode(script, tmp_path):
    out = tmp_path / "artifact"  # a figure or a checkpoint folder, whatever the tutorial writes
    proc = subprocess.run(
        [sys.executable, str(script), "--fast", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout
    size = sum(f.stat().st_size for f in out.rglob("*")) if out.is_dir() else out.stat().st_size
    assert size > 1000
