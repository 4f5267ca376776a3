"""How a checkpoint reaches the disk: written into global_stepN.saving, fsync'd, renamed, then named by
`latest`; a save that dies half-way (here: at a step that already has a complete checkpoint, as when a
run resumes and is preempted at once) leaves the checkpoint `latest` names untouched."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from megalm.config import load_config
from megalm.testing.distributed import run_distributed_test
from megalm.testing.runs import TINY


def _digest(ckpt: Path) -> dict[str, str]:
    return {str(p.relative_to(ckpt)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ckpt.rglob("*"))
            if p.is_file()}


def _save_twice(run_dir: str) -> dict:
    from megalm.training import checkpoint as ckpt
    from megalm.training.checkpoint_meta import CheckpointMeta, TrainState
    from megalm.training.startup import bootstrap

    cfg = load_config(TINY, ["zero.stage=1", f"train.run_dir={run_dir}", "model.dropout=0.1"])
    rt = bootstrap(cfg)
    root = Path(run_dir) / "checkpoints"
    meta = CheckpointMeta.of_run(cfg, rt.dims, TrainState(5, 20), {"type": "byte"})
    synced, order = [], []
    real_fsync, real_write = os.fsync, ckpt.atomic_write_text

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def write(path: Path, text: str) -> None:
        if path.name == "latest":
            order.append(len(synced))
        real_write(path, text)

    os.fsync, ckpt.atomic_write_text = fsync, write
    try:
        ckpt.save_checkpoint(rt.engine, root, meta, [], keep_last=2)
    finally:
        os.fsync, ckpt.atomic_write_text = real_fsync, real_write
    first = _digest(root / "global_step5")
    staged = {f.replace(".saving", "") for f in synced[:order[0]]}
    unsynced = [f for f in first if str(root / "global_step5" / f) not in staged]

    real_save = rt.engine.ds.save_checkpoint

    def dies_half_way(save_dir: str, tag: str, **kwargs) -> None:
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    rt.engine.ds.save_checkpoint = dies_half_way
    try:
        ckpt.save_checkpoint(rt.engine, root, meta, [], keep_last=2)
        died = False
    except OSError:
        died = True
    rt.engine.ds.save_checkpoint = real_save
    after_death = _digest(root / "global_step5")
    latest_after_death = (root / "latest").read_text()
    state = ckpt.load_checkpoint(rt.engine, *ckpt.resolve_load("auto", root))
    ckpt.save_checkpoint(rt.engine, root, meta, [], keep_last=2)  # the same step again, completing
    return {"first": first, "unsynced": unsynced, "died": died, "after_death": after_death,
            "latest_after_death": latest_after_death, "state": (state.step, state.consumed_samples),
            "leftovers": sorted(p.name for p in root.iterdir() if p.name.startswith("global_step")),
            "final_files": sorted(_digest(root / "global_step5"))}


def test_a_failed_save_at_a_saved_step_leaves_the_checkpoint_intact(tmp_path):
    r = run_distributed_test(_save_twice, 1, args=(str(tmp_path),), env={"DS_ACCELERATOR": "cpu"})[0]
    assert "mp_rank_00_model_states.pt" in r["first"] and "megalm.json" in r["first"]
    assert "rng_state_rank0.pt" in r["first"]
    assert r["unsynced"] == []  # every file was fsync'd before `latest` named the checkpoint
    assert r["died"] and r["after_death"] == r["first"] and r["latest_after_death"] == "global_step5"
    assert r["state"] == (5, 20)  # and it still loads
    assert r["leftovers"] == ["global_step5"] and r["final_files"] == sorted(r["first"])
