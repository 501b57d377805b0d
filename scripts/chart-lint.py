#!/usr/bin/env python3
"""Lints a chart with Helm's own library (helm-sdkpy) and exits non-zero
when Helm reports an error. Usage: chart-lint.py CHART_DIR"""

import asyncio
import json
import sys

from helm_sdkpy import Configuration
from helm_sdkpy.chart import Lint


def main() -> int:
    chart = sys.argv[1] if len(sys.argv) > 1 else "charts/amoskys"
    with Configuration(namespace="default") as config:
        result = asyncio.run(Lint(config).run(chart))
    print(json.dumps(result, indent=2, sort_keys=True))
    # Helm's severities: 1 info, 2 warning, 3 error; like `helm lint
    # --strict`, warnings fail too. helm-sdkpy returns the messages' text
    # empty, so `helm lint` (tests/chart.rs) is the place to read them.
    bad = [m for m in result.get("Messages") or [] if m.get("Severity", 0) >= 2]
    errors = len(result.get("Errors") or [])
    if bad or errors:
        paths = ", ".join(sorted({m.get("Path", "?") for m in bad}))
        print(f"chart-lint: {chart}: {errors} error(s), {len(bad)} finding(s) in {paths}", file=sys.stderr)
        return 1
    print(f"chart-lint: {chart}: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
