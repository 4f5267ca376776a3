"""How every GPT parameter is split over the tensor axis, for the checkpoint converters and for
DeepSpeed's universal checkpoint converter.

`sharding_specs` reads each parameter's own attributes (set by the tensor-parallel layers:
partition_dim, partition_stride; replicated ones have none), so there is no second list to keep in
step with the model. `universal_checkpoint_info` states the same facts as the regex lists DeepSpeed's
`ds_to_universal.py` reads from every checkpoint (engine.save_checkpoint stores the module's
`universal_checkpoint_info` attribute), written to match both the plain model's names and a
PipelineModule's ("blocks.3.x" / "4.x", "embedding.x" / "0.x" / "tied_modules.embed.x"), so DeepSpeed's
own tool converts megalm checkpoints too.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from megalm.config import ModelConfig
from megalm.model.gpt import GPT, PIPELINE_LAYERS, VOCAB_PARAMETERS, padded_vocab
from megalm.model.moe import GroupedExperts, is_moe_layer
from megalm.parallel.context import TensorParallel


def sharding_specs(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """name -> (partition_dim, partition_stride) of every GPT parameter; dim -1: replicated.

    Read from the parameters' own attributes (set by the tensor-parallel layers) of one-block GPTs
    on the meta device: every dense block shares the dense block's layout, every MoE block the MoE
    block's (megalm.model.moe.is_moe_layer)."""
    kinds = {False: dataclasses.replace(cfg, num_layers=1, moe_num_experts=0)}
    if cfg.moe_num_experts:
        kinds[True] = dataclasses.replace(cfg, num_layers=1, moe_layer_freq=1, moe_dense_layers=[])
    layouts: dict[bool, dict[str, tuple[int, int]]] = {}
    specs = {}
    for moe, small in kinds.items():
        with torch.device("meta"):
            model = GPT(small, TensorParallel.build(None))
        layouts[moe] = {}
        for name, p in model.named_parameters():
            spec = (p.partition_dim, p.partition_stride) if p.tensor_model_parallel else (-1, 1)
            if name.startswith("blocks.0."):
                layouts[moe][name[len("blocks.0."):]] = spec
            else:
                specs[name] = spec
    for i in range(cfg.num_layers):
        specs.update({f"blocks.{i}.{rest}": spec for rest, spec in layouts[is_moe_layer(cfg, i)].items()})
    return specs


def routed_expert_names(cfg: ModelConfig) -> set[str]:
    """GPT names of the routed experts' weights (megalm.model.moe.GroupedExperts: dimension 0 is the
    expert), the parameters expert parallelism splits over its ranks."""
    if not cfg.moe_num_experts:
        return set()
    with torch.device("meta"):
        block = GPT(dataclasses.replace(cfg, num_layers=1, moe_layer_freq=1, moe_dense_layers=[]), TensorParallel.build(None))
    inside = [f"{m}.{p}"[len("blocks.0."):] for m, module in block.named_modules() if isinstance(module, GroupedExperts)
              for p, _ in module.named_parameters()]
    return {f"blocks.{i}.{rest}" for i in range(cfg.num_layers) if is_moe_layer(cfg, i) for rest in inside}


def buffer_names(cfg: ModelConfig) -> list[str]:
    """GPT names of the model's persistent buffers (state, not parameters: the MoE expert bias),
    which checkpoints and converters carry beside the parameters."""
    with torch.device("meta"):
        model = GPT(cfg, TensorParallel.build(None))
    params = {n for n, _ in model.named_parameters()}
    return [n for n in model.state_dict() if n not in params]


def _pattern(name: str) -> str:
    """A regex matching GPT parameter `name` under its plain and its pipeline names (any layer)."""
    module, rest = name.split(".", 1)
    embedding, blocks, _, _ = PIPELINE_LAYERS
    if module == blocks:
        rest = rest.split(".", 1)[1]  # drop the layer index
        return rf"^(?:{blocks}\.)?\d+\.{re.escape(rest)}$"
    alternatives = [module, r"\d+"] + ([r"tied_modules\.embed"] if module == embedding else [])
    return rf"^(?:{'|'.join(alternatives)})\.{re.escape(rest)}$"


def universal_checkpoint_info(cfg: ModelConfig, tensor: int) -> dict[str, Any]:
    """DeepSpeed's UNIVERSAL_CHECKPOINT_INFO for this model (patterns of what ds_to_universal must
    keep whole, concatenate on dim 1, de-interleave, or strip of vocabulary padding)."""
    kinds: dict[str, list[str]] = {"vocabulary_parameter_patterns": [], "tp_replicated_parameter_patterns": [],
                                   "parameter_with_row_parallelism_patterns": [],
                                   "parameter_with_2_sub_params_cat_dim_0": []}
    for name, (dim, stride) in sharding_specs(cfg).items():
        if ".experts." in name:  # [E, 2I, H] split on dim 1 / [E, H, I] on dim 2: no DeepSpeed pattern says
            continue             # so; megalm's own converter (megalm.convert.universal) joins them
        kind = ("vocabulary_parameter_patterns" if name in VOCAB_PARAMETERS
                else "tp_replicated_parameter_patterns" if dim < 0
                else "parameter_with_row_parallelism_patterns" if dim == 1
                else "parameter_with_2_sub_params_cat_dim_0" if stride == 2 else None)
        if kind is not None and _pattern(name) not in kinds[kind]:
            kinds[kind].append(_pattern(name))
    info: dict[str, Any] = {"universal_checkpoint_version": 0.4, "original_vocab_size": cfg.vocab_size,
                            "padded_vocab_size": padded_vocab(cfg, tensor)}
    info.update({k: v for k, v in kinds.items() if v})  # DeepSpeed's strict mode refuses a list that matches nothing
    if cfg.tie_embeddings:
        info["pipeline_replicated_parameter_patterns"] = [r"^tied_modules\."]
    return info
