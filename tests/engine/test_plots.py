"""engine/plots.py without matplotlib (the portable GPU kit leaves it out): no plots, one line."""

import subprocess
import sys

from tests.support import REPO

WITHOUT_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # not installed: its import fails
from pathlib import Path
import numpy as np
from side4video.logs import setup_logging
from side4video.engine.plots import plot_confusion, plot_recall_curves
setup_logging()
out = Path(sys.argv[1])
assert plot_confusion(np.eye(2), ["a", "b"], out / "confusion.png") is None
assert plot_recall_curves({}, out / "recall.png") is None
assert not list(out.iterdir())
"""


def test_without_matplotlib_no_plots_are_drawn_and_one_line_says_so(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(said) == 1 and "matplotlib is not installed: no plots are drawn" in said[0], said
