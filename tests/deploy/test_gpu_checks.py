"""tools/gpu_checks.sh: the prepared GPU run refuses what it cannot run before touching
anything (a lent GPU's minutes are few), and every section it names has a command."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "gpu_checks.sh"


def _run(*args, tmp_path):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})


def test_unknown_or_missing_sections_exit_2_before_any_work(tmp_path):
    for args in (("bench", "nonsense"), ()):
        r = _run(*args, tmp_path=tmp_path)
        assert r.returncode == 2 and "tests bench protocol lenet5 speech latency resnet" in r.stderr
        assert not (tmp_path / "out").exists()


def test_every_listed_section_has_a_command():
    text = SCRIPT.read_text()
    listed = re.search(r'SECTIONS=" (.*) "', text).group(1).split()
    branches = re.findall(r"^\s+(\w+)\) timed ", text, flags=re.M)
    assert sorted(listed) == sorted(branches)
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
