"""The round log: every ReSTEM round of a state database (table restem_rounds)
and how often each context has been trained on (table restem_contexts), per
policy file. The tables are created with the rest of the schema (memory/state.py).

A round is written twice: `start` records it as `interrupted`, so a crash
mid-round leaves that mark; `finish` replaces it with the decision and the
round's full record in the same transaction that counts its contexts' uses and
logs the restem.round event.
"""

from __future__ import annotations

import json
from typing import Any

from ..memory.state import State, now


class RoundLog:
    def __init__(self, state: State):
        self.state = state

    def start(self, policy: str) -> tuple[int, str]:
        """A new round of `policy`: its id and start time."""
        started = now()
        round_id = self.state.write(
            "INSERT INTO restem_rounds(policy, started_at, decision) VALUES (?, ?, 'interrupted')",
            (policy, started), None)
        return round_id, started

    def finish(self, record: dict[str, Any]) -> None:
        """Close the round `record["round"]` with `record`'s decision and policy version;
        each of its training contexts counts one more use."""
        round_id, policy = record["round"], record["policy"]
        decision, version = record["decision"], record["policy_version"]
        used = [c["id"] for c in record["contexts"]]
        with self.state.transaction() as c:
            c.execute("UPDATE restem_rounds SET finished_at = ?, decision = ?, policy_version = ?, record = ?"
                      " WHERE id = ?", (now(), decision, version, json.dumps(record), round_id))
            for cid in used:
                c.execute("INSERT INTO restem_contexts(policy, context_id, uses, last_round) VALUES (?, ?, 1, ?)"
                          " ON CONFLICT(policy, context_id) DO UPDATE SET uses = uses + 1,"
                          " last_round = excluded.last_round", (policy, cid, round_id))
            self.state.event(
                "restem.round", f"ReSTEM round {round_id} ({policy}): {decision}, policy version {version}"
                f" ({len(record['winners'])} winners of {len(used)} contexts); {record['reason']}", conn=c,
                data={"round": round_id, "decision": decision, "policy_version": version,
                      "heldout": record["heldout"], "winners": len(record["winners"])})

    def fail(self, round_id: int, reason: str, facts: dict[str, Any]) -> None:
        """Close round `round_id` as failed (no decision, the policy unchanged), saying why."""
        with self.state.transaction() as c:
            c.execute("UPDATE restem_rounds SET finished_at = ?, decision = 'failed', record = ? WHERE id = ?",
                      (now(), json.dumps({"round": round_id, "decision": "failed", "reason": reason, **facts}),
                       round_id))
            self.state.event("restem.round", f"ReSTEM round {round_id}: failed; {reason}", conn=c,
                             data={"round": round_id, "decision": "failed"})

    def uses(self, policy: str) -> dict[str, int]:
        """Per context id: how many rounds of `policy` have trained on it."""
        rows = self.state.query("SELECT context_id, uses FROM restem_contexts WHERE policy = ?", (policy,))
        return {r["context_id"]: r["uses"] for r in rows}

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest rounds, newest first, without their full records."""
        rows = self.state.query("SELECT * FROM restem_rounds ORDER BY id DESC LIMIT ?", (limit,))
        return [{"round": r["id"], "policy": r["policy"], "started_at": r["started_at"],
                 "finished_at": r["finished_at"], "decision": r["decision"], "policy_version": r["policy_version"]}
                for r in rows]
