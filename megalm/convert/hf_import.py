"""Hugging Face model directories -> megalm: the ModelConfig and the GPT state dict, through the
directory's family (megalm.convert.families). A family not listed, or a feature megalm does not
implement (a RoPE type other than hf_rope.SUPPORTED, Llama's o_proj bias, soft-capping, other
activations), is a MegalmError naming it, never a silently different model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megalm.config import ModelConfig
from megalm.convert.families import check_supported, family_of, model_config_from_hf
from megalm.errors import MegalmError
from megalm.model.gpt import GPT, VOCAB_PARAMETERS
from megalm.parallel.context import TensorParallel


def from_hf_state(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state -> megalm GPT state with the config's vocabulary rows (no padding); a missing
    tensor, or one whose shape is not the config's, is a MegalmError naming it."""
    try:
        state = family_of(cfg).from_hf(hf, cfg, 0)  # no padding rows: the shapes are checked as they are
    except KeyError as e:
        raise MegalmError(f"the Hugging Face weights lack {e.args[0]}") from None
    with torch.device("meta"):
        expected = GPT(cfg, TensorParallel.build(None)).state_dict()
    for name, tensor in state.items():
        shape = (cfg.vocab_size, *expected[name].shape[1:]) if name in VOCAB_PARAMETERS else expected[name].shape
        if tensor.shape != shape:
            raise MegalmError(f"the Hugging Face weights do not match its config: {name} has shape "
                              f"{tuple(tensor.shape)}, the config makes it {tuple(shape)}")
    return state


def load_hf_dir(hf_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """ModelConfig and megalm state (fp32 is not forced: the file's dtype) of an HF directory."""
    import transformers  # noqa: PLC0415 - heavy

    if not (hf_dir / "config.json").is_file():
        raise MegalmError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    try:
        fields = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except ValueError:
        raise MegalmError(f"{hf_dir}/config.json is not valid JSON") from None
    check_supported(fields if isinstance(fields, dict) else {})
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its warnings on fields megalm refuses or ignores are not the user's
    try:
        config = transformers.AutoConfig.from_pretrained(str(hf_dir))
    except (ValueError, KeyError, TypeError) as e:
        raise MegalmError(f"{hf_dir}/config.json: transformers cannot read it: {str(e).splitlines()[0]}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    cfg = model_config_from_hf(config)
    return cfg, from_hf_state(read_hf_weights(hf_dir), cfg)


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model*.safetensors (or, loaded with weights_only=True, pytorch_model*.bin)."""
    from safetensors.torch import load_file  # noqa: PLC0415 - only conversion needs it

    files = sorted(hf_dir.glob("model*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise MegalmError(f"{hf_dir} has no model*.safetensors or pytorch_model*.bin weights")
    return {k: v for f in bins for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
