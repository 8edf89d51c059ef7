"""The documentation site builds with warnings as errors: every guide page, every API page
(from the docstrings), every link."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_and_its_api_reference_build_strictly(tmp_path: Path) -> None:
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("api/geometry", "api/optim", "api/fisher", "api/fora", "optim", "results"):
        assert (tmp_path / page / "index.html").is_file(), page
    reference = (tmp_path / "api" / "optim" / "index.html").read_text()
    assert "StiefelAdam" in reference and "nonfinite" in reference  # built from docstrings
