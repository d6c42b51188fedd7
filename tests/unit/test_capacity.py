"""Whether the workers fit a cluster is decided from its nodes alone: no Ray needed to check it."""

import pytest

from carousel.config import ScalingConfig
from carousel.train.capacity import ClusterTooSmall, shortfall, wait_for_capacity, workers_that_fit

HEAD_AND_TWO = [{"CPU": 0.0}, {"CPU": 1.0}, {"CPU": 1.0}]  # `carousel cluster up`: a 0-CPU head


def test_a_worker_takes_its_resources_from_one_node():
    assert workers_that_fit([{"CPU": 3.0}, {"CPU": 1.0}], {"CPU": 2.0}) == 1  # 4 CPUs in all, but split
    assert workers_that_fit([{"CPU": 8.0, "GPU": 1.0}], {"CPU": 1.0, "GPU": 1.0}) == 1
    assert workers_that_fit([{"CPU": 8.0}], {"CPU": 1.0, "GPU": 0.5}) == 0


def test_fitting_workers_pass_and_too_many_are_named_with_what_the_cluster_has():
    assert shortfall(HEAD_AND_TWO, ScalingConfig(num_workers=2)) is None
    msg = shortfall(HEAD_AND_TWO, ScalingConfig(num_workers=3))
    assert msg.startswith("scaling.num_workers: 3 workers x (1 CPU) do not fit this Ray cluster")
    assert "{CPU 0}, {CPU 1}, {CPU 1}, room for 2" in msg


def test_waiting_gives_nodes_time_to_join_then_gives_up_naming_the_timeout():
    joined = iter([HEAD_AND_TWO[:2], HEAD_AND_TWO[:2], HEAD_AND_TWO])
    wait_for_capacity(ScalingConfig(num_workers=2), 5, nodes=lambda: next(joined), poll_s=0)  # the third look fits
    with pytest.raises(ClusterTooSmall, match=r"room for 1\. .*\(waited 0.01 s: scaling.resources_timeout_s\)"):
        wait_for_capacity(ScalingConfig(num_workers=2), 0.01, nodes=lambda: HEAD_AND_TWO[:2], poll_s=0.005)
