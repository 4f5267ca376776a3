"""The training mixture: which sources the train split blends, with which weights, from which sample on.

`data.train_prefixes` is the mixture at step 0; `data.mixture_schedule` changes it at given steps
(Llama 3's annealing on high-quality data, OLMo 2's mid-training stage, WSD's decay on a cleaner mix);
a run resumed with other `data.*` weights changes it at the resume step. Each change starts a
`Phase` of the blend (megalm.data.blend): every source's samples continue from the position the
earlier phases left it at (each source is its own shuffled stream, megalm.data.gpt_dataset), so no
document is repeated before its epoch ends and none is skipped, whatever the weights do.

A checkpoint records the plan it trained on (`MixturePlan.to_dict`), each source's position (samples
drawn from it so far) and each source's fingerprint. On resume the phases before the resume point
come from the checkpoint, what follows from the config; a change of weights, an added or a removed
source is said in one line; a source whose contents changed, another data.seq_len, data.split or
tokenizer stop the run in one line naming it, unless `data.accept_changed_data=true`.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from megalm.config import Config
from megalm.data.blend import Phase
from megalm.errors import MegalmError

FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK_BYTES = 16, 1 << 16


@dataclass(frozen=True)
class MixturePlan:
    """The train split's sources (prefixes, in source order) and the phases of their weights."""

    sources: tuple[str, ...]
    phases: tuple[Phase, ...]  # weights aligned with `sources`, as given (0: not drawn)

    def weights_at(self, sample: int) -> dict[str, float]:
        """The normalised weights of the phase holding blended sample `sample` (sources drawn only)."""
        phase = [p for p in self.phases if p.start <= sample][-1]
        total = sum(phase.weights)
        return {s: w / total for s, w in zip(self.sources, phase.weights, strict=True) if w > 0}

    def to_dict(self) -> dict[str, Any]:
        return {"sources": list(self.sources), "phases": [[p.start, list(p.weights)] for p in self.phases]}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MixturePlan:
        return cls(tuple(raw["sources"]), tuple(Phase(int(s), tuple(float(w) for w in ws)) for s, ws in raw["phases"]))


@dataclass(frozen=True)
class ResumedData:
    """What a checkpoint says about the data it trained on (CheckpointMeta.data) and where it stopped."""

    step: int
    consumed: int
    state: dict[str, Any]  # {"mixture", "positions", "fingerprints", "seq_len", "split"}


def config_mixtures(cfg: Config, default_weights: dict[str, float]) -> list[tuple[int, dict[str, float]]]:
    """(step, {prefix: weight}) of the config: data.train_prefixes at step 0 (token counts when they are
    plain prefixes: `default_weights`), then each data.mixture_schedule entry."""
    from megalm.data.builder import parse_prefixes  # noqa: PLC0415 - the builder imports this module

    weights, prefixes = parse_prefixes(cfg.data.train_prefixes)
    first = dict(zip(prefixes, weights, strict=True)) if weights is not None else {p: default_weights[p] for p in prefixes}
    return [(0, first), *((int(step), {str(p): float(w) for w, p in pairs}) for step, pairs in cfg.data.mixture_schedule)]


def plan_mixture(cfg: Config, default_weights: dict[str, float],
                 resumed: ResumedData | None = None) -> tuple[MixturePlan, str | None]:
    """The plan to train on, and the line to say when a resume changes the mixture (else None)."""
    gbs = cfg.train.global_batch_size
    config = config_mixtures(cfg, default_weights)
    if resumed is None or not resumed.state.get("mixture"):
        return _plan([(step * gbs, weights) for step, weights in config]), None
    history = MixturePlan.from_dict(resumed.state["mixture"])
    kept = [(p.start, dict(zip(history.sources, p.weights, strict=True))) for p in history.phases
            if p.start < resumed.consumed]
    now = [w for step, w in config if step <= resumed.step][-1]
    future = [(resumed.consumed + (step - resumed.step) * gbs, w) for step, w in config if step > resumed.step]
    change = None
    if _normalised(now) != _normalised(kept[-1][1]):
        kept.append((resumed.consumed, now))
        change = _describe_change(kept[-2][1], now, resumed, history)
    sources = list(history.sources) + [s for _, w in config for s in w if s not in history.sources]
    return _plan(kept + future, sources), change


