"""``fleet-sim``: not built yet; says so instead of pretending (issue: Simulator)."""

from __future__ import annotations

import sys


def main() -> None:
    sys.stderr.write("error: fleet-sim is not yet available in this release (fleet-sim)\n")
    sys.exit(2)
