"""The adapter log: every accepted update, on disk, as a plain PEFT adapter.

Layout (under `adapters/`, one line of versions per kind):

    knowledge/v0003/adapter_config.json        # PEFT: PeftModel.from_pretrained loads it
    knowledge/v0003/adapter_model.safetensors
    knowledge/v0003/manifest.json              # version, parent, document, passages,
                                               # self-edit, hyperparameters, losses, timing, QA
    knowledge/snapshots/v0010/model.safetensors  # merged weights at v0010 (fast start-up)
    knowledge/snapshots/v0010/manifest.json

Every write goes to a hidden temp directory beside its target, is fsynced,
and is renamed into place, so a crash never leaves a half-written version:
either the directory exists complete, or it does not exist. Leftover temp
directories from a crash are removed by `repair`, which only the owner of the
state directory calls (see lock.py): a reader must never touch a directory the
owner is writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Create directory `target` atomically: the block fills the temp dir it is
    given, which is fsynced and renamed to `target` when the block ends (and
    removed if it raises). Refuses to overwrite an existing target."""
    if target.exists():
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """`staged_dir` for a writer that is one call: `write(tmp)` fills the temp dir."""
    with staged_dir(target) as tmp:
        write(tmp)
    return target


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class AdapterLog:
    """One line of versions (e.g. knowledge, policy, modules) under `root`;
    version N lives in `<prefix>NNNN/`."""

    def __init__(self, root: Path, prefix: str = "v"):
        self.root = root
        self.prefix = prefix
        self._dir = re.compile(rf"^{re.escape(prefix)}(\d{{4,}})$")
        self.root.mkdir(parents=True, exist_ok=True)
        self.snapshots = root / "snapshots"

    def repair(self) -> list[Path]:
        """Remove temp directories a crash left behind; for the state directory's owner only."""
        leftovers = list(self.root.glob(".tmp-*")) + list(self.snapshots.glob(".tmp-*"))
        for leftover in leftovers:
            shutil.rmtree(leftover, ignore_errors=True)
        return leftovers

    def name(self, version: int) -> str:
        return f"{self.prefix}{version:04d}"

    def path(self, version: int) -> Path:
        return self.root / self.name(version)

    def versions(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := self._dir.match(p.name)))

    def has(self, version: int) -> bool:
        return (self.path(version) / "manifest.json").exists()

    def staging(self, version: int) -> contextlib.AbstractContextManager[Path]:
        """A new version's directory while it is written (`staged_dir`): the PEFT
        files, then its manifest (`write_manifest`) last; in place once the block ends."""
        return staged_dir(self.path(version))

    @staticmethod
    def write_manifest(version_dir: Path, manifest: dict[str, Any]) -> None:
        write_json(version_dir / "manifest.json", manifest)

    def write_version(
        self, version: int, save_adapter: Callable[[Path], None], make_manifest: Callable[[], dict[str, Any]]
    ) -> Path:
        """Store an adapter and its manifest as one atomic directory: `save_adapter(dir)`
        writes the PEFT files, then `make_manifest()` (called after it) gives the manifest."""
        with self.staging(version) as tmp:
            save_adapter(tmp)
            self.write_manifest(tmp, make_manifest())
        return self.path(version)

    def manifest(self, version: int) -> dict[str, Any]:
        return json.loads((self.path(version) / "manifest.json").read_text(encoding="utf-8"))

    def quarantine(self, version: int, reason: str) -> Path:
        """Move a version directory aside (never deleted), e.g. one the database never committed."""
        src = self.path(version)
        dst = self.root / "discarded" / f"{self.name(version)}-{uuid.uuid4().hex[:8]}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)
        (dst / "DISCARDED.txt").write_text(reason + "\n", encoding="utf-8")
        return dst

    # -- snapshots -------------------------------------------------------
    def snapshot_path(self, version: int) -> Path:
        return self.snapshots / self.name(version)

    def snapshot_versions(self) -> list[int]:
        if not self.snapshots.exists():
            return []
        return sorted(
            int(m.group(1)) for p in self.snapshots.iterdir()
            if (m := self._dir.match(p.name)) and (p / "model.safetensors").exists()
        )

    def write_snapshot(self, version: int, state_dict: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
        def write(tmp: Path) -> None:
            # Tied weights share storage; safetensors wants each tensor once.
            unique = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
            save_file(unique, str(tmp / "model.safetensors"))
            write_json(tmp / "manifest.json", manifest)

        return atomic_dir(self.snapshot_path(version), write)

    def read_snapshot(self, version: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.snapshot_path(version) / "model.safetensors"))

    def prune_snapshots(self, keep: int, protect: set[int] = frozenset()) -> list[int]:
        """Keep the newest `keep` snapshots plus those in `protect`; delete the rest
        (a snapshot is only a cache: the deltas can always rebuild it)."""
        removed = []
        for v in self.snapshot_versions()[:-keep] if keep > 0 else self.snapshot_versions():
            if v in protect:
                continue
            shutil.rmtree(self.snapshot_path(v))
            removed.append(v)
        return removed
