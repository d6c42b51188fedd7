import numpy as np
import pytest
import torch

from carousel.data.shards import DataError
from carousel.data.streams import StreamLayout, StreamLoader
from test_shards import make_dataset


@pytest.fixture
def dataset(tmp_path):
    # 1001 tokens numbered 0..1000 over three uneven shards, so windows cross shard boundaries.
    tokens = list(range(1001))
    shards = [[tokens[0:300]], [tokens[300:301], tokens[301:700]], [tokens[700:]]]
    return make_dataset(tmp_path, {"train": shards})


def all_windows(loader):
    return [loader.next() for _ in range(len(loader))]


def test_ranks_are_disjoint_complete_and_equal(dataset):
    world, B, T = 3, 4, 10
    layout = StreamLayout(1001, world, B, T)
    seen, steps = [], []
    for rank in range(world):
        loader = StreamLoader(dataset, "train", rank, world, B, T)
        steps.append(len(loader))
        for x, y, _ in all_windows(loader):
            assert x.shape == (B, T)
            assert np.array_equal(y.numpy(), x.numpy() + 1)  # targets are the next tokens
            seen.extend(x.flatten().tolist())
    assert len(set(steps)) == 1 and steps[0] == layout.windows_per_epoch
    assert len(seen) == len(set(seen))  # disjoint
    # Complete: every stream covers its whole usable length; only the tail shorter than a window is left.
    assert len(seen) == layout.streams * layout.windows_per_epoch * T
    assert layout.stream_len - layout.windows_per_epoch * T < T


def test_streams_are_contiguous_across_windows(dataset):
    loader = StreamLoader(dataset, "train", 0, 1, 2, 7)
    (x0, _, f0), (x1, _, f1) = loader.next(), loader.next()
    assert f0 and not f1
    assert (x1[:, 0] == x0[:, -1] + 1).all()  # window k+1 continues window k


def test_resume_continues_at_the_same_window(dataset):
    a = StreamLoader(dataset, "train", 1, 2, 3, 8)
    for _ in range(len(a) + 2):  # into the second epoch
        a.next()
    state = a.state_dict()
    b = StreamLoader(dataset, "train", 1, 2, 3, 8)
    b.load_state_dict(state)
    for _ in range(5):
        xa, ya, fa = a.next()
        xb, yb, fb = b.next()
        assert fa == fb and (xa == xb).all() and (ya == yb).all()
    assert a.epoch == 1


def test_state_from_another_layout_is_refused(dataset):
    state = StreamLoader(dataset, "train", 0, 2, 4, 8).state_dict()
    with pytest.raises(DataError, match="worker count, batch_size or bptt changed"):
        StreamLoader(dataset, "train", 0, 2, 4, 16).load_state_dict(state)


def test_too_little_data_names_the_split(dataset):
    with pytest.raises(DataError, match="split 'train'.*too few"):
        StreamLoader(dataset, "train", 0, 8, 64, 64)


def test_rank_reads_only_its_shards(dataset):
    loader = StreamLoader(dataset, "train", 0, 4, 1, 10)
    assert len(loader.tokens._arrays) == 1  # rank 0's range [0, 251) lies in the first shard



def test_windows_equal_the_tokens_they_name_in_any_order(dataset):
    """Every window is exactly tokens [start + k*T, start + k*T + T] of its stream (the fixture's
    token values are their positions), whether windows are read in order, backwards or at random,
    with rows inside one shard, straddling a boundary, or at the rank range's edges."""
    rng = np.random.default_rng(0)
    for world, B, T in ((1, 1, 7), (1, 4, 10), (2, 3, 16), (3, 5, 9), (1, 16, 50)):
        for rank in range(world):
            loader = StreamLoader(dataset, "train", rank, world, B, T)
            starts = [loader.layout.stream_start(rank * B + b) for b in range(B)]
            order = [*range(len(loader)), *reversed(range(len(loader))), *rng.integers(0, len(loader), 20).tolist()]
            for k in order:
                x, y = loader.window(k)
                expect = np.stack([np.arange(s + k * T, s + k * T + T + 1) for s in starts])
                assert x.dtype == torch.int64 and np.array_equal(x.numpy(), expect[:, :-1])
                assert np.array_equal(y.numpy(), expect[:, 1:])


def test_strided_run_is_a_view_of_one_shard_and_refuses_outside_the_range(dataset):
    from carousel.data.streams import TokenRange

    tr = TokenRange(dataset, "train", 0, 1001)  # shards [0, 300), [300, 700), [700, 1001)
    first, stop, view = tr.strided_run(5, 10, 11, 3)  # window 3 = [35, 46), inside shard 0
    assert (first, stop) == (0, 29)  # window 28 = [285, 296) is the last one shard 0 holds whole
    assert np.array_equal(view[28 - first], np.arange(285, 296)) and not view.flags.writeable
    assert tr.strided_run(5, 10, 11, 29) is None  # [295, 306) straddles shards 0 and 1
    first, stop, view = tr.strided_run(5, 10, 11, 30)  # [305, 316): shard 1
    assert (first, stop) == (30, 69) and np.array_equal(view[0], np.arange(305, 316))
    assert np.array_equal(view[-1], np.arange(685, 696))
    part = TokenRange(dataset, "train", 250, 600)  # a range that starts and stops inside shards
    first, stop, view = part.strided_run(250, 10, 10, 0)
    assert (first, stop) == (0, 5) and np.array_equal(view[4], np.arange(290, 300))
    assert part.strided_run(250, 10, 10, 34)[:2] == (5, 35)  # shard 1 from [300, 310); [600, 610) leaves the range
    for a0, k in ((249, 0), (250, 35)):
        with pytest.raises(IndexError):
            part.strided_run(a0, 10, 11, k)
