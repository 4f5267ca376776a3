"""Checkpoints that do not stall training (checkpoint.async_save=true).

A save then blocks training only while each rank copies its state off the training buffers (to host
memory: `snapshot`); a writer thread of the rank writes, fsyncs and hashes the files in the
background while training continues. The save is published (manifest, rename, `latest`) only once
every rank's writer has finished, which the ranks learn at the next step boundary (`poll`, one
small all-reduce); the next save, the end of training and a preemption wait for the previous one.

    step N: save() snapshots, queues the writes, returns   (training blocked: the copies)
    steps N+1..: writers write global_stepN.saving/ ...     (training runs)
    step M: poll() -> all ranks done -> manifest, rename to global_stepN, `latest`

A job killed while writes are in flight leaves global_stepN.saving, never named by `latest`: the
run resumes from the previous checkpoint. A write that fails (disk full) is reported by poll() on
every rank as the same one line the synchronous path gives, and the half-written save is removed.
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


def snapshot(obj: Any) -> Any:
    """A copy of `obj` (nested dicts, lists and tuples) whose tensors are host copies, detached from
    every training buffer; other values are shared (they are not modified by training)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, snapshot(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(snapshot(v) for v in obj)
    return obj


class BackgroundWriter:
    """One rank's writer thread: write(state, path) returns at once; the thread saves `state`
    with torch.save into path.tmp, fsyncs it, renames it and records its size and sha256."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[tuple[Any, Path] | None] = queue.Queue()
        self.written: dict[str, dict[str, Any]] = {}  # absolute path -> manifest entry
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="megalm-checkpoint-writer", daemon=True)
        self.thread.start()

    def write(self, state: Any, path: str | Path) -> None:
        self.jobs.put((state, Path(path)))

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
            state, path = job
            del job  # the snapshot is freed as soon as it is written
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
        writer.write(snapshot(state_dict), path)

    return save
