"""Where t2r-export keeps what it can rebuild (token streams, calibration feeds, bench bundles).

One root for every cache, stdlib only: ``$T2R_EXPORT_CACHE`` when set, else ``$XDG_CACHE_HOME``
(or ``~/.cache``) ``/t2r_export``. Never the install tree, which may be read-only.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("T2R_EXPORT_CACHE"):
        return Path(os.environ["T2R_EXPORT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "t2r_export"
