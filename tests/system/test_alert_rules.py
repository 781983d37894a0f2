"""The alert rules fire as an operator expects: `promtool test rules` (Debian's prometheus package, which
`make test` installs) evaluates infra/prometheus/alerts.yml over the series in tests/prometheus/."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RULE_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"


def test_the_alert_rules_fire_as_their_unit_tests_say() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make tools` installs Debian's prometheus package"
    done = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