def _plan(entries: list[tuple[int, dict[str, float]]], sources: list[str] | None = None) -> MixturePlan:
    if sources is None:
        sources = []
        for _, weights in entries:
            sources += [s for s in weights if s not in sources]
    sources = list(dict.fromkeys(sources))
    return MixturePlan(tuple(sources), tuple(Phase(start, tuple(float(w.get(s, 0.0)) for s in sources))
                                             for start, w in entries))


def _normalised(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {s: round(w / total, 9) for s, w in weights.items() if w > 0}


def _describe_change(before: dict[str, float], after: dict[str, float], resumed: ResumedData,
                     history: MixturePlan) -> str:
    old, new = _normalised(before), _normalised(after)
    parts = []
    for source in dict.fromkeys([*old, *new]):
        a = f"{old[source]:.3g}" if source in old else "new"
        b = f"{new[source]:.3g}" if source in new else "removed"
        parts.append(f"{os.path.basename(source)} {a} -> {b}")
    positions = resumed.state.get("positions", {})
    where = ", ".join(f"{os.path.basename(s)} at its sample {positions.get(s, 0)}" for s in new)
    return (f"data mixture changed at step {resumed.step} (sample {resumed.consumed}): {', '.join(parts)}; "
            f"each source continues from its own position ({where})")


def fingerprint(prefix: str) -> dict[str, Any]:
    """What identifies a shard's contents cheaply: the sizes of .bin and .idx, the sha256 of the .idx
    (every document's length) and of 16 blocks of 64 KiB spread over the .bin (a sample, not all of it)."""
    idx, binary = f"{prefix}.idx", f"{prefix}.bin"
    digest = hashlib.sha256()
    with open(idx, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    size = os.path.getsize(binary)
    sampled = hashlib.sha256()
    with open(binary, "rb") as f:
        for i in range(FINGERPRINT_BLOCKS):
            f.seek(max(0, size - FINGERPRINT_BLOCK_BYTES) * i // (FINGERPRINT_BLOCKS - 1))
            sampled.update(f.read(FINGERPRINT_BLOCK_BYTES))
    return {"bin_bytes": size, "idx_bytes": os.path.getsize(idx), "idx_sha256": digest.hexdigest(),
            "bin_sampled_sha256": sampled.hexdigest()}


def shared_fingerprints(sources: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Collective: every source's fingerprint, each read by one rank (the sources dealt out over the
    ranks, so a thousand ranks do not each hash every .idx) and shared with all; a source that cannot
    be read is one line on every rank."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine: dict[str, Any] = {}
    for source in sources[rank::world]:
        try:
            mine[source] = fingerprint(source)
        except OSError as e:
            mine[source] = f"cannot fingerprint data source {source}: {e.strerror or e}"
    shares: list[dict[str, Any]] = [mine]
    if world > 1:
        shares = [{} for _ in range(world)]
        dist.all_gather_object(shares, mine)
    found = {k: v for share in shares for k, v in share.items()}
    failed = [v for v in found.values() if isinstance(v, str)]
    if failed:
        raise MegalmError(failed[0])
    return {source: found[source] for source in sources}


def check_unchanged(cfg: Config, resumed: ResumedData, fingerprints: dict[str, dict[str, Any]],
                    tokenizer: dict[str, Any], saved_tokenizer: dict[str, Any]) -> None:
    """One line when the data the checkpoint trained on changed under the run (unless accepted)."""
    if cfg.data.accept_changed_data:
        return
    accept = "set data.accept_changed_data=true to go on with it as it is now"
    state = resumed.state
    for key in ("seq_len", "split"):
        if key in state and state[key] != getattr(cfg.data, key):
            raise MegalmError(f"data.{key} is {getattr(cfg.data, key)!r}, the checkpoint trained with {state[key]!r}: "
                              f"every sample would be another window of the documents; {accept}")
    if saved_tokenizer and tokenizer != saved_tokenizer:
        raise MegalmError(f"the tokenizer differs from the one the checkpoint trained with ({saved_tokenizer}): "
                          f"the shards' token ids would mean other text; {accept}")
    for source, saved in state.get("fingerprints", {}).items():
        now = fingerprints.get(source)
        if now is None or now == saved:
            continue
        what = next(k for k in ("bin_bytes", "idx_bytes", "idx_sha256", "bin_sampled_sha256") if now.get(k) != saved.get(k))
        raise MegalmError(f"data source {source} changed since the checkpoint ({what} differs): its samples would be "
                          f"other documents, in another order; {accept}")


def weights_summary(weights: dict[str, float]) -> str:
    return ", ".join(f"{os.path.basename(s)} {w:.3g}" for s, w in weights.items() if not math.isclose(w, 0.0))
