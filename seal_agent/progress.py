"""Progress reports: the callback a long job (learning a document, a ReSTEM
round, an evaluation) reports its stages through, and the one that ignores them.

A report is a stage name and what is known at that stage; callers render it
(the CLI's progress bars) or log it (the daemon). Imports nothing of the package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Progress = Callable[[str, dict[str, Any]], None]


def no_progress(_stage: str, _info: dict[str, Any]) -> None:
    """The default: nobody is watching."""
