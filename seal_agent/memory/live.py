"""The live model: base weights + accepted LoRA deltas merged in order.

A version's weights are rebuilt from the nearest consolidated snapshot in its
lineage (or the base checkpoint) by merging the remaining deltas in order with
PEFT, which is exactly what happened when the version was first made, so the
rebuilt weights are bit-identical. Each version records two fingerprints:
sha256 of all weights and sha256 of the logits on a fixed probe text;
`load` can verify both.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch
from peft import PeftModel

from ..config import Config
from ..errors import SealError
from ..model.loader import load_model, load_tokenizer, resolve_base
from .adapter_log import AdapterLog
from .state import State, VersionRow, now

log = logging.getLogger(__name__)

PROBE_TEXT = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
    "a region in France. Question: Who was the leader of the Norse raiders? Answer:"
)


def weights_fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.inference_mode()
def probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    return model(input_ids=ids).logits[0].float().cpu()


def logits_fingerprint(model, tokenizer) -> str:
    return hashlib.sha256(probe_logits(model, tokenizer).numpy().tobytes()).hexdigest()


def fingerprints(model, tokenizer) -> dict[str, str]:
    return {"weights": weights_fingerprint(model), "logits": logits_fingerprint(model, tokenizer)}


class LiveModel:
    """The model being served and updated, and which version it is."""

    def __init__(self, cfg: Config, state: State, log_: AdapterLog):
        self.cfg = cfg
        self.state = state
        self.log = log_
        self.base_dir: Path = resolve_base(cfg)
        self.tokenizer = load_tokenizer(self.base_dir)
        self.model = None
        self.version: int | None = None
        if state.live_version() is None:
            self._init_base()

    def _init_base(self) -> None:
        """First use of a state directory: version 0 is the base model."""
        self.model = load_model(self.base_dir, self.cfg)
        self.version = 0
        fp = fingerprints(self.model, self.tokenizer)
        row = VersionRow(
            version=0, parent=None, created_at=now(), document_id=None, passage_hashes=[],
            fingerprint=fp["weights"], stats={"base": self.cfg.model.base, "base_dir": str(self.base_dir),
                                               "logits_fingerprint": fp["logits"]},
        )
        with self.state.transaction() as c:
            self.state.add_version(row, conn=c)
            self.state.set_meta("live_version", "0", conn=c)
            self.state.event("init", f"base model {self.cfg.model.base}", version=0, conn=c)

    # -- loading ---------------------------------------------------------
    def ensure_loaded(self) -> None:
        if self.model is None or self.version != self.state.live_version():
            self.load(self.state.live_version())

    def load(self, version: int, verify: bool = False) -> dict[str, bool] | None:
        """Make `version`'s weights the in-memory model. With verify, compare fingerprints."""
        row = self.state.version(version)
        if row is None:
            raise SealError(f"no version {version} (see `seal-agent history`)")
        self.model, self.version = self.build(version), version
        if not verify:
            return None
        fp = fingerprints(self.model, self.tokenizer)
        return {
            "weights": fp["weights"] == row.fingerprint,
            "logits": fp["logits"] == row.stats.get("logits_fingerprint"),
        }

    def build(self, version: int):
        """A new model object holding `version`'s weights (the live one is not touched)."""
        if self.state.version(version) is None:
            raise SealError(f"no version {version} (see `seal-agent history`)")
        chain = self.state.weights_lineage(version)
        missing = [v for v in chain[1:] if not self.log.has(v)]
        if missing:
            raise SealError(f"version {version} cannot be rebuilt: adapter(s) {missing} missing from {self.log.root}")
        snapshots = set(self.log.snapshot_versions())
        start = max((i for i, v in enumerate(chain) if v in snapshots), default=0)
        t0 = time.perf_counter()
        model = load_model(self.base_dir, self.cfg)
        if start > 0:
            state_dict = self.log.read_snapshot(chain[start])
            model.load_state_dict(state_dict, strict=False)
            if getattr(model.config, "tie_word_embeddings", False):
                model.tie_weights()
        for v in chain[start + 1 :]:
            model = merge_adapter(model, self.log.path(v))
        model.eval()
        log.info("built version %d (%d merges) in %.1fs", version, len(chain) - 1 - start, time.perf_counter() - t0)
        return model

    def next_version(self) -> int:
        """The number a new version takes: past every recorded version and every
        directory in the log (one the database never recorded included)."""
        return max(self.state.max_version(), max(self.log.versions(), default=0)) + 1

    def snapshot_if_due(self) -> int | None:
        """Consolidate the live weights when `snapshot_every` merges have piled up since the last snapshot."""
        every = self.cfg.adapter_log.snapshot_every
        if every <= 0 or self.version in (None, 0):
            return None
        chain = self.state.weights_lineage(self.version)
        snapshots = set(self.log.snapshot_versions())
        last = max((i for i, v in enumerate(chain) if v in snapshots), default=0)
        if len(chain) - 1 - last < every:
            return None
        return self.snapshot()

    def snapshot(self) -> int | None:
        """Save a snapshot of the live weights now (unless they are the base's or
        already have one); returns the version snapshotted: the live version's
        last weight change (a module version only routes)."""
        if self.version is None:
            return None
        chain = self.state.weights_lineage(self.version)
        version = chain[-1]
        if version == 0 or version in set(self.log.snapshot_versions()):
            return None
        self.log.write_snapshot(
            version, self.model.state_dict(),
            {"version": version, "created_at": now(), "lineage": chain},
        )
        self.log.prune_snapshots(self.cfg.adapter_log.keep_snapshots, protect={version})
        self.state.event("snapshot", f"snapshot of the weights at version {version}", version=version)
        return version


def discard_uncommitted(state: State, log_: AdapterLog) -> list[int]:
    """An adapter written to disk whose version the database never recorded
    (a crash between the two) was never live: move it aside. Only the owner of
    the state directory may call this: between its rename and its commit, a
    version about to go live looks exactly like one that never will."""
    discarded = []
    for v in log_.versions():
        if state.version(v) is None:
            where = log_.quarantine(v, "written but never committed to the database (interrupted update)")
            state.event("discard", f"uncommitted adapter v{v:04d} moved to {where}", version=v)
            discarded.append(v)
    return discarded


def merge_adapter(model, adapter_dir: Path):
    """Merge a stored PEFT adapter into `model`'s weights; returns the plain model."""
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    return peft_model.merge_and_unload()
