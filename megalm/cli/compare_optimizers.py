"""AdamW against Muon on the quickstart corpus and model: the evidence behind README "Muon".

    python tools/compare_optimizers.py [--out runs/muon-vs-adamw] [--seeds 1234 1235 1236] [--nproc 1]
                                       [section.key=value ...]

Builds (or reuses) the quickstart's corpus, tokenizer and shards, then trains configs/quickstart.yaml
once per optimizer and seed, same steps and tokens, the only difference `optimizer.name` (Muon at its
documented defaults, with the AdamW learning rate and weight decay, which Moonlight's update scale
carries over). A run already finished is reused. Writes OUT/muon_vs_adamw.png (validation loss, each
seed a thin line, the mean a thick one) and prints, per seed, AdamW's final validation loss and the
step at which Muon's validation loss first reaches it (linear between evaluations), and their ratio to
the run's steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from megalm.cli.quickstart import CONFIG, build_corpus, preprocess, run, train_tokenizer
from megalm.config import load_config
from megalm.testing.runs import read_metrics

OPTIMIZERS = ("adamw", "muon")


def train_one(run_dir: Path, nproc: int, overrides: list[str]) -> None:
    """Train one run unless RUN_DIR holds the same config, completed."""
    cfg = load_config(CONFIG, overrides).validate(nproc)
    status = run_dir / "status.json"
    finished = json.loads(status.read_text()) if status.exists() else {}
    saved = run_dir / "config.yaml"
    if finished.get("state") == "completed" and saved.exists() and saved.read_text() == cfg.to_yaml():
        print(f"reusing {run_dir}", flush=True)
        return
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished or other run: from scratch, one curve per file
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", "megalm.train", "--config", str(CONFIG), *overrides])


def validation_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    losses = {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r}
    return sorted(losses), [losses[s] for s in sorted(losses)]


def steps_to_reach(steps: list[int], losses: list[float], target: float) -> float | None:
    """The first step at which the curve reaches `target`, linear between evaluations; None if never."""
    for i, (s, v) in enumerate(zip(steps, losses, strict=True)):
        if v <= target:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], losses[i - 1]
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
    return None


def plot(curves: dict[str, list[tuple[list[int], list[float]]]], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415 - heavy, only for the picture

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, runs), color in zip(curves.items(), ("tab:blue", "tab:red"), strict=False):
        for steps, losses in runs:
            ax.plot(steps, losses, color=color, alpha=0.3, linewidth=0.8)
        n = min(len(s) for s, _ in runs)
        mean = [sum(losses[i] for _, losses in runs) / len(runs) for i in range(n)]
        ax.plot(runs[0][0][:n], mean, color=color, linewidth=2, label=f"{name} (mean of {len(runs)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/muon-vs-adamw")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236])
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (parallel.tensor follows)")
    parser.add_argument("overrides", nargs="*", help="section.key=value for both optimizers")
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(data, None)
    tokenizer = train_tokenizer(data, corpus, load_config(CONFIG).model.vocab_size)
    prefix = preprocess(data, corpus, tokenizer)
    # zero.stage=0: at one data-parallel rank an fp32 run's ZeRO-1 is ZeRO-0 (megalm.training.ds_config.deepspeed_zero_stage)
    base = [f"data.train_prefixes=[{prefix}]", f"data.tokenizer_model={tokenizer}", f"parallel.tensor={args.nproc}",
            "zero.stage=0",
            "train.eval_interval=20", "train.eval_steps=8", "checkpoint.interval=100000", "checkpoint.load=none", *args.overrides]
    curves: dict[str, list[tuple[list[int], list[float]]]] = {name: [] for name in OPTIMIZERS}
    for seed in args.seeds:
        for name in OPTIMIZERS:
            run_dir = out / f"{name}-seed{seed}"
            train_one(run_dir, args.nproc, [*base, f"optimizer.name={name}", f"train.seed={seed}",
                                            f"train.run_dir={run_dir}"])
            curves[name].append(validation_curve(run_dir))
    steps = load_config(CONFIG, base).train.steps
    print("\n| seed | AdamW final val loss | Muon final val loss | Muon reaches AdamW's final at step | ratio |")
    print("|---|---|---|---|---|")
    for seed, (a_steps, a_loss), (m_steps, m_loss) in zip(args.seeds, curves["adamw"], curves["muon"], strict=True):
        reach = steps_to_reach(m_steps, m_loss, a_loss[-1])
        print(f"| {seed} | {a_loss[-1]:.4f} | {m_loss[-1]:.4f} | {'never' if reach is None else f'{reach:.0f}'} | "
              f"{'-' if reach is None else f'{reach / a_steps[-1]:.2f}'} |")
    # the same question along the way: the steps Muon needs for the loss AdamW has at a quarter, half, ...
    print("\n| AdamW at step | its val loss (mean) | Muon reaches it at step: per seed | ratio: mean (min-max) |")
    print("|---|---|---|---|")
    for quarter in (1, 2, 3, 4):
        at = steps * quarter // 4
        reached, losses = [], []
        for (a_steps, a_loss), (m_steps, m_loss) in zip(curves["adamw"], curves["muon"], strict=True):
            target = a_loss[a_steps.index(at)] if at in a_steps else None
            losses.append(target)
            reached.append(None if target is None else steps_to_reach(m_steps, m_loss, target))
        if None in losses:
            continue
        found = [r / at for r in reached if r is not None]
        spread = f"{sum(found) / len(found):.2f} ({min(found):.2f}-{max(found):.2f})" if found else "-"
        print(f"| {at} | {sum(losses) / len(losses):.4f} | "
              f"{', '.join('never' if r is None else f'{r:.0f}' for r in reached)} | {spread}"
              f"{'' if len(found) == len(reached) else f', {len(found)} of {len(reached)} seeds'} |")
    path = out / "muon_vs_adamw.png"
    plot(curves, path, f"quickstart model, {steps} steps, {len(args.seeds)} seeds")
    print(f"wrote {path}")
    return 0
