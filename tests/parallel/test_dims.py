import pytest

from megalm.errors import MegalmError
from megalm.parallel.dims import ParallelDims


def test_from_world_derives_data():
    assert ParallelDims.from_world(16, tensor=2, pipeline=4) == ParallelDims(tensor=2, pipeline=4, data=2)


def test_from_config_is_the_configs_mesh():
    from megalm.config import ParallelConfig

    assert ParallelDims.from_config(ParallelConfig(tensor=2, pipeline=2), 8) == ParallelDims(tensor=2, pipeline=2, data=2)
    with pytest.raises(MegalmError, match="= 4; launch a multiple of 4"):
        ParallelDims.from_config(ParallelConfig(tensor=2, pipeline=2), 6)


def test_message_shows_product():
    with pytest.raises(MegalmError, match=r"world size 6 is not divisible by tensor x pipeline = 2 x 2 = 4"):
        ParallelDims.from_world(6, tensor=2, pipeline=2)


def test_rejects_non_positive():
    with pytest.raises(ValueError, match="tensor"):
        ParallelDims(tensor=0, pipeline=1, data=1)


def test_coords_round_trip_and_layout():
    dims = ParallelDims(tensor=2, pipeline=2, data=2)
    for rank in range(8):
        assert dims.rank_of(*dims.coords(rank)) == rank
    assert dims.coords(5) == (1, 0, 0, 1)  # pipe 1, data 0, context 0, tensor 1: as DeepSpeed's ProcessCoord
    assert dims.tensor_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.data_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.pipeline_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.model_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]


@pytest.mark.parametrize("tp, pp, dp", [(1, 1, 4), (2, 1, 2), (4, 2, 1), (2, 2, 2), (1, 4, 2)])
def test_matches_deepspeed_topology(tp, pp, dp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    dims = ParallelDims(tensor=tp, pipeline=pp, data=dp)
    assert sorted(dims.tensor_groups()) == sorted(topo.get_axis_comm_lists("model"))
    assert sorted(dims.data_groups()) == sorted(topo.get_axis_comm_lists("data"))
    assert sorted(dims.pipeline_groups()) == sorted(topo.get_axis_comm_lists("pipe"))
    for rank in range(dims.world_size):
        c = topo.get_coord(rank)
        assert dims.coords(rank) == (c.pipe, c.data, 0, c.model)


def test_context_axis_sits_between_tensor_and_data():
    dims = ParallelDims.from_world(8, tensor=2, context=2)
    assert dims == ParallelDims(tensor=2, pipeline=1, data=2, context=2) and dims.zero_shards == 4
    assert dims.coords(6) == (0, 1, 1, 0)
    for rank in range(8):
        assert dims.rank_of(*dims.coords(rank)) == rank
    assert dims.tensor_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.context_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.data_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.data_context_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert dims.model_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(MegalmError, match="tensor x context x pipeline = 2 x 4 x 1 = 8"):
        ParallelDims.from_world(12, tensor=2, context=4)


def test_expert_groups_fold_into_data_x_context():
    # tensor 2 x context 2 x data 2, expert 2: ranks = ((data * 2) + context) * 2 + tensor; the expert
    # groups are consecutive data x context ranks of one tensor rank, the expert-data groups every other
    dims = ParallelDims(tensor=2, pipeline=1, data=2, context=2, expert=2)
    assert dims.data_context_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert dims.expert_groups() == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert dims.expert_data_groups() == [[0, 4], [2, 6], [1, 5], [3, 7]]
    assert [dims.expert_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [dims.expert_data_rank(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    for eg in dims.expert_groups():  # one rank of each expert group in every expert-data group
        assert all(len(set(eg) & set(edp)) <= 1 for edp in dims.expert_data_groups())
    with pytest.raises(MegalmError, match=r"parallel.expert \(4\) must divide data x context \(2 x 1 = 2\)"):
        ParallelDims(tensor=1, pipeline=1, data=2, expert=4)
