"""One test per seam in megalm.seams: each fails when the installed DeepSpeed or transformers stops
behaving as megalm assumes (a renamed private, a changed keyword), instead of a run silently changing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megalm import seams
from megalm.config import load_config
from megalm.testing.distributed import run_distributed_test
from megalm.testing.runs import REPO, TINY

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- DeepSpeed


def test_skip_op_build_marks_the_op_incompatible():
    import deepspeed.ops

    seams.skip_op_build("deepspeed_shm_comm")
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    with pytest.raises(RuntimeError, match="no op 'no_such_op'"):
        seams.skip_op_build("no_such_op")


def test_pipeline_partitioning_is_explicit_and_read_by_deepspeed():
    # DeepSpeed defaults pipe_partitioned and grad_partitioned to true; megalm sets both in its
    # config (off under sequence parallelism: issue 21) and DeepSpeed must read them as given.
    # The behaviour itself: the TP2 + SP x PP2 parity layouts (tests/training/test_parity.py).
    from deepspeed.runtime.config import DeepSpeedConfig

    from megalm.training.ds_config import deepspeed_config

    for sp in (True, False):
        cfg = load_config(TINY, ["parallel.tensor=2", "parallel.pipeline=2", f"parallel.sequence_parallel={sp}"])
        cfg.validate(4)
        ds = deepspeed_config(cfg)
        read = DeepSpeedConfig({**ds, "train_batch_size": 4, "train_micro_batch_size_per_gpu": 4,
                                "gradient_accumulation_steps": 1}, mpu=None).pipeline
        assert read["pipe_partitioned"] is (not sp) and read["grad_partitioned"] is (not sp), (sp, read)
    defaults = DeepSpeedConfig({"train_batch_size": 1}, mpu=None).pipeline
    assert defaults["pipe_partitioned"] and defaults["grad_partitioned"]  # why megalm must set them


def _engine_seams(run_dir: str) -> dict:
    """One rank, ZeRO-0 fp32 (the path whose norm DeepSpeed drops), through megalm's start-up."""
    import deepspeed

    from megalm.training.startup import bootstrap

    cfg = load_config(TINY, ["zero.stage=0", "train.precision=fp32",
                             f"train.run_dir={run_dir}"])
    ds = bootstrap(cfg).engine.ds
    tokens = torch.randint(0, 257, (4, 65), generator=torch.Generator().manual_seed(0))
    def no_reduce(*args, **kwargs) -> None:
        raise AssertionError("DeepSpeed ran the gradient all-reduce")

    ds.allreduce_gradients = no_reduce
    ds.backward(ds(tokens[:, :-1], tokens[:, 1:]))  # skip_gradient_allreduce: the patched reduce never runs
    norm = torch.nn.utils.get_total_norm([p.grad for p in ds.module.parameters()]).item()
    ds.step()
    seams.set_progress(ds, 7, 56)
    ds.save_checkpoint(run_dir, tag="t", save_latest=False)
    saved = seams.load_deepspeed_file(Path(run_dir) / "t" / "mp_rank_00_model_states.pt")
    # checkpoint_reads: DeepSpeed's own load of its files goes through load_deepspeed_file, then back
    path = str(Path(run_dir) / "t" / "mp_rank_00_model_states.pt")
    original = ds.checkpoint_engine.load
    with seams.checkpoint_reads(ds):
        through = ds.checkpoint_engine.load(path, map_location=torch.device("cpu"))
        routed = ds.checkpoint_engine.load is not original
    plain = original(path, map_location=torch.device("cpu"))
    same = through.keys() == plain.keys() and all(torch.equal(through["module"][k], v) for k, v in plain["module"].items())
    return {"recorded": ds.get_global_grad_norm(), "norm": norm, "reads": (routed, same, ds.checkpoint_engine.load == original),
            "allreduce_flag": ds.enable_backward_allreduce, "steps": saved["global_steps"],
            "samples": saved["global_samples"], "ds_version": deepspeed.__version__}


