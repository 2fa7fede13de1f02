"""The short version of tests/soak.py: load, faults and hostile input at once, every check must pass."""

import re
import subprocess
import sys

from conftest import ROOT


def test_short_soak(tmp_path):
    report = tmp_path / "soak.json"
    # three heavy readers (soak.py's default): streamed exports keep the server far under the 256 MB check
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "soak.py"), "--stations", "100", "--seconds", "25",
                           "--slow", "100", "--heavy", "3", "--json", str(report)],
                          capture_output=True, text=True, timeout=300)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"readings answered 200: (\d+), verified in the database: \1, lost: 0,", proc.stdout)
    assert int(re.search(r"readings answered 200: (\d+)", proc.stdout).group(1)) > 500
    assert re.search(r"exports of 100000 rows answered whole: [1-9]", proc.stdout)
    assert "SIGTERM at" in proc.stdout and "kill -9 at" in proc.stdout and "write lock held" in proc.stdout
