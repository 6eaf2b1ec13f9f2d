"""Scratch state: a config whose state directory is elsewhere, for runs that
must not touch the live model (the continual run, the benchmark's ingest)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..config import Config


def scratch_config(cfg: Config, state_dir: Path, **sections: dict[str, Any]) -> Config:
    """`cfg` with its state in `state_dir`, and `sections` changed (e.g. replay={"gate": False}).

    The versions, the replay bank and the database start empty there; the base
    model's conversion stays the configured one, so it is not converted again.
    """
    paths = dataclasses.replace(cfg.paths, state_dir=str(state_dir), models=str(cfg.state_path("models")))
    changed = {name: dataclasses.replace(getattr(cfg, name), **values) for name, values in sections.items()}
    return dataclasses.replace(cfg, paths=paths, **changed)