def test_engine_seams_on_a_real_engine(tmp_path):
    r = run_distributed_test(_engine_seams, 1, args=(str(tmp_path),), env={"DS_ACCELERATOR": "cpu"})[0]
    # record_fp32_grad_norm: DeepSpeed called the clipping megalm installed, which kept the norm
    assert r["recorded"] == pytest.approx(r["norm"], rel=1e-6) and r["norm"] > 1e-2
    assert r["allreduce_flag"] is False  # skip_gradient_allreduce (its effect: no all-reduce ran)
    assert (r["steps"], r["samples"]) == (7, 56)  # set_progress lands in DeepSpeed's checkpoint
    assert r["reads"] == (True, True, True)  # checkpoint_reads: its loads routed, the same contents, restored


@pytest.mark.slow
@pytest.mark.parametrize("stage, precision", [(2, "fp32"), (3, "bf16")])
def test_zero_fp32_state_equals_deepspeeds_public_reader(stage, precision, byte_shards, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megalm.testing.parity import train_rank

    overrides = [f"data.train_prefixes=[{byte_shards}]", f"zero.stage={stage}", f"train.precision={precision}",
                 "train.steps=2", "train.global_batch_size=8", f"train.run_dir={tmp_path}", "train.eval_interval=0",
                 "checkpoint.interval=0", "logging.console=false", "logging.tensorboard=false"]
    run_distributed_test(train_rank, 2, args=(TINY, overrides), env={"DS_ACCELERATOR": "cpu"})
    parts = seams.ZeroPartitions.open(tmp_path / "checkpoints" / "global_step2", 0)
    ours = {name: parts.tensor(name, "fp32") for name in parts.names()}
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "checkpoints"), tag="global_step2")
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name, value in theirs.items():
        assert value.dtype == torch.float32 and torch.equal(ours[name], value), name


# ----------------------------------------------------------------------------- transformers


def _tiny_llama(**kw) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, **kw)


def test_rope_kwargs_round_trip_through_a_saved_config(tmp_path):
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    _tiny_llama(**seams.rope_kwargs(llama3)).save_pretrained(tmp_path)
    loaded = seams.rope_parameters_of(transformers.AutoConfig.from_pretrained(tmp_path))
    assert {k: loaded[k] for k in llama3} == llama3
    assert seams.rope_parameters_of(_tiny_llama())["rope_type"] == "default"  # no scaling: plain RoPE


def test_dtype_kwargs_set_the_config_and_the_loaded_weights(tmp_path):
    config = _tiny_llama(**seams.dtype_kwargs(torch.bfloat16))
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **seams.dtype_kwargs(torch.float32))
    assert next(model.parameters()).dtype == torch.float32
    assert transformers.AutoConfig.from_pretrained(tmp_path).dtype == torch.bfloat16


def test_causal_lm_loss_does_not_shift_labels_again():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_tiny_llama()).eval()
    tokens = torch.randint(0, 97, (2, 9))
    x, labels = tokens[:, :-1], tokens[:, 1:]  # labels are already the next tokens
    with torch.no_grad():
        logits = model(input_ids=x).logits
        loss = seams.causal_lm_loss(model, x, labels)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.reshape(-1, 97), labels.reshape(-1)).item(), rel=1e-5)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_spm_tokenizer_json_encodes_as_sentencepiece(model_type, tmp_path):
    import pydoc_data.topics

    import sentencepiece as spm
    from tokenizers import Tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sorted(pydoc_data.topics.topics.values()))[:200_000], encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), model_type=model_type,
                                   vocab_size=500, byte_fallback=True, character_coverage=1.0, num_threads=1,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    hf = Tokenizer.from_str(seams.spm_tokenizer_json(str(tmp_path / "sp.model")))
    for text in ("Once upon a time, the same", "héllo wörld 日本語", "x = f(a, b)  # 12345"):
        ids = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, text
        assert hf.decode(ids) == sp.decode(ids), text


def test_zero3_context_parallel_seams_are_still_needed():
    # the two ZeRO-3 facts behind partition_zero3_over and sum_zero3_gradients_over_context; the
    # end-to-end check is tests/long_context/test_context_parallel.py (CP2 at ZeRO-3 vs one process)
    import inspect

    from deepspeed.runtime.comm import coalesced_collectives
    from deepspeed.runtime.zero import stage3
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    convert = inspect.getsource(DeepSpeedZeRoOffload._convert_to_zero_parameters)
    assert "mpu.get_data_parallel_group()" in convert and "sequence" not in convert
    assert "tensor_partition_flat_buffer.div_(world_sz)" in inspect.getsource(coalesced_collectives)
    assert hasattr(stage3.DeepSpeedZeroOptimizer_Stage3, "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads")
    source = inspect.getsource(stage3)
    scatter = source[source.index("def __avg_scatter_grads"):source.index("def set_grad_positions")]
    assert "reduce_scatter_coalesced" in scatter and "sequence_parallel_size" not in scatter


