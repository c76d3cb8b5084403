"""Lints the Helm chart with the Helm v4 library (helm-sdkpy) and fails on any error or warning.

Helm is not packaged for Debian; the helm-sdkpy wheel carries the Helm library itself.
"""
import asyncio
import sys

import helm_sdkpy

SEVERITY = {1: "INFO", 2: "WARNING", 3: "ERROR"}


def main(chart: str) -> int:
    result = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(chart))
    failed = bool(result.get("Errors"))
    for message in result.get("Messages") or []:
        severity = SEVERITY.get(message.get("Severity"), "UNKNOWN")
        print(f"helm lint: {severity} {message.get('Path')}: {message.get('Err') or ''}")
        failed |= message.get("Severity", 0) >= 2
    if result.get("TotalChartsLinted") != 1:
        print(f"helm lint: {chart} was not linted: {result}")
        failed = True
    print(f"helm lint {chart}: {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "charts/ignis"))
