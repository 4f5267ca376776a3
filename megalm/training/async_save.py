"""Checkpoints that do not stall training (checkpoint.async_save=true).

A save then blocks training only while each rank copies its state off the training buffers (into
host buffers kept for the next save: `HostCopies`); a writer thread of the rank writes, fsyncs and hashes the files in the
background while training continues. The save is published (manifest, rename, `latest`) only once
every rank's writer has finished, which the ranks learn at the next step boundary (`poll`, one
small all-reduce); the next save, the end of training and a preemption wait for the previous one.

    step N: save() snapshots, queues the writes, returns   (training blocked: the copies)
    steps N+1..: writers write global_stepN.saving/ ...     (training runs)
    step M: poll() -> all ranks done -> manifest, rename to global_stepN, `latest`

A job killed while writes are in flight leaves global_stepN.saving, never named by `latest`: the
run resumes from the previous checkpoint. A write that fails (disk full) is reported by poll() on
every rank as the same one line the synchronous path gives, and the half-written save is removed.

Why not DeepSpeed's DecoupledCheckpointEngine (0.19.8): it commits at the next optimizer step and
waits there until every file is written, so a save that takes longer than one step still stalls
training; it hands the live state dict to its writer process without a snapshot (CUDA tensors go
by IPC handle, and the next step changes them); it writes `latest` itself, outside the manifest and
rename that every megalm save goes through; and its fast writer needs DeepSpeed's async I/O op
built. The writer here takes over the same hook (`engine.checkpoint_engine.save`, see
megalm.seams) and keeps DeepSpeed's file layout.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megalm.training import manifest


class HostCopies:
    """The host buffers the snapshots are copied into, kept from save to save: a tensor of a file
    (by name, e.g. mp_rank_00_model_states.pt) goes into a buffer of the same shape and dtype that
    the previous save of that file used, so only the first save allocates (page-locked on CUDA,
    for fast device-to-host copies). Safe because a save starts only after the previous one is
    written."""

    def __init__(self) -> None:
        self.by_file: dict[str, list[torch.Tensor]] = {}

    def snapshot(self, obj: Any, file: str) -> Any:
        """A copy of `obj` (nested dicts, lists and tuples) whose tensors are host copies, detached
        from every training buffer; other values are shared (training does not modify them)."""
        free: dict[tuple, list[torch.Tensor]] = {}
        for buf in self.by_file.get(file, []):
            free.setdefault((buf.shape, buf.dtype), []).append(buf)
        used: list[torch.Tensor] = []

        def copy(t: torch.Tensor) -> torch.Tensor:
            same = free.get((t.shape, t.dtype))
            buf = same.pop() if same else torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            buf.copy_(t.detach(), non_blocking=t.is_cuda)
            used.append(buf)
            return buf

        out = map_tensors(obj, copy)
        if any(b.is_pinned() for b in used):
            torch.cuda.synchronize()  # the copies have landed before the writer reads them
        self.by_file[file] = used
        return out

    def reserve(self, obj: Any, file: str) -> None:
        """Allocate the buffers snapshot(obj, file) will copy into (not yet touched: see touch)."""
        buffers: list[torch.Tensor] = []
        map_tensors(obj, lambda t: buffers.append(
            torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)))
        self.by_file[file] = buffers

    def touch(self) -> None:
        """Write every buffer once, so the operating system maps its pages now rather than during a
        save (on the 2-core test machine, mapping 2.3 GB took ~10x as long as copying into it)."""
        for buffers in self.by_file.values():
            for buf in buffers:
                buf.zero_()


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`obj` with fn applied to each tensor in its nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(map_tensors(v, fn) for v in obj)
    return obj


class BackgroundWriter:
    """One rank's writer thread: write(state, path) returns at once; the thread saves `state`
    with torch.save into path.tmp, fsyncs it, renames it and records its size and sha256."""

    def __init__(self) -> None:
        self.copies = HostCopies()
        self.jobs: queue.Queue[tuple[Any, Path] | Callable[[], None] | None] = queue.Queue()
        self.written: dict[str, dict[str, Any]] = {}  # absolute path -> manifest entry
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="megalm-checkpoint-writer", daemon=True)
        self.thread.start()

    def write(self, state: Any, path: str | Path) -> None:
        self.jobs.put((state, Path(path)))

    def touch_copies(self) -> None:
        """Map the reserved host buffers' pages in the background (before the first save)."""
        self.jobs.put(self.copies.touch)

    def idle(self) -> bool:
        return self.jobs.unfinished_tasks == 0

    def wait(self) -> None:
        self.jobs.join()

    def take(self) -> tuple[dict[str, dict[str, Any]], list[BaseException]]:
        """What the writes since the last take() produced (call when idle)."""
        written, errors = self.written, self.errors
        self.written, self.errors = {}, []
        return written, errors

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if callable(job):
                try:
                    job()
                finally:
                    self.jobs.task_done()
                continue
            state, path = job
            del job
            try:
                if not self.errors:  # this save is lost already: write nothing more of it
                    tmp = path.with_name(path.name + ".tmp")
                    torch.save(state, tmp)
                    fd = os.open(tmp, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.replace(tmp, path)
                    self.written[str(path)] = {"size": path.stat().st_size, "sha256": manifest.sha256_of(path)}
            except (OSError, RuntimeError) as e:
                self.errors.append(e)
            finally:
                del state
                self.jobs.task_done()
        self.jobs.task_done()


def queued_save(writer: BackgroundWriter) -> Callable[..., None]:
    """A replacement for DeepSpeed's checkpoint_engine.save(state_dict, path): snapshot, then queue."""

    def save(state_dict: Any, path: str, *args: Any, **kwargs: Any) -> None:
        writer.write(writer.copies.snapshot(state_dict, Path(path).name), path)

    return save