# ----------------------------------------------------------------------------- DeepSpeed, each seam called


def _write_seams(run_dir: str) -> dict:
    """checkpoint_writes sees every file DeepSpeed writes; collect_write_errors keeps a failed write
    (and skips the rest of that save) instead of raising; both put the writer back. Two data-parallel
    ranks, so that ZeRO-1 has an optimizer partition to write (on one rank it runs as ZeRO-0)."""
    import torch.distributed as dist

    from megalm.training.startup import bootstrap

    ds = bootstrap(load_config(TINY, ["zero.stage=1", f"train.run_dir={run_dir}"])).engine.ds
    seen = []

    def recording(state_dict, path, *args, **kwargs):  # noqa: ANN001, ANN202 - DeepSpeed's call
        seen.append(Path(path).name)
        return original(state_dict, path, *args, **kwargs)

    def listing(tag: str) -> list[str]:
        dist.barrier()
        return sorted(p.name for p in (Path(run_dir) / tag).iterdir())

    with seams.checkpoint_writes(ds, recording) as original:
        ds.save_checkpoint(run_dir, tag="seen", save_latest=False)
    written = listing("seen")
    attempts = []

    def full_disk(state_dict, path, *args, **kwargs):  # noqa: ANN001, ANN202
        attempts.append(Path(path).name)
        raise OSError(28, "No space left on device")

    with seams.checkpoint_writes(ds, full_disk), seams.collect_write_errors(ds) as errors:
        ds.save_checkpoint(run_dir, tag="full", save_latest=False)  # does not raise
    ds.save_checkpoint(run_dir, tag="after", save_latest=False)  # the real writer is back
    return {"seen": sorted(seen), "written": written, "errors": [str(e) for e in errors], "attempts": attempts,
            "after": listing("after")}


def test_checkpoint_writes_and_collect_write_errors_on_a_real_engine(tmp_path):
    ranks = run_distributed_test(_write_seams, 2, args=(str(tmp_path),), env={"DS_ACCELERATOR": "cpu"})
    seen = sorted(name for r in ranks for name in r["seen"])
    assert seen == ranks[0]["written"] and "mp_rank_00_model_states.pt" in seen
    assert sum("optim_states" in name for name in seen) == 2  # each rank its own partition
    for r in ranks:
        assert len(r["attempts"]) == 1  # the first write failed; the rest of that save was not tried
        assert r["errors"] == ["[Errno 28] No space left on device"]
        assert r["after"] == r["written"]


