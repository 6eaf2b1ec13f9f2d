import pytest
import torch
from peft import PeftModel

from seal_agent.config import LoraConfig
from seal_agent.memory.adapter_log import AdapterLog, atomic_dir
from seal_agent.model.inner_loop import attach_lora
from seal_agent.model.loader import load_model


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "v0001"

    def boom(d):
        (d / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_dir(target, boom)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    atomic_dir(target, lambda d: (d / "ok").write_text("1"))
    assert (target / "ok").read_text() == "1"
    with pytest.raises(FileExistsError):
        atomic_dir(target, lambda d: None)


def test_leftover_temp_dirs_are_removed_by_repair_only(tmp_path):
    leftovers = [tmp_path / "knowledge" / ".tmp-v0002-abcd", tmp_path / "knowledge" / "snapshots" / ".tmp-v0010-ef"]
    for d in leftovers:
        d.mkdir(parents=True)
    log = AdapterLog(tmp_path / "knowledge")
    assert all(d.is_dir() for d in leftovers) and log.versions() == []  # opening reads, never cleans
    assert sorted(log.repair()) == sorted(leftovers)
    assert not any(d.exists() for d in leftovers) and log.versions() == []


def test_versions_are_plain_peft_adapters(tmp_path, tiny_model_dir, tiny_cfg):
    model = load_model(tiny_model_dir, tiny_cfg)
    pm = attach_lora(model, LoraConfig(r=4, alpha=8), seed=0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    log = AdapterLog(tmp_path / "knowledge")
    log.write_version(1, lambda d: pm.save_pretrained(str(d)), lambda: {"version": 1, "parent": 0})
    assert log.versions() == [1] and log.has(1) and log.manifest(1)["parent"] == 0
    base = pm.unload()
    loaded = PeftModel.from_pretrained(base, str(log.path(1)))
    assert any("lora_A" in n for n, _ in loaded.named_parameters())
    dst = log.quarantine(1, "test")
    assert log.versions() == [] and (dst / "DISCARDED.txt").exists() and (dst / "adapter_config.json").exists()


def test_snapshots_roundtrip_and_prune(tmp_path):
    log = AdapterLog(tmp_path / "knowledge")
    for v in (3, 6, 9):
        log.write_snapshot(v, {"w": torch.full((2, 2), float(v))}, {"version": v})
    assert log.snapshot_versions() == [3, 6, 9]
    assert torch.equal(log.read_snapshot(6)["w"], torch.full((2, 2), 6.0))
    assert log.prune_snapshots(keep=1, protect={3}) == [6]
    assert log.snapshot_versions() == [3, 9]
