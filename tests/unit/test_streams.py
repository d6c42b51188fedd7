import numpy as np
import pytest

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



def test_rows_equal_row_by_row_slices(dataset):
    """The window read returns exactly what slicing row by row does, across shard boundaries,
    and refuses rows outside the rank's range."""
    from carousel.data.streams import TokenRange

    tr = TokenRange(dataset, "train", 0, 1001)
    rng = np.random.default_rng(0)
    for length in (1, 7, 65, 300):
        starts = [int(x) for x in rng.integers(0, 1001 - length + 1, size=40)]
        starts[:3] = [max(0, 299 - length // 2), min(300, 1001 - length), 0]  # straddling a boundary, at one, first
        expect = np.stack([tr.slice(s, s + length) for s in starts])
        got = tr.rows(starts, length)
        assert got.dtype == np.int64 and np.array_equal(got, expect)
    with pytest.raises(IndexError):
        tr.rows([1000], 2)
    part = TokenRange(dataset, "train", 250, 600)  # a range that starts and stops inside shards
    assert np.array_equal(part.rows([250, 590], 10), np.stack([part.slice(250, 260), part.slice(590, 600)]))
    for bad in ([249], [595]):
        with pytest.raises(IndexError):
            part.rows(bad, 10)
