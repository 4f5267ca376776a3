"""The training loop: set up, resume, step, evaluate, log, checkpoint, stop cleanly on preemption."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from megalm.config import Config
from megalm.convert.universal import UniversalCheckpoint
from megalm.errors import MegalmError
from megalm.inference.harness import check_tasks, run_tasks, task_scalars
from megalm.inference.load import TextCodec
from megalm.model.moe import end_step_statistics, moe_metrics, update_expert_bias
from megalm.parallel.dims import ParallelDims
from megalm.parallel.launch_env import discover
from megalm.parallel.loss import SAMPLE_LOSSES
from megalm.training import checkpoint as ckpt
from megalm.training import manifest
from megalm.training.async_save import BackgroundWriter
from megalm.training.checkpoint_meta import CheckpointMeta, TrainState
from megalm.training.data import TrainData
from megalm.training.ds_config import deepspeed_zero_stage
from megalm.training.metrics import MetricsLogger, Throughput, device_peak_tflops, memory_gib
from megalm.training.signals import PreemptionFlag
from megalm.training.startup import Runtime, bootstrap
from megalm.training.stragglers import StragglerMonitor
from megalm.training.watchdog import StepWatchdog


@dataclass
class Run:
    """Everything built once at start-up: the runtime (groups, data, engine), the metrics sinks and
    the checkpoint to resume from (root, tag), if any (a universal one already holds its weights)."""

    rt: Runtime
    logger: MetricsLogger
    throughput: Throughput
    resume_from: tuple[Path, str] | None
    universal: UniversalCheckpoint | None
    stragglers: StragglerMonitor
    writer: BackgroundWriter | None = None  # checkpoint.async_save: this rank's writer thread
    pending: ckpt.PendingSave | None = None  # an asynchronous save still being written
    last_loss: float = 0.0

    @property
    def cfg(self) -> Config:
        return self.rt.cfg


def setup(cfg: Config) -> Run:
    target = ckpt.resolve_load(cfg.checkpoint.load, Path(cfg.train.run_dir) / "checkpoints")
    if target is not None:  # every rank, before start-up: files present with their recorded sizes
        tag, damaged = ckpt.intact_checkpoint(*target, fallback=_may_fall_back(cfg),
                                              check=lambda path: manifest.check(path, digest=False))
        _say_fallback(cfg, target, tag, damaged)
        target = (target[0], tag)
    universal = None
    if target is not None and CheckpointMeta.read(target[0] / target[1]).kind == "universal":
        universal = UniversalCheckpoint.open(target[0] / target[1])
        universal.check_model(cfg)
    if cfg.train.eval_tasks and cfg.train.eval_tasks_interval:  # before the model: names and data reachable
        check_tasks(cfg.train.eval_tasks, include_path=cfg.train.eval_tasks_include_path or None)
    resumed = CheckpointMeta.read(target[0] / target[1]) if target is not None else None
    rt = bootstrap(cfg, data=True, announce=cfg.logging.console, resumed=resumed,
                   prepare_model=universal.weight_loader(cfg) if universal else None)
    if rt.data.change and dist.get_rank() == 0 and cfg.logging.console:
        print(rt.data.change, flush=True)
    SAMPLE_LOSSES.enabled = rt.data.per_source  # the loss functions keep each sample's loss for loss/<source>
    run_dir = Path(cfg.train.run_dir)
    rank0 = dist.get_rank() == 0
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    lg = cfg.logging
    wandb = dict(project=lg.wandb_project, name=lg.wandb_name, mode=lg.wandb_mode, config=cfg.to_dict()) \
        if lg.wandb else None
    logger = MetricsLogger(run_dir, enabled=rank0, console=cfg.logging.console, wandb=wandb,
                           tensorboard=cfg.logging.tensorboard, total_steps=cfg.train.steps)
    throughput = Throughput.of_run(cfg, rt.dims.world_size, device_peak_tflops(cfg.logging.peak_tflops))
    stragglers = StragglerMonitor.start(cfg.logging.straggler_interval, cfg.logging.straggler_ratio)
    writer = BackgroundWriter() if cfg.checkpoint.async_save else None
    return Run(rt, logger, throughput, target, universal, stragglers, writer)


def train(cfg: Config) -> TrainState:
    """Train `cfg.train.steps` optimizer steps (resuming if a checkpoint says so); return the end state."""
    run = setup(cfg)
    state = _resume(run)
    preempt = PreemptionFlag().install()
    watchdog = StepWatchdog(Path(cfg.train.run_dir), dist.get_rank(), cfg.parallel.collective_timeout_minutes)
    batches = run.rt.data.train_batches(state.consumed_samples)
    nonfinite_in_a_row = 0
    try:
        while state.step < cfg.train.steps:
            watchdog.arm(state.step + 1)
            try:
                state, stop = _one_step(run, state, batches, preempt, watchdog)
            except RuntimeError as e:  # a backend's collective timeout becomes one line
                explained = watchdog.explain(e)
                if explained is e:
                    raise
                raise explained from None
            watchdog.disarm()
            nonfinite_in_a_row = 0 if math.isfinite(run.last_loss) else nonfinite_in_a_row + 1
            if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                raise MegalmError(
                    f"loss was not finite for {nonfinite_in_a_row} steps in a row (step {state.step}); "
                    "lower optimizer.lr, use bf16 instead of fp16, or check the data"
                )
            if stop:
                finish_saving(run)
                _write_status(run, state, "preempted")
                return state
        if cfg.checkpoint.save_at_end and not (
            cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0
        ):
            save(run, state)
        finish_saving(run)
        _write_status(run, state, "completed")
        return state
    finally:
        if run.writer is not None:
            run.writer.close()
        watchdog.close()
        preempt.uninstall()
        run.logger.close()


def _one_step(
    run: Run, state: TrainState, batches: Iterator, preempt: PreemptionFlag, watchdog: StepWatchdog,
) -> tuple[TrainState, bool]:
    """Train, log, evaluate and save as this step asks; return the new state and whether to stop."""
    cfg = run.cfg
    t0 = time.perf_counter()
    lr = run.rt.engine.ds.get_lr()[0]  # the rate this step uses (the scheduler steps after it)
    loss, wait, own = train_step(run.rt, batches, watchdog)
    run.rt.data.add_sample_losses()  # the step's last micro batch (the others as the next one was read)
    state = replace(state, step=state.step + 1,
                    consumed_samples=state.consumed_samples + cfg.train.global_batch_size)
    run.last_loss = loss
    if not math.isfinite(loss):  # a non-finite step was skipped by the optimizer
        state = replace(state, skipped_steps=state.skipped_steps + 1)
    watchdog.phase = "logging"
    _log_step(run, state, loss, lr, time.perf_counter() - t0, wait)
    run.stragglers.add(own)
    if run.stragglers.due(state.step):
        watchdog.phase = "the straggler report"
        scalars, warning = run.stragglers.report(state.step)
        run.logger.log(state.step, scalars, quiet=True)
        if warning and dist.get_rank() == 0 and cfg.logging.console:
            print(warning, flush=True)
    if cfg.train.eval_interval and state.step % cfg.train.eval_interval == 0:
        watchdog.phase = "evaluation"
        evaluate(run, state.step)
    if cfg.train.eval_tasks and cfg.train.eval_tasks_interval and state.step % cfg.train.eval_tasks_interval == 0:
        watchdog.phase = "lm-eval tasks"
        evaluate_tasks(run, state.step)
    watchdog.phase = "the preemption check"
    stop = preempt.should_stop()
    interval = cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0
    if stop or interval:
        watchdog.phase = "saving a checkpoint"
        save(run, state)
    elif run.pending is not None:  # publish an asynchronous save once every rank has written it
        watchdog.phase = "checking the background checkpoint writes"
        if ckpt.finish_async_save(run.pending, run.writer, wait=False):
            run.pending = None
    elif run.writer is not None and not run.writer.copies.by_file:  # after the first step: every state exists
        watchdog.phase = "reserving host memory for asynchronous saves"
        ckpt.reserve_async_save(run.rt.engine, Path(cfg.train.run_dir) / "checkpoints", run.writer)
    return state, stop


def train_step(rt: Runtime, batches: Iterator, watchdog: StepWatchdog | None = None) -> tuple[float, float, float]:
    """One optimizer step over a global batch; return (mean loss over the global batch, data wait s,
    this rank's own work s: data wait and forward passes, for the straggler report).
    `watchdog.phase` follows the step (for the line a collective timeout becomes)."""
    engine = rt.engine

    def phase(name: str) -> None:
        if watchdog is not None:
            watchdog.phase = name

    if engine.pipeline:
        phase("the pipeline schedule")
        timed = _TimedIterator(batches)
        loss = engine.ds.train_batch(data_iter=timed)
        _after_step(rt, phase)
        return float(loss), timed.wait, timed.wait
    losses, wait, forward = [], 0.0, 0.0
    for _ in range(rt.cfg.train.grad_accum_steps):
        t0 = time.perf_counter()
        phase("data loading")
        inputs, labels = next(batches)
        t1 = time.perf_counter()
        wait += t1 - t0
        phase("the forward pass")
        loss = model_loss(rt, inputs, labels)
        forward += time.perf_counter() - t1
        phase("the backward pass")
        engine.ds.backward(loss)
        phase("the optimizer step")
        engine.ds.step()
        losses.append(loss.detach().float())
    _after_step(rt, phase)
    phase("the loss all-reduce")
    mean = torch.stack(losses).mean()
    dist.all_reduce(mean, group=rt.groups.data)  # every tensor and context rank already holds the same loss
    return mean.item() / rt.dims.data, wait, wait + forward


def _after_step(rt: Runtime, phase: Callable[[str], None]) -> None:
    """What follows the optimizer step: the MoE expert bias moves (model.moe_bias_update_rate), the
    global-batch balancing statistics start again (model.moe_aux_loss_statistics)."""
    end_step_statistics(rt.engine.ds.module)
    if rt.cfg.model.moe_bias_update_rate > 0:
        phase("the expert-bias update")
        update_expert_bias(rt.engine.ds.module, rt.groups.data)


def model_loss(rt: Runtime, inputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
    """The engine's loss on one micro batch: inputs are tokens, or (tokens, positions, documents)
    for packed documents (megalm.data.packing)."""
    if isinstance(inputs, tuple):
        tokens, positions, documents = (x.to(rt.device) for x in inputs)
        return rt.engine.ds(tokens, labels.to(rt.device), positions=positions, documents=documents)
    return rt.engine.ds(inputs.to(rt.device), labels.to(rt.device))


class _TimedIterator:
    """Wraps the batch iterator handed to DeepSpeed's pipeline engine to measure data waiting."""

    def __init__(self, it: Iterator) -> None:
        self.it, self.wait = it, 0.0

    def __iter__(self) -> _TimedIterator:
        return self

    def __next__(self):  # noqa: ANN204
        t0 = time.perf_counter()
        item = next(self.it)
        self.wait += time.perf_counter() - t0
        return item


@torch.no_grad()
def evaluate(run: Run, step: int) -> float:
    """Mean validation loss over `train.eval_steps` global batches (the same batches every time); a blend's
    sources' own (val_loss/<source>) besides."""
    cfg, rt = run.cfg, run.rt
    engine, device = rt.engine, rt.device
    batches = rt.data.valid_batches()
    engine.ds.eval()
    losses = []
    for _ in range(cfg.train.eval_steps):
        if engine.pipeline:
            losses.append(float(engine.ds.eval_batch(data_iter=batches)))
            continue
        for _ in range(cfg.train.grad_accum_steps):
            inputs, labels = next(batches)
            losses.append(float(model_loss(rt, inputs, labels)))
    engine.ds.train()
    rt.data.add_sample_losses()  # the last micro batch's (the others as the next one was read)
    mean = torch.tensor([sum(losses) / len(losses)], dtype=torch.float64, device=device)
    if not engine.pipeline:
        dist.all_reduce(mean, group=rt.groups.data)
        mean /= rt.dims.data
    val_loss = mean.item()
    run.logger.log(step, {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                          **rt.data.source_loss_metrics("valid")})
    return val_loss


@torch.no_grad()
def evaluate_tasks(run: Run, step: int) -> dict[str, float]:
    """Every rank runs train.eval_tasks (lm-eval) on the model as it is; rank 0 logs the results."""
    t = run.cfg.train
    model = run.rt.engine.ds.module
    model.eval()
    streams = ckpt.rng_state(run.rt.engine.tp.rng)  # lm-eval seeds the global generators: put them back
    try:
        results = run_tasks(model, TextCodec(run.rt.data.tokenizer, run.rt.data.tokenizer.eod, run.rt.data.tokenizer.pad),
                            t.eval_tasks, include_path=t.eval_tasks_include_path or None,
                            limit=t.eval_tasks_limit or None)
    finally:
        model.train()
        ckpt.set_rng_state(streams, run.rt.engine.tp.rng)
    scalars = task_scalars(results)
    run.logger.log(step, scalars, quiet=True)
    if dist.get_rank() == 0 and run.cfg.logging.console:
        print(f"step {step:>6} | " + " | ".join(f"{k.removeprefix('lm_eval/')} {v:.4g}" for k, v in scalars.items()),
              flush=True)
    return scalars


def _log_step(run: Run, state: TrainState, loss: float, lr: float, seconds: float, wait: float) -> None:
    cfg = run.cfg
    if state.step % cfg.train.log_interval and state.step != cfg.train.steps:
        return
    norm = run.rt.engine.ds.get_global_grad_norm()
    scalars = {
        "loss": loss,
        "lr": lr,
        "grad_norm": float(norm) if norm is not None else float("nan"),
        **run.throughput.step_metrics(cfg.train.global_batch_size * cfg.data.seq_len, seconds),
        "step_time_s": seconds,
        "data_wait_s": wait,
        "mem_gib": memory_gib(),
        "consumed_samples": state.consumed_samples,
        "skipped_steps": state.skipped_steps,
        **(moe_metrics(run.rt.engine.ds.module, run.rt.groups.data) if cfg.model.moe_num_experts else {}),
        **run.rt.data.mixture_metrics(state.consumed_samples - cfg.train.global_batch_size),
        **run.rt.data.source_loss_metrics(),
    }
    run.logger.log(state.step, scalars)


def save(run: Run, state: TrainState) -> None:
    """Save a checkpoint (in the background with checkpoint.async_save, after the previous one is
    published); log how long training was blocked (save_blocked_s)."""
    rt = run.rt
    t0 = time.perf_counter()
    finish_saving(run)
    meta = CheckpointMeta.of_run(rt.cfg, rt.dims, state, rt.data.tokenizer_info(),
                                 rt.data.checkpoint_state(state.consumed_samples))
    args = (rt.engine, Path(rt.cfg.train.run_dir) / "checkpoints", meta, rt.data.tokenizer_files(),
            rt.cfg.checkpoint.keep_last)
    if run.writer is not None:
        run.pending = ckpt.start_async_save(*args, run.writer)
    else:
        ckpt.save_checkpoint(*args)
    run.logger.log(state.step, {"save_blocked_s": time.perf_counter() - t0}, quiet=True)


def finish_saving(run: Run) -> None:
    """Wait for an asynchronous save still being written and publish it (collective)."""
    if run.pending is not None:
        ckpt.finish_async_save(run.pending, run.writer, wait=True)
        run.pending = None


def _resume(run: Run) -> TrainState:
    cfg, rt, target = run.cfg, run.rt, run.resume_from
    if target is None:
        return TrainState()
    load_optimizer = not cfg.checkpoint.reset_optimizer
    if run.universal is not None:
        state = run.universal.load_optimizer(rt.engine, cfg, moments=load_optimizer)
    else:
        # every rank hashes a share of the files against the manifest; all agree on the verdict
        tag, damaged = ckpt.intact_checkpoint(*target, fallback=_may_fall_back(cfg), check=manifest.check_together)
        _say_fallback(cfg, target, tag, damaged)
        if tag != target[1]:  # passed over a damaged checkpoint: the data resumes from the older one too
            rt.data = TrainData.build(cfg, rt.groups, CheckpointMeta.read(target[0] / tag))
        target = run.resume_from = (target[0], tag)
        _check_same_layout(target[0] / target[1], cfg, rt.dims, load_optimizer)
        state = ckpt.load_checkpoint(rt.engine, *target, load_optimizer=load_optimizer)
    if dist.get_rank() == 0 and cfg.logging.console:
        print(f"resumed from {target[0] / target[1]}: step {state.step}, "
              f"{state.consumed_samples} samples consumed", flush=True)
    return state


def _may_fall_back(cfg: Config) -> bool:
    return cfg.checkpoint.fallback and cfg.checkpoint.load == "auto"


def _say_fallback(cfg: Config, target: tuple[Path, str], tag: str, damaged: list[str]) -> None:
    """One line, from the launch's rank 0, when a damaged checkpoint was passed over."""
    if damaged and cfg.logging.console and discover().rank == 0:
        print(f"warning: checkpoint {target[1]} is damaged: {damaged[0]}; resuming from {tag} instead "
              "(checkpoint.fallback=true)", flush=True)


def _check_same_layout(checkpoint: Path, cfg: Config, dims: ParallelDims, load_optimizer: bool) -> None:
    """DeepSpeed's own files resume on their own layout; anything else goes through a universal
    checkpoint (checkpoint.reset_optimizer=true is the fallback for a data-parallel change)."""
    meta = CheckpointMeta.read(checkpoint)
    saved, stage = meta.dims, meta.config.zero.stage
    written, running = meta.zero_stage, deepspeed_zero_stage(cfg, dims.zero_shards, dims.pipeline)
    convert = (f"convert it: python tools/convert_checkpoint.py universal --checkpoint {checkpoint} --output U, "
               "then resume with checkpoint.load=U")
    if load_optimizer:
        meta.check_optimizer(cfg)
    if saved.expert != dims.expert:
        raise MegalmError(f"the checkpoint was written at parallel.expert={saved.expert}, this run has "
                          f"parallel.expert={dims.expert}: {convert}")
    if (saved.tensor, saved.pipeline) != (dims.tensor, dims.pipeline):
        raise MegalmError(f"the checkpoint was written at tensor {saved.tensor} x pipeline {saved.pipeline}, this "
                          f"run has {dims.tensor} x {dims.pipeline}: {convert}")
    if stage != cfg.zero.stage and 3 in (stage, cfg.zero.stage) or (stage == 0) != (cfg.zero.stage == 0):
        raise MegalmError(f"the checkpoint was written with ZeRO-{stage}, this run has ZeRO-{cfg.zero.stage}: {convert}")
    if (written == 0) != (running == 0):  # ZeRO 1/2 on a single data-parallel rank run as ZeRO-0 (deepspeed_zero_stage)
        raise MegalmError(f"the checkpoint's DeepSpeed files are ZeRO-{written} (data x context parallel {saved.data} x "
                          f"{saved.context}), this run's are ZeRO-{running} ({dims.data} x {dims.context}; ZeRO 1 and 2 "
                          f"run as ZeRO-0 on a single data-parallel rank): {convert}")
    if saved.zero_shards != dims.zero_shards and cfg.zero.stage >= 1 and (load_optimizer or cfg.zero.stage == 3):
        raise MegalmError(
            f"the checkpoint was written with data x context parallel {saved.data} x {saved.context}, this run has "
            f"{dims.data} x {dims.context}; ZeRO-{cfg.zero.stage} partitions the optimizer over those ranks: {convert} "
            "(or set checkpoint.reset_optimizer=true to start a fresh optimizer)")


def _write_status(run: Run, state: TrainState, kind: str) -> None:
    """RUN_DIR/status.json tells a job script whether training completed or stopped for preemption."""
    if dist.get_rank() == 0:
        status = {"state": kind, "step": state.step, "consumed_samples": state.consumed_samples}
        ckpt.atomic_write_text(Path(run.cfg.train.run_dir) / "status.json", json.dumps(status))
