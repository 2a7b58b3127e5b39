"""``python -m provisioning.cli``: the same as ``fleet-provision``."""

from __future__ import annotations

import sys

from provisioning.cli import main

sys.exit(main())
