"""The GPT as a DeepSpeed PipelineModule: LayerSpecs for embedding, blocks, final norm and head.

    stage 0: Embedding, Block 0 ..        ...        stage p-1: .. Block L-1, FinalNorm, Head
(megalm.model.gpt.PIPELINE_LAYERS; `gpt_name` maps a pipeline parameter name to the GPT's).
With tied embeddings the first and last entries are TiedLayerSpecs sharing the key "embed": the
last stage holds a copy of the (vocab-sharded) word embedding whose gradient DeepSpeed all-reduces
with the first stage's. That copy is a `TiedEmbeddingHead` (no position table), so every tied
parameter on every stage receives a gradient (DeepSpeed waits forever on a tied weight whose
gradient is None).

With model.loss_chunk_tokens > 0 the last layer passes the final hidden states through and the
loss function (HeadLoss) applies that layer's weight fused with the cross entropy.

Packed samples (model.document_mask) enter as (tokens, positions, documents): the stages pass
(hidden, positions, documents) along, DeepSpeed sending the integer tensors with the activations
and no gradient for them, and the final norm drops them. The stage classes below are the model's
own (same parameters, same names) with that unpacking.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from megalm.config import Config
from megalm.model.documents import Packing
from megalm.model.gpt import PIPELINE_LAYERS, Block, Embedding, FinalNorm, Head
from megalm.parallel.checkpointing import apply_activation_checkpointing
from megalm.parallel.context import TensorParallel
from megalm.parallel.dims import ParallelDims
from megalm.parallel.loss import GPTLoss, HeadLoss

TIED_PREFIX = "tied_modules.embed."
"""Parameter-name prefix of the tied word embedding in a PipelineModule (TiedLayerSpec key "embed")."""


class TiedEmbeddingHead(Embedding):
    """The last stage's copy of the tied word embedding, used only as the output head."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.position = None  # gpt2's positions live on the first stage only

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.logits(h)


class PipeEmbedding(Embedding):
    """Embedding taking tokens, or (tokens, positions, documents) -> (hidden, positions, documents)."""

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, ...]):  # noqa: ANN201
        if isinstance(inputs, tuple):
            tokens, positions, documents = inputs
            return super().forward(tokens, positions), positions, documents
        return super().forward(inputs)


class PipeBlock(Block):
    """Block taking hidden, or (hidden, positions, documents), and returning the same kind."""

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, ...]):  # noqa: ANN201
        if isinstance(inputs, tuple):
            h, positions, documents = inputs
            return super().forward(h, Packing(positions, documents)), positions, documents
        return super().forward(inputs)


class PipeFinalNorm(FinalNorm):
    """FinalNorm taking hidden, or (hidden, positions, documents) -> hidden."""

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        return super().forward(inputs[0] if isinstance(inputs, tuple) else inputs)


def _tied_logits(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return module.logits(h)


def _tied_hidden(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return h  # the HeadLoss applies the tied weight, fused with the cross entropy


def gpt_name(name: str, num_layers: int) -> str:
    """PipelineModule parameter name -> GPT name ("3.attn.qkv.weight" -> "blocks.2.attn.qkv.weight").

    Layers follow PIPELINE_LAYERS: 0 embedding, 1..L blocks, L + 1 final norm, L + 2 head; the tied
    embedding's parameters ("tied_modules.embed.x") are the embedding's. A GPT name is returned as is."""
    if name.startswith(TIED_PREFIX):
        return f"{PIPELINE_LAYERS[0]}.{name[len(TIED_PREFIX):]}"
    m = re.match(r"^(\d+)\.(.*)$", name)
    if not m:
        return name
    idx, rest = int(m.group(1)), m.group(2)
    embedding, blocks, final_norm, head = PIPELINE_LAYERS
    if idx == 0:
        return f"{embedding}.{rest}"
    if idx <= num_layers:
        return f"{blocks}.{idx - 1}.{rest}"
    return f"{final_norm if idx == num_layers + 1 else head}.{rest}"


def pipeline_layer(name: str, num_layers: int) -> tuple[int, str]:
    """GPT name -> (pipeline layer index, name inside that layer): the inverse of gpt_name
    ("blocks.2.attn.qkv.weight" -> (3, "attn.qkv.weight")); the layer's file is layer_{index:02d}-*."""
    embedding, blocks, final_norm, head = PIPELINE_LAYERS
    module, rest = name.split(".", 1)
    if module == blocks:
        index, rest = rest.split(".", 1)
        return int(index) + 1, rest
    return {embedding: 0, final_norm: num_layers + 1, head: num_layers + 2}[module], rest


def build_pipeline_module(cfg: Config, tp: TensorParallel, dims: ParallelDims) -> nn.Module:
    """This rank's stage of the pipeline (DeepSpeed builds only the layers of its own stage), in
    the order of PIPELINE_LAYERS."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec  # noqa: PLC0415 - heavy
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology  # noqa: PLC0415

    m = cfg.model
    fused = m.loss_chunk_tokens > 0
    if m.tie_embeddings:
        first = TiedLayerSpec("embed", PipeEmbedding, m, tp, tied_weight_attr="weight")
        last = TiedLayerSpec("embed", TiedEmbeddingHead, m, tp, forward_fn=_tied_hidden if fused else _tied_logits,
                             tied_weight_attr="weight")
    else:
        first = LayerSpec(PipeEmbedding, m, tp)
        last = LayerSpec(Head, m, tp, pass_hidden=fused)
    blocks = (LayerSpec(PipeBlock, m, i, tp) for i in range(m.num_layers))
    specs = [first, *blocks, LayerSpec(PipeFinalNorm, m, tp), last]
    topology = PipeModelDataParallelTopology(num_pp=dims.pipeline, num_mp=dims.tensor, num_dp=dims.data)
    module = PipelineModule(
        layers=specs,
        loss_fn=GPTLoss(m, tp),
        topology=topology,
        partition_method=cfg.parallel.pipeline_partition,
        activation_checkpoint_interval=0,  # megalm.parallel.checkpointing recomputes whole blocks
    )
    if m.activation_checkpointing:
        apply_activation_checkpointing([x for x in module.modules() if isinstance(x, Block)], tp.rng)
    heads = [x for x in module.modules() if isinstance(x, (Head, TiedEmbeddingHead))]
    if fused and heads:  # the last stage: its last layer passes the hidden states to the loss
        module.loss_fn = HeadLoss(m, heads[0], tp)
    return module