ADAM_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def _optimizer_state_seams(run_dir: str, stage: int, precision: str) -> dict:
    """prepare_optimizer_state then set_full_state on two parameters, saved: what was set."""
    from megalm.training.startup import bootstrap

    cfg = load_config(TINY, [f"zero.stage={stage}", f"train.precision={precision}", f"train.run_dir={run_dir}"])
    ds = bootstrap(cfg).engine.ds
    seams.prepare_optimizer_state(ds, 3.0)
    g = torch.Generator().manual_seed(stage)
    params = dict(ds.module.named_parameters())
    values = {}
    for name in ("embedding.word.weight", "blocks.1.mlp.fc2.weight"):
        p = params[name]
        shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
        values[name] = {key: torch.randn(shape, generator=g).abs() for key in ADAM_KEYS}
        seams.set_full_state(ds, p, values[name])
    ds.save_checkpoint(run_dir, tag="t", save_latest=False)
    # ZeRO-0: the saved optimizer state is indexed in parameter-group order (the bf16 wrapper's
    # module-weight groups stand for its fp32 copies)
    opt = ds.optimizer
    held = opt.fp16_groups if hasattr(opt, "fp16_groups") else [g["params"] for g in opt.param_groups]
    names = {id(q): n for n, q in params.items()}
    groups = [[names[id(q)] for q in group] for group in held] if stage == 0 else []
    return {"values": values, "order": [n for group in groups for n in group], "groups": groups}


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (0, "bf16"), (1, "bf16"), (3, "fp32")])
def test_set_full_state_lands_in_the_saved_checkpoint(tmp_path, stage, precision):
    # prepare_optimizer_state + set_full_state, read back by the checkpoint readers that use
    # zero0_optimizer_state (ZeRO-0) and ZeroPartitions (1-3): the master and both Adam moments
    # ZeRO-1 on two data-parallel ranks (on one it runs as ZeRO-0)
    r = run_distributed_test(_optimizer_state_seams, 2 if stage == 1 else 1, args=(str(tmp_path), stage, precision),
                             env={"DS_ACCELERATOR": "cpu"})[0]
    ckpt = tmp_path / "t"
    for name, want in r["values"].items():
        if stage == 0:
            states = seams.load_deepspeed_file(ckpt / "mp_rank_00_model_states.pt")
            sd, masters = seams.zero0_optimizer_state(states)
            index = r["order"].index(name)
            got = {key: sd["state"][index][key] for key in ("exp_avg", "exp_avg_sq")}
            if masters is None:  # fp32: the masters are the module's weights
                got["fp32"] = states["module"][name]
            else:
                group = next(i for i, names in enumerate(r["groups"]) if name in names)
                got["fp32"] = masters[group][r["groups"][group].index(name)]
            assert float(sd["state"][index]["step"]) == 3.0
        else:
            parts = seams.ZeroPartitions.open(ckpt, 0)
            assert parts.keys(name) == ADAM_KEYS and parts.step == 3.0
            got = {key: parts.tensor(name, key) for key in ADAM_KEYS}
        for key in ADAM_KEYS:
            torch.testing.assert_close(got[key].float().view(want[key].shape), want[key], rtol=0, atol=0,
                                       msg=f"{name} {key}")


def _group_timeout() -> float:
    import datetime

    import torch.distributed as dist

    seams.default_group_timeout(datetime.timedelta(seconds=77))
    group = dist.new_group([0])  # as DeepSpeed creates its groups: no timeout given
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def test_default_group_timeout_reaches_a_new_group():
    assert run_distributed_test(_group_timeout, 1, env={"DS_ACCELERATOR": "cpu"})[0] == 77.0


# ----------------------------------------------------------------------------- DeepSpeed, expert parallelism


def _expert_seams(run_dir: str) -> dict:
    """Two ranks at parallel.expert=2, ZeRO-0 fp32: the engine counts megalm's MoE layers as MoE
    (deepspeed_sees_experts) with megalm's groups (register_expert_groups); the clipping norm sums the
    experts over the expert ranks; checkpoint files are a dense model's while dense_checkpoint_files lasts;
    zero0_full_state reads what set_full_state writes."""
    import torch.distributed as dist

    from megalm.training.startup import bootstrap

    moe = str(REPO / "configs" / "moe-tiny.yaml")
    cfg = load_config(moe, ["zero.stage=0", "train.precision=fp32", "parallel.expert=2", "model.family=none",
                            "train.micro_batch_size=2", "train.global_batch_size=4", f"train.run_dir={run_dir}"])
    rt = bootstrap(cfg)
    ds = rt.engine.ds
    tokens = torch.randint(0, 257, (2, 65), generator=torch.Generator().manual_seed(dist.get_rank()))
    ds.backward(ds(tokens[:, :-1], tokens[:, 1:]))
    ds.allreduce_gradients()
    experts = [p for p in ds.module.parameters() if getattr(p, "allreduce", True) is False]
    dense = [p for p in ds.module.parameters() if getattr(p, "allreduce", True) is not False]
    squares = torch.stack([p.grad.double().square().sum() for p in experts]).sum()
    dist.all_reduce(squares)  # each rank holds other experts
    norm = (squares + torch.stack([p.grad.double().square().sum() for p in dense]).sum()).sqrt().item()
    ds.gradient_clipping = lambda: 1e9  # measure the norm, do not clip
    ds.clip_fp32_gradients()
    ds.optimizer.step()
    state = seams.zero0_full_state(ds, experts[0])
    seams.set_full_state(ds, experts[0], {k: v + 1 for k, v in state.items()})
    again = seams.zero0_full_state(ds, experts[0])
    with seams.dense_checkpoint_files(ds):
        during = ds.has_moe_layers
        ds.save_checkpoint(run_dir, tag="t", save_latest=False)
    dist.barrier()
    from deepspeed.utils import groups

    return {"has_moe": ds.has_moe_layers, "during": during, "files": sorted(p.name for p in (Path(run_dir) / "t").iterdir()),
            "edp_ranks": groups._get_expert_data_parallel_group_ranks("ep_size_2"),
            "ep_ranks": groups._get_expert_parallel_group_ranks("ep_size_2"),
            "recorded": ds.get_global_grad_norm(), "norm": norm, "expert_shape": tuple(experts[0].shape),
            "round_trip": all(torch.equal(again[k], state[k] + 1) for k in state), "keys": sorted(state)}


