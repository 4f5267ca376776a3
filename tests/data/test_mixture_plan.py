"""megalm.data.mixture's plan: phases from the config and the checkpoint, the line a change says."""

from __future__ import annotations

import numpy as np
import pytest

from megalm.config import load_config
from megalm.data.blend import Phase, build_blend_index, build_phased_index
from megalm.data.mixture import MixturePlan, ResumedData, plan_mixture
from megalm.testing.runs import TINY


def config(*overrides: str):
    return load_config(TINY, ["train.global_batch_size=4", "train.micro_batch_size=4", *overrides]).validate(1)


def test_one_phase_is_the_plain_blend_and_phases_continue_each_source():
    plain = build_blend_index([3, 1], 100)
    one = build_phased_index([Phase(0, (3.0, 1.0))], 100)
    assert all(np.array_equal(plain[k], one[k]) for k in plain)
    two = build_phased_index([Phase(0, (1.0, 1.0, 0.0)), Phase(40, (0.0, 1.0, 3.0))], 100)
    for k in range(3):  # every source's samples 0, 1, 2, ... in the order drawn: none repeated or skipped
        got = two["dataset_sample_index"][two["dataset_index"] == k]
        assert np.array_equal(got, np.arange(len(got)))
    assert np.bincount(two["dataset_index"][40:], minlength=3).tolist() == [0, 15, 45]
    with pytest.raises(Exception, match="must start at sample 0"):
        build_phased_index([Phase(5, (1.0,))], 10)


def test_a_resume_keeps_the_past_phases_and_says_what_changed():
    first = config("data.train_prefixes=[[0.5,web],[0.5,books]]")
    plan, change = plan_mixture(first, {})
    assert plan == MixturePlan(("web", "books"), (Phase(0, (0.5, 0.5)),)) and change is None
    # resumed at step 6 without web, with code added: web removed, code new, books continues
    state = {"mixture": plan.to_dict(), "positions": {"web": 12, "books": 12}}
    later = config("data.train_prefixes=[[0.25,books],[0.75,code]]")
    plan, change = plan_mixture(later, {}, ResumedData(6, 24, state))
    assert plan.sources == ("web", "books", "code")
    assert plan.phases == (Phase(0, (0.5, 0.5, 0.0)), Phase(24, (0.0, 0.25, 0.75)))
    assert change == ("data mixture changed at step 6 (sample 24): web 0.5 -> removed, books 0.5 -> 0.25, code new -> "
                      "0.75; each source continues from its own position (books at its sample 12, code at its sample 0)")
    # the same config resumed again later: the same plan, nothing said
    again, said = plan_mixture(later, {}, ResumedData(8, 32, {"mixture": plan.to_dict()}))
    assert again == plan and said is None


def test_a_schedule_starts_its_phases_at_their_steps():
    cfg = config("data.train_prefixes=[[0.5,web],[0.5,books]]", "data.mixture_schedule=[[90,[[1,books]]]]",
                 "train.steps=100")
    plan, _ = plan_mixture(cfg, {})
    assert plan.phases == (Phase(0, (0.5, 0.5)), Phase(360, (0.0, 1.0)))
    assert plan.weights_at(359) == {"web": 0.5, "books": 0.5} and plan.weights_at(360) == {"books": 1.0}
    # resumed at step 50 with a global batch of 8 instead of 4: the schedule's step 90 is 40 steps of 8 later
    resumed, _ = plan_mixture(config("data.train_prefixes=[[0.5,web],[0.5,books]]", "train.steps=100",
                                     "data.mixture_schedule=[[90,[[1,books]]]]", "train.global_batch_size=8"),
                              {}, ResumedData(50, 200, {"mixture": plan.to_dict()}))
    assert resumed.phases == (Phase(0, (0.5, 0.5)), Phase(520, (0.0, 1.0)))


def test_bad_schedules_are_one_line():
    from megalm.errors import MegalmError

    for bad in ("[[0,[[1,a]]]]", "[[5,[[1,a]]],[5,[[1,b]]]]", "[[5,[[0,a]]]]", "[[5,[a]]]"):
        with pytest.raises(MegalmError, match=r"data.mixture_schedule\[\d\] must be \[step, \[\[weight, prefix\]"):
            config(f"data.mixture_schedule={bad}")


def _fingerprint_rank(prefixes: list[str]) -> tuple[dict, list[str], str]:
    import megalm.data.mixture as mixture
    from megalm.errors import MegalmError

    read, plain = [], mixture.fingerprint
    mixture.fingerprint = lambda p: read.append(p) or plain(p)
    try:
        found = mixture.shared_fingerprints(prefixes)
        first = list(read)
        try:
            mixture.shared_fingerprints([*prefixes, prefixes[0] + "-missing"])
            missing = ""
        except MegalmError as e:
            missing = str(e)
    finally:
        mixture.fingerprint = plain
    return found, first, missing


def test_fingerprints_are_dealt_over_the_ranks_and_shared(tmp_path):
    # three sources on two ranks: each hashed once in all (not once per rank), every rank gets all three;
    # a source one rank cannot read is the same line on both
    from megalm.data.mixture import fingerprint
    from megalm.testing.distributed import run_distributed_test

    prefixes = []
    for k in range(3):
        (tmp_path / f"s{k}.idx").write_bytes(bytes([k]) * 100)
        (tmp_path / f"s{k}.bin").write_bytes(bytes([k + 1]) * (1 << 20))
        prefixes.append(str(tmp_path / f"s{k}"))
    ranks = run_distributed_test(_fingerprint_rank, 2, args=(prefixes,))
    expected = {p: fingerprint(p) for p in prefixes}
    assert all(found == expected for found, _, _ in ranks)
    assert sorted(p for _, read, _ in ranks for p in read) == sorted(prefixes), [read for _, read, _ in ranks]
    assert ranks[0][2] == ranks[1][2] and "s0-missing" in ranks[0][2] and "cannot fingerprint" in ranks[0][2]
