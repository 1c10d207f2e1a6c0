"""Files that readers must never see half-written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON to a temporary name beside ``path``, then rename it over ``path``.

    A reader sees the old file or the new one, never a part; values JSON does not know
    (paths, timestamps) are written as their ``str``.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)
