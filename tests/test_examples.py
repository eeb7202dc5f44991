"""The quickstart example runs as a plain script on a synthetic stream."""

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "avalanche_quickstart.py"


def test_quickstart_runs_on_tiny_stream():
    done = subprocess.run([sys.executable, str(EXAMPLE), "--benchmark", "tiny", "--epochs", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("after experience")]
    assert len(lines) == 3
    assert "experts 4" in lines[-1] and "I(E;Y)" in lines[-1]