def test_expert_parallel_seams_on_a_real_engine(tmp_path):
    ranks = run_distributed_test(_expert_seams, 2, args=(str(tmp_path),), env={"DS_ACCELERATOR": "cpu"})
    for r in ranks:
        assert r["has_moe"] and not r["during"]  # counted as MoE; dense files while saving
        assert r["ep_ranks"] == [0, 1] and r["edp_ranks"] in ([0], [1])  # megalm's groups under DeepSpeed's name
        assert r["expert_shape"][0] == 4  # 4 of moe-tiny's 8 experts per rank
        assert r["recorded"] == pytest.approx(r["norm"], rel=1e-6)  # experts' squares summed over the ranks
        assert r["round_trip"] and r["keys"] == ["exp_avg", "exp_avg_sq", "fp32"]
    assert ranks[0]["files"] == ["mp_rank_00_model_states.pt"]  # no DeepSpeed per-expert files
    import inspect

    from deepspeed.runtime import engine

    # the check deepspeed_sees_experts widens, and the checks dense_checkpoint_files turns off
    assert "isinstance(module, MoE)" in inspect.getsource(engine.DeepSpeedEngine._configure_distributed_model)
    assert "if self.has_moe_layers:" in inspect.getsource(engine.DeepSpeedEngine.save_checkpoint)


def _flat_groups(stage: int) -> dict:
    """zero_flat_groups of a ZeRO-1/2 engine on two data-parallel ranks, checked against its buffers."""
    from megalm.training.startup import bootstrap

    ds = bootstrap(load_config(TINY, [f"zero.stage={stage}", "train.precision=bf16", "optimizer.name=muon"])).engine.ds
    layouts = seams.zero_flat_groups(ds)
    opt, rank = ds.optimizer, torch.distributed.get_rank()
    views, partitions = [], []
    for i, layout in enumerate(layouts):
        flat = opt.bit16_groups_flat[i]
        # every parameter is the flat buffer's slice at its offset (same storage, same values)
        views += [p.data_ptr() == flat[o:].data_ptr() and torch.equal(p.detach().reshape(-1), flat[o:o + p.numel()])
                  for p, o in zip(layout.params, layout.offsets, strict=True)]
        n = layout.partition_numel
        partitions.append(torch.equal(opt.single_partition_of_fp32_groups[i].to(flat.dtype), flat[rank * n:(rank + 1) * n])
                          and torch.distributed.get_world_size(layout.group) == 2)
    return {"views": views, "partitions": partitions, "groups": len(layouts),
            "zero0": seams.zero_flat_groups(bootstrap(load_config(TINY, ["zero.stage=0"])).engine.ds)}


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_flat_groups_is_the_flat_layout_zero_steps(stage):
    # the layout megalm's Muon steps ZeRO 1/2's partitions by: each parameter where the offset says,
    # this rank's partition the fp32 masters it updates (groups: Muon's matrices, the undecayed rest); none at ZeRO-0
    for r in run_distributed_test(_flat_groups, 2, args=(stage,), env={"DS_ACCELERATOR": "cpu"}):
        assert r["groups"] == 2 and all(r["views"]) and len(r["views"]) > 10 and all(r["partitions"]), r
        assert r["zero0"] is None
