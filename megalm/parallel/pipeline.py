"""The GPT as a DeepSpeed PipelineModule: LayerSpecs for embedding, blocks, final norm and head.

    stage 0: Embedding, Block 0 ..        ...        stage p-1: .. Block L-1, FinalNorm, Head
With tied embeddings the first and last entries are TiedLayerSpecs sharing the key "embed": the
last stage holds a copy of the (vocab-sharded) word embedding whose gradient DeepSpeed all-reduces
with the first stage's. That copy is a `TiedEmbeddingHead` (no position table), so every tied
parameter on every stage receives a gradient (DeepSpeed waits forever on a tied weight whose
gradient is None).

With model.loss_chunk_tokens > 0 the last layer passes the final hidden states through and the
loss function (HeadLoss) applies that layer's weight fused with the cross entropy.
"""

from __future__ import annotations

import torch
from torch import nn

from megalm.config import Config
from megalm.model.gpt import Block, Embedding, FinalNorm, GPTLoss, Head, HeadLoss
from megalm.parallel.groups import ProcessGroups
from megalm.parallel.random import TensorParallelRNG


class TiedEmbeddingHead(Embedding):
    """The last stage's copy of the tied word embedding, used only as the output head."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.position = None  # gpt2's positions live on the first stage only

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.logits(h)


def _tied_logits(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return module.logits(h)


def _tied_hidden(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return h  # the HeadLoss applies the tied weight, fused with the cross entropy


def build_pipeline_module(cfg: Config, groups: ProcessGroups) -> nn.Module:
    """This rank's stage of the pipeline (DeepSpeed builds only the layers of its own stage)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    m, dims = cfg.model, groups.dims
    tp_group = groups.tensor if dims.tensor > 1 else None
    sp = cfg.parallel.sequence_parallel and dims.tensor > 1
    rng = TensorParallelRNG(cfg.train.seed, groups.tensor_rank)
    kw = dict(tp_group=tp_group, sequence_parallel=sp, seed=cfg.train.seed)
    fused = m.loss_chunk_tokens > 0
    if m.tie_embeddings:
        first = TiedLayerSpec("embed", Embedding, m, rng=rng, tied_weight_attr="weight", **kw)
        last = TiedLayerSpec("embed", TiedEmbeddingHead, m, rng=rng, forward_fn=_tied_hidden if fused else _tied_logits,
                             tied_weight_attr="weight", **kw)
    else:
        first = LayerSpec(Embedding, m, rng=rng, **kw)
        last = LayerSpec(Head, m, pass_hidden=fused, **kw)
    specs = [first, *(LayerSpec(Block, m, i, rng=rng, **kw) for i in range(m.num_layers)),
             LayerSpec(FinalNorm, m, tp_group=tp_group, sequence_parallel=sp), last]
    topology = PipeModelDataParallelTopology(num_pp=dims.pipeline, num_mp=dims.tensor, num_dp=dims.data)
    module = PipelineModule(
        layers=specs,
        loss_fn=GPTLoss(m, tp_group),
        topology=topology,
        partition_method=cfg.parallel.pipeline_partition,
        activation_checkpoint_interval=0,  # blocks checkpoint themselves (model.activation_checkpointing)
    )
    heads = [x for x in module.modules() if isinstance(x, (Head, TiedEmbeddingHead))]
    if fused and heads:  # the last stage: its last layer passes the hidden states to the loss
        module.loss_fn = HeadLoss(m, heads[0], tp_group, sp)
    return module
