"""tools/convert_checkpoint.py: to-hf | from-hf | reshard | universal (megalm checkpoints <-> Hugging Face, layouts)."""

from __future__ import annotations

import argparse
import json
import time

from megalm.convert.hf import from_hf, to_hf
from megalm.convert.reshard import reshard
from megalm.convert.universal import convert_to_universal
from megalm.convert.writer import describe_written
from megalm.errors import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split(": ", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("to-hf", help="megalm checkpoint (any TP/PP/ZeRO) -> Hugging Face directory")
    t.add_argument("--checkpoint", required=True, help="RUN_DIR, RUN_DIR/checkpoints or .../global_stepN")
    t.add_argument("--output", required=True, help="new HF directory (config.json, safetensors, tokenizer)")
    t.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the saved weights")
    t.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (an index above it)")
    t.add_argument("--no-verify", action="store_true", help="skip reloading with transformers and comparing logits")
    t.add_argument("--verify-layers", type=int, default=None,
                   help="compare the logits of the first N blocks only (default: all when two copies of the model "
                   "fit in a third of this machine's memory, else 2)")
    t.add_argument("--module-weights", action="store_true",
                   help="export the module weights even when fp32 master weights exist")
    f = sub.add_parser("from-hf", help="Hugging Face model directory (llama, gpt2, qwen2, qwen3, mistral, mixtral, qwen2_moe, qwen3_moe) -> megalm run directory at step 0")
    f.add_argument("--hf", required=True, help="HF model directory")
    _layout_args(f)
    f.add_argument("--config", help="YAML whose non-model sections the run uses (default: megalm's defaults)")
    f.add_argument("--no-tokenizer", action="store_true", help="do not convert the tokenizer (set data.* yourself)")
    r = sub.add_parser("reshard", help="change tensor/pipeline size (weights, optimizer state, step and data order kept)")
    r.add_argument("--checkpoint", required=True, help="RUN_DIR, RUN_DIR/checkpoints or .../global_stepN")
    _layout_args(r)
    u = sub.add_parser("universal", help="any layout -> a universal checkpoint that resumes at any layout "
                       "(checkpoint.load=OUTPUT)")
    u.add_argument("--checkpoint", required=True, help="RUN_DIR, RUN_DIR/checkpoints or .../global_stepN")
    u.add_argument("--output", required=True, help="new directory (latest, global_stepN/zero/<param>/...)")
    return p.parse_args(argv)


def _layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="new run directory (config.yaml, checkpoints/)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size the run will resume with (ZeRO partitions)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (of --dp) the run will resume with")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides (e.g. zero.stage=1)")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.perf_counter()
    if a.command == "to-hf":
        summary = to_hf(a.checkpoint, a.output, dtype=a.dtype, max_shard_size=a.max_shard_size,
                        verify=not a.no_verify, prefer_master=not a.module_weights, verify_layers=a.verify_layers)
        print(json.dumps({**summary, "seconds": round(time.perf_counter() - t0, 2)}))
        return 0
    if a.command == "universal":
        ckpt = convert_to_universal(a.checkpoint, a.output)
        print(f"wrote {describe_written(ckpt)} in {time.perf_counter() - t0:.1f} s; resume at any layout with: "
              f"python -m megalm.train --config CONFIG checkpoint.load={a.output} [parallel.* zero.stage=...]")
        return 0
    if a.command == "from-hf":
        ckpt = from_hf(a.hf, a.output, tensor=a.tp, pipeline=a.pp, data_parallel=a.dp, expert=a.ep, config_file=a.config,
                       overrides=a.overrides, tokenizer=not a.no_tokenizer)
    else:
        ckpt = reshard(a.checkpoint, a.output, tensor=a.tp, pipeline=a.pp, data_parallel=a.dp, expert=a.ep,
                       overrides=a.overrides)
    print(f"wrote {describe_written(ckpt)} in {time.perf_counter() - t0:.1f} s; resume with: "
          f"python -m megalm.train --config {a.output}/config.yaml data.train_prefixes=[...] train.steps=N")
    return 0


if __name__ == "__main__":
    run_cli(main)
