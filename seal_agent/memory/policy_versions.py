"""Versions of the self-edit policy: the line of LoRA policy adapters ReSTEM promotes.

One line per policy file, beside the knowledge versions and written the same
way (atomic directories, a manifest each):

    adapters/policy/<policy name>/v0002/adapter_config.json   # PEFT adapter
    adapters/policy/<policy name>/v0002/adapter_model.safetensors
    adapters/policy/<policy name>/v0002/manifest.json         # parent, round, winners, held-out result

Version 0 is the policy file's prompt alone (no adapter). Which version is
promoted is a row in the database's meta table; `rollback` moves it back to
any stored version. The knowledge weights never contain a policy adapter: it
is attached only while self-edits are written, then taken off.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..errors import SealError
from .adapter_log import AdapterLog
from .state import State, now


class PolicyVersions:
    def __init__(self, state: State, adapters_root: Path, policy_name: str):
        self.state = state
        self.policy = policy_name
        self.log = AdapterLog(adapters_root / "policy" / policy_name)
        self._key = f"policy_version:{policy_name}"

    def active(self) -> int:
        return int(self.state.get_meta(self._key, "0"))

    def adapter_dir(self, version: int | None = None) -> Path | None:
        """The adapter of `version` (default: the promoted one); None for version 0."""
        version = self.active() if version is None else version
        if version == 0:
            return None
        if not self.log.has(version):
            raise SealError(f"policy version {version} of '{self.policy}' is missing from {self.log.root}")
        return self.log.path(version)

    def label(self, version: int | None = None) -> str:
        """How self-edits record what wrote them: 'implications' or 'implications@v2'."""
        version = self.active() if version is None else version
        return self.policy if version == 0 else f"{self.policy}@v{version}"

    def versions(self) -> list[int]:
        return [0] + self.log.versions()

    def manifest(self, version: int) -> dict[str, Any]:
        if version == 0:
            return {"version": 0, "policy": self.policy, "parent": None,
                    "description": "the policy file's prompt alone, no adapter"}
        if not self.log.has(version):
            known = ", ".join(str(v) for v in self.versions())
            raise SealError(f"no policy version {version} of '{self.policy}' (known: {known})")
        return self.log.manifest(version)

    def rows(self) -> list[dict[str, Any]]:
        active = self.active()
        out = []
        for v in self.versions():
            m = self.manifest(v)
            heldout = m.get("heldout") or {}
            out.append({"version": v, "active": v == active, "parent": m.get("parent"),
                        "created_at": m.get("created_at"), "round": m.get("round"),
                        "winners": m.get("winners"), "heldout_old": heldout.get("old"),
                        "heldout_new": heldout.get("new")})
        return out

    def promote(self, adapter_dir: Path, manifest: dict[str, Any], round_id: int | None = None) -> int:
        """Store a trained adapter as the next version and make it the promoted one."""
        version = max(self.versions()) + 1
        parent = self.active()
        full = {"version": version, "policy": self.policy, "parent": parent, "created_at": now(),
                "round": round_id, **manifest}

        def copy_adapter(tmp: Path) -> None:
            for f in adapter_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)

        self.log.write_version(version, copy_adapter, lambda: full)
        with self.state.transaction() as c:
            self.state.set_meta(self._key, str(version), conn=c)
            self.state.event("policy.promote", f"policy {self.policy}: version {parent} -> {version}", conn=c,
                             data={"policy": self.policy, "from": parent, "to": version, "round": round_id})
        return version

    def keep_rejected(self, adapter_dir: Path, round_id: int, reason: str) -> Path:
        """A trained candidate that was not promoted, kept for inspection (and
        `eval squad --policy-adapter`); never used to write self-edits."""
        dest = self.log.root / "rejected" / f"round-{round_id:04d}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(adapter_dir, dest, dirs_exist_ok=True)
        (dest / "REJECTED.txt").write_text(reason + "\n", encoding="utf-8")
        return dest

    def rollback(self, version: int) -> dict[str, Any]:
        self.manifest(version)  # exists?
        previous = self.active()
        with self.state.transaction() as c:
            self.state.set_meta(self._key, str(version), conn=c)
            self.state.event("policy.rollback", f"policy {self.policy}: version {previous} -> {version}", conn=c,
                             data={"policy": self.policy, "from": previous, "to": version})
        return {"policy": self.policy, "from": previous, "version": version}
