"""The main job end to end: corpus -> tokenizer -> shards -> parallel training -> HF export -> text.

    python -m megalm.cli.quickstart [--corpus FILES] [--out DIR] [--nproc 2] [section.key=value ...]

With no --corpus it builds one from the documentation bundled with Python's standard library, so
it runs offline anywhere. Each stage prints what it does; a stage whose outputs already exist is
reused (delete DIR, or pass --fresh, to start over), and an interrupted training run resumes from
its last checkpoint. The overrides apply to configs/quickstart.yaml (e.g. train.steps=800).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from megalm.config import load_config
from megalm.config.loading import PRESETS
from megalm.data.stdlib_corpus import write_stdlib_corpus
from megalm.errors import MegalmError, run_cli

CONFIG = PRESETS / "quickstart.yaml"  # package data: the quickstart runs from any installed megalm
PROMPT = "Once upon a time"


def stage(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.monotonic()


def done(t0: float, what: str) -> None:
    print(f"--- {what} ({time.monotonic() - t0:.1f} s)", flush=True)


def run(cmd: list[str], **kwargs) -> None:
    """Run a stage's command, streaming its output; a failure stops the quickstart with its code."""
    print("$ " + " ".join(["python", *cmd[1:]] if cmd[0] == sys.executable else cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), DS_ACCELERATOR="cpu",
               GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    code = subprocess.call(cmd, env=env, **kwargs)
    if code != 0:
        raise SystemExit(code)


def build_corpus(out: Path, corpus: list[str] | None) -> list[str]:
    t0 = stage("1/6 corpus")
    if corpus:
        missing = [c for c in corpus if not Path(c).exists()]
        if missing:
            raise MegalmError(f"corpus file not found: {missing[0]}")
        done(t0, f"using {len(corpus)} file(s) of yours")
        return corpus
    path = out / "corpus.jsonl"
    if not path.exists():
        write_stdlib_corpus(path)
    lines = sum(1 for _ in open(path, encoding="utf-8"))
    done(t0, f"{path}: {lines} documents from Python's bundled docs, {path.stat().st_size / 1e6:.2f} MB")
    return [str(path)]


def train_tokenizer(out: Path, corpus: list[str], vocab_size: int) -> Path:
    t0 = stage("2/6 tokenizer (sentencepiece BPE)")
    model = out / "tokenizer.model"
    if model.exists():
        done(t0, f"reusing {model}")
        return model
    run([sys.executable, "-m", "megalm.cli.train_tokenizer", "--input", *corpus, "--type", "bpe",
         "--vocab-size", str(vocab_size), "--output-prefix", str(out / "tokenizer")])
    done(t0, f"wrote {model}")
    return model


def preprocess(out: Path, corpus: list[str], tokenizer: Path) -> str:
    t0 = stage("3/6 shards (2 worker processes)")
    prefix = out / "shards" / "docs"
    meta = Path(f"{prefix}.meta.json")
    if meta.exists() and meta.stat().st_mtime >= tokenizer.stat().st_mtime:
        done(t0, f"reusing {prefix}.bin/.idx")
        return str(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "megalm.cli.preprocess_data", "--input", *corpus, "--json-key", "text",
         "--tokenizer-type", "sentencepiece", "--tokenizer-model", str(tokenizer),
         "--output-prefix", str(prefix), "--workers", "2", "--append-eod"])
    done(t0, f"wrote {prefix}.bin/.idx/.meta.json")
    return str(prefix)


def train(run_dir: Path, prefix: str, tokenizer: Path, nproc: int, overrides: list[str]) -> None:
    t0 = stage(f"4/6 training: {nproc} processes, tensor parallel (configs/quickstart.yaml)")
    status = run_dir / "status.json"
    args = [f"data.train_prefixes=[{prefix}]", f"data.tokenizer_model={tokenizer}",
            f"train.run_dir={run_dir}", *overrides]
    cfg = load_config(CONFIG, args).validate(nproc)
    saved = run_dir / "config.yaml"
    if saved.exists() and saved.read_text() != cfg.to_yaml():
        print(f"the config changed since {run_dir} was trained: training from scratch", flush=True)
        shutil.rmtree(run_dir)
    finished = json.loads(status.read_text()) if status.exists() else {}
    if finished.get("state") == "completed" and finished.get("step") == cfg.train.steps:
        done(t0, f"reusing the finished run in {run_dir}")
        return
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", "megalm.train", "--config", str(CONFIG), *args])
    done(t0, f"trained {cfg.train.steps} steps; TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")


def plot_losses(run_dir: Path) -> tuple[Path, float | None]:
    """Write RUN_DIR/loss_curve.png; return it and the last validation perplexity."""
    import matplotlib  # noqa: PLC0415 - heavy, only for the picture

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(list(train), list(train.values()), label="train loss")
    ax.plot(list(val), list(val.values()), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title("megalm quickstart")
    ax.legend()
    path = run_dir / "loss_curve.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    ppl = [r["val_ppl"] for r in rows if "val_ppl" in r]
    return path, (ppl[-1] if ppl else None)


def export_and_generate(run_dir: Path, out: Path) -> str:
    t0 = stage("5/6 convert to Hugging Face transformers")
    hf = out / "hf"
    latest = run_dir / "checkpoints" / "latest"
    if not (hf / "config.json").exists() or (hf / "config.json").stat().st_mtime < latest.stat().st_mtime:
        if hf.exists():  # an export of an older checkpoint
            shutil.rmtree(hf)
        run([sys.executable, "-m", "megalm.cli.convert_checkpoint", "to-hf", "--checkpoint", str(run_dir / "checkpoints"),
             "--output", str(hf)])
    done(t0, f"{hf} (AutoModelForCausalLM.from_pretrained loads it)")
    t0 = stage(f'6/6 transformers generate() from "{PROMPT}"')
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - heavy

    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf)
    inputs = tok(PROMPT, return_tensors="pt")
    torch.manual_seed(0)
    ids = model.generate(**inputs, max_new_tokens=60, min_new_tokens=40, do_sample=True, top_p=0.9, temperature=0.8,
                         pad_token_id=tok.eos_token_id)
    text = tok.decode(ids[0], skip_special_tokens=True)
    done(t0, "generated")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megalm.cli.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", nargs="+", help="your jsonl/txt/parquet files (default: Python's docs)")
    parser.add_argument("--out", help="output folder (default: runs/quickstart)")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (tensor parallel 2 needs 2)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--fresh", action="store_true", help="redo every stage")
    parser.add_argument("overrides", nargs="*", help="section.key=value for configs/quickstart.yaml")
    args = parser.parse_args(argv)
    out = Path(args.out or "runs/quickstart").resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    corpus = build_corpus(out, args.corpus)
    tokenizer = train_tokenizer(out, corpus, args.vocab_size)
    prefix = preprocess(out, corpus, tokenizer)
    run_dir = out / "run"
    train(run_dir, prefix, tokenizer, args.nproc, [f"model.vocab_size={args.vocab_size}", *args.overrides])
    curve, ppl = plot_losses(run_dir)
    text = export_and_generate(run_dir, out)
    print(f"\n{'=' * 72}\n{text}\n{'=' * 72}")
    print(f"validation perplexity: {ppl:.2f}" if ppl is not None else "validation perplexity: (no evaluation ran)")
    print(f"loss curve: {curve}\nHugging Face model: {out / 'hf'}\ntotal {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
