"""Process groups on 8 real gloo ranks (tensor 2 x pipeline 2 x data 2) against DeepSpeed's topology."""

import torch
import torch.distributed as dist

from megalm.parallel.dims import ParallelDims
from megalm.parallel.groups import DeepSpeedMPU, build_process_groups
from megalm.testing.distributed import run_distributed_test


def _check_groups(expected: dict) -> dict:
    rank = dist.get_rank()
    groups = build_process_groups(ParallelDims(tensor=2, pipeline=2, data=2))
    mpu = DeepSpeedMPU(groups)
    out = {}
    for axis, group in [("tensor", groups.tensor), ("data", groups.data), ("pipeline", groups.pipeline), ("model", groups.model)]:
        members = dist.get_process_group_ranks(group)
        assert members == expected[axis][rank], (axis, members)
        x = torch.tensor([float(rank)])
        dist.all_reduce(x, group=group)  # the group really communicates
        assert x.item() == sum(members)
        out[axis] = members
    out["mpu"] = (
        mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size(),
        mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size(),
        mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size(),
        mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size(),
    )
    assert dist.get_process_group_ranks(mpu.get_data_parallel_group()) == out["data"]
    assert dist.get_process_group_ranks(mpu.get_model_parallel_group()) == out["model"]
    assert dist.get_process_group_ranks(mpu.get_tensor_model_parallel_group()) == out["tensor"]
    return out


def test_world8_groups_match_deepspeed_topology():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)

    def by_rank(lists):
        return {r: lists_ for lists_ in lists for r in lists_}

    expected = {
        "tensor": by_rank(topo.get_axis_comm_lists("model")),
        "data": by_rank(topo.get_axis_comm_lists("data")),
        "pipeline": by_rank(topo.get_axis_comm_lists("pipe")),
        # model parallel = all ranks of one data replica
        "model": by_rank([sorted(topo.filter_match(data=d)) for d in range(2)]),
    }
    results = run_distributed_test(_check_groups, world_size=8, args=(expected,))
    for rank, out in enumerate(results):
        c = topo.get_coord(rank)
        assert out["mpu"] == (c.model, 2, c.data, 2, c.pipe, 2, c.pipe * 2 + c.model, 4)


def _check_context_groups() -> tuple:
    groups = build_process_groups(ParallelDims(tensor=2, pipeline=1, data=2, context=2))
    mpu = DeepSpeedMPU(groups)
    members = {name: dist.get_process_group_ranks(g) for name, g in
               [("context", groups.context), ("data", groups.data), ("data_context", groups.data_context),
                ("tensor", groups.tensor)]}
    for group in (groups.context, groups.data_context):
        x = torch.tensor([1.0])
        dist.all_reduce(x, group=group)  # the group really communicates
        assert x.item() == dist.get_world_size(group)
    sequence = (mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_world_size(),
                mpu.get_sequence_data_parallel_rank(), mpu.get_sequence_data_parallel_world_size(),
                mpu.get_data_parallel_world_size())
    assert dist.get_process_group_ranks(mpu.get_sequence_data_parallel_group()) == members["data_context"]
    return members, sequence


def test_context_groups_and_deepspeeds_sequence_data_parallel_view():
    results = run_distributed_test(_check_context_groups, world_size=8)
    for rank, (members, sequence) in enumerate(results):
        t, c, d = rank % 2, (rank // 2) % 2, rank // 4
        assert members["tensor"] == [rank - t, rank - t + 1]
        assert members["context"] == [d * 4 + t, d * 4 + 2 + t]
        assert members["data"] == [c * 2 + t, 4 + c * 2 + t]
        assert members["data_context"] == [t, 2 + t, 4 + t, 6 + t]
        # DeepSpeed sums over the sequence group and averages over data: its data size stays 2
        assert sequence == (c, 2, d * 2 + c, 4, 2)
