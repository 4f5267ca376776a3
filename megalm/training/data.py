"""The trainer's view of the data: tokenizer, train/valid datasets and resumable batch iterators.

Batches are keyed by the global consumed-sample count: the optimizer step that starts at
consumed = K trains on global samples [K, K + global_batch), whatever the data-parallel size, so a
resumed (or re-laid-out) run continues the stream with nothing repeated or skipped.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megalm.config import Config
from megalm.data.builder import build_datasets, open_shards, parse_prefixes, token_weights
from megalm.data.meta import read_meta
from megalm.data.mixture import MixturePlan, ResumedData, check_unchanged, plan_mixture, shared_fingerprints
from megalm.data.packing import Collate
from megalm.data.sampler import MegatronPretrainingSampler, build_dataloader
from megalm.data.tokenizer import build_tokenizer
from megalm.errors import MegalmError
from megalm.parallel.groups import ProcessGroups, communication_device
from megalm.parallel.loss import SAMPLE_LOSSES


class _RecordingSampler:
    """Passes a batch sampler through and remembers what it yielded (for the sample-id audit)."""

    def __init__(self, sampler: Any) -> None:
        self.sampler, self.yielded = sampler, deque()

    def __iter__(self) -> Iterator[list[int]]:
        for ids in self.sampler:
            self.yielded.append(list(ids))
            yield ids

    def __len__(self) -> int:
        return len(self.sampler)


def check_documents_end_with_eod(tokenizer: Any, prefixes: list[Any]) -> None:
    """model.document_mask finds documents by their EOD token: the tokenizer must have one and
    the shards must have been written with it appended."""
    if tokenizer.eod is None or tokenizer.eod < 0:
        raise MegalmError(f"model.document_mask needs a tokenizer with an end-of-document token; this "
                          f"{tokenizer.type} tokenizer has none (a sentencepiece model trained with eos_id=-1?): "
                          "use a tokenizer with EOS, or model.document_mask=false")
    for entry in prefixes:
        prefix = entry if isinstance(entry, str) else entry[1]
        meta = read_meta(prefix)
        if meta is not None and not meta.get("append_eod", True):
            raise MegalmError(f"model.document_mask: shard '{prefix}' was written without EOD tokens "
                              "(tools/preprocess_data.py without --append-eod), so its documents cannot be told apart; "
                              "preprocess it again with --append-eod, or set model.document_mask=false")


@dataclass
class TrainData:
    cfg: Config
    groups: ProcessGroups
    tokenizer: Any
    train: Any
    valid: Any
    mixture: MixturePlan
    fingerprints: dict[str, dict[str, Any]]
    change: str | None = None
    """The line a resume that changes the mixture says (megalm.data.mixture); None otherwise."""
    source_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per split ("train", "valid"), per source: summed token loss and tokens since last read (a blend
    only; this rank's part)."""
    _pending: tuple[str, torch.Tensor] | None = None  # the split and each sample's source of the micro batch last yielded

    @classmethod
    def build(cls, cfg: Config, groups: ProcessGroups, resumed: Any = None) -> TrainData:
        """The run's data; `resumed` (the CheckpointMeta it resumes from) brings the mixture the
        checkpoint trained on and what to check the data against."""
        d, t = cfg.data, cfg.train
        if not d.train_prefixes:
            raise MegalmError("data.train_prefixes is empty: give the shard prefixes written by "
                              "tools/preprocess_data.py (data.train_prefixes=[PREFIX])")
        tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise MegalmError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                              f"{cfg.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size}")
        if cfg.model.document_mask:
            check_documents_end_with_eod(tokenizer, d.train_prefixes)
        weights, prefixes = parse_prefixes(d.train_prefixes)
        default = dict(zip(prefixes, token_weights(open_shards(prefixes, tokenizer)), strict=True)) if weights is None else {}
        past = None if resumed is None else ResumedData(resumed.state.step, resumed.state.consumed_samples, resumed.data or {})
        mixture, change = plan_mixture(cfg, default, past)
        open_shards([s for s in mixture.sources if s not in prefixes], tokenizer)  # present, of this tokenizer
        fingerprints = shared_fingerprints(mixture.sources)  # each source hashed by one rank
        if past is not None and past.state:  # a run's checkpoint (not one converted from Hugging Face)
            check_unchanged(cfg, past, fingerprints, tokenizer.describe(), resumed.tokenizer)
        num_samples = (t.steps * t.global_batch_size, t.eval_steps * t.global_batch_size, 0)
        # rank 0 builds and caches the sample indices; the others then memory-map the cache
        datasets = None
        for turn in (0, 1):
            if (dist.get_rank() == 0) == (turn == 0):
                datasets = build_datasets(d, tokenizer, t.seed, num_samples, mixture)
            dist.barrier()
        train, valid, _ = datasets
        data = cls(cfg, groups, tokenizer, train, valid, mixture, fingerprints, change)
        saved = (past.state.get("positions") or {}) if past is not None else {}
        now = data.positions(past.consumed) if past is not None else {}
        moved = {s: (n, now.get(s)) for s, n in saved.items() if now.get(s) != n}
        if moved:  # the plan replays the checkpoint's phases: its positions are where they were recorded
            raise MegalmError(f"the data mixture does not reproduce the checkpoint's positions {moved} (source: "
                              "(recorded, rebuilt)): the checkpoint was written by another blend")
        return data

    def positions(self, consumed: int) -> dict[str, int]:
        """Each source's position after `consumed` training samples: how many of its samples were drawn."""
        if hasattr(self.train, "drawn"):
            return {s: int(n) for s, n in zip(self._source_names(), self.train.drawn(consumed), strict=True)}
        return {self.train.indexed.prefix: consumed}

    def _source_names(self, split: str = "train") -> list[str]:
        """The prefix of each dataset the split's blend draws from, in its order."""
        return [ds.indexed.prefix for ds in getattr(self, split).datasets]

    def checkpoint_state(self, consumed: int) -> dict[str, Any]:
        """What a checkpoint records about the data (CheckpointMeta.data): the mixture plan, each
        source's position and fingerprint, the sample length and the split."""
        return {"mixture": self.mixture.to_dict(), "positions": self.positions(consumed),
                "fingerprints": self.fingerprints, "seq_len": self.cfg.data.seq_len, "split": self.cfg.data.split}

    def mixture_metrics(self, consumed: int) -> dict[str, float]:
        """The weights the blend draws with at `consumed` (mixture/<source name>), when it blends."""
        if len(self.mixture.sources) == 1:
            return {}
        return {f"mixture/{Path(s).name}": w for s, w in self.mixture.weights_at(consumed).items()}

    def _batches(self, dataset: Any, consumed: int, record: bool,
                 sources: str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro batches from `consumed` on; `record`: logging.sample_ids; `sources` (the
        split's name): each batch's sample sources kept for the per-source loss (`add_sample_losses`)."""
        if dataset is None or len(dataset) == 0:
            raise MegalmError("the validation split is empty: give it documents (data.split) or set "
                              "train.eval_interval=0")
        sampler = MegatronPretrainingSampler(
            total_samples=len(dataset), consumed_samples=consumed,
            micro_batch_size=self.cfg.train.micro_batch_size,
            data_rank=self.groups.data_rank, data_size=self.groups.dims.data,
        )
        recorder = _RecordingSampler(sampler) if record or sources else None
        loader = build_dataloader(dataset, recorder or sampler, self.cfg.data.num_workers, self.collate())
        for batch in loader:
            ids = recorder.yielded.popleft() if recorder is not None else None
            if record:
                self._record(ids)
            if sources:  # the previous micro batch's loss is computed by now (the pipeline's last stage too)
                self.add_sample_losses()
                self._pending = (sources, torch.tensor([dataset.source_of(i)[0] for i in ids]))
            yield batch

    @property
    def per_source(self) -> bool:
        """Whether the train split blends several sources (then the loss is logged per source)."""
        return hasattr(self.train, "source_of") and len(self.train.datasets) > 1

    def add_sample_losses(self) -> None:
        """Add the loss of the micro batch last trained on (megalm.parallel.loss.SAMPLE_LOSSES, set where the
        loss is computed) to its samples' sources; once per micro batch, after its forward pass."""
        sums, tokens = SAMPLE_LOSSES.take()
        pending, self._pending = self._pending, None
        if sums is None or pending is None or self.groups.tensor_rank != 0:  # tensor ranks hold the same losses
            return
        split, sources = pending
        total = self.source_losses.setdefault(split, torch.zeros(len(self._source_names(split)), 2, dtype=torch.float64))
        total.index_add_(0, sources, torch.stack([sums.double().cpu(), tokens.double().cpu()], 1))

    def source_loss_metrics(self, split: str = "train") -> dict[str, float]:
        """Collective (every rank): loss/<source> (val_loss/<source> for "valid") = the mean token loss of
        each source's samples of the split since the last call, over every data-parallel rank and context
        chunk; empty without a blend."""
        if not self.per_source or not hasattr(getattr(self, split), "source_of"):
            return {}
        names = self._source_names(split)
        total = self.source_losses.pop(split, torch.zeros(len(names), 2, dtype=torch.float64))
        total = total.to(communication_device(None))
        dist.all_reduce(total)
        key = "loss" if split == "train" else "val_loss"
        return {f"{key}/{Path(name).name}": float(s / n) for name, (s, n) in zip(names, total.tolist(), strict=True)
                if n > 0}

    def collate(self) -> Collate:
        """How this rank's batches are made: its context chunk, and document ids when masked."""
        m = self.cfg.model
        return Collate(eod=self.tokenizer.eod if m.document_mask else None, document_positions=m.document_positions,
                       context_rank=self.groups.context_rank, context_size=self.groups.dims.context)

    def train_batches(self, consumed_samples: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches(self.train, consumed_samples, record=self.cfg.logging.sample_ids,
                             sources="train" if self.per_source else None)

    def valid_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches(self.valid, 0, record=False,
                             sources="valid" if self.per_source and hasattr(self.valid, "source_of") else None)

    def _record(self, ids: list[int]) -> None:
        """logging.sample_ids: the blended sample ids of this rank's micro batch (sample_ids/), and for a
        blend each one's (source, its sample) (sample_sources/)."""
        if self.groups.tensor_rank != 0 or self.groups.pipeline_rank != 0 or self.groups.context_rank != 0:
            return  # one record per data rank: the ranks of its model and sequence chunks read the same samples
        run_dir = Path(self.cfg.train.run_dir)
        records = {"sample_ids": [int(i) for i in ids]}
        if hasattr(self.train, "source_of"):
            names = self._source_names()
            records["sample_sources"] = [[names[k], j] for k, j in map(self.train.source_of, ids)]
        for folder, values in records.items():
            (run_dir / folder).mkdir(parents=True, exist_ok=True)
            with open(run_dir / folder / f"rank{dist.get_rank()}.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(values) + "\n")

    def tokenizer_info(self) -> dict[str, Any]:
        return self.tokenizer.describe()

    def tokenizer_files(self) -> list[str]:
        return self.tokenizer.files()
