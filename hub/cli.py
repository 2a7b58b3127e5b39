"""``fleet-hub``: not built yet; says so instead of pretending (issue: Hub)."""

from __future__ import annotations

import sys


def main() -> None:
    sys.stderr.write("error: fleet-hub is not yet available in this release (fleet-hub)\n")
    sys.exit(2)
