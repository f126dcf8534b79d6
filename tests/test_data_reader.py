"""Readers: writer -> reader round trip, eval exactly-once in a stable order, disjoint training streams,
and the exact resume of a training stream from its state."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from test_data_format import sample_arrays, write_dataset

from blip3o_fast.data import EvalLoader, TrainLoader, open_dataset
from blip3o_fast.data.reader import stream_shards
from blip3o_fast.data.samples import BufferPool


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    keys = write_dataset(folder, {"train": 57, "eval": 23}, shard_size=10)
    return open_dataset(folder), keys


def _index(key: str) -> int:
    return int(key[1:])


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_round_trip_values_keys_dtypes(dataset, workers):
    ds, keys = dataset
    loader = EvalLoader(ds, "eval", batch_size=4, num_workers=workers)
    batches = list(loader)
    assert sorted(_keys(batches)) == keys["eval"]
    for b in batches:
        n = len(b["key"])
        assert b["cond"].dtype == torch.float16 and b["cond"].shape == (n, 4, 12)
        assert b["target"].dtype == torch.float16 and b["target"].shape == (n, 5, 8)
        assert b["text"].dtype == torch.float16 and b["text"].shape == (n, 3, 6) and b["text_mask"].dtype == torch.bool
        for j, key in enumerate(b["key"]):
            want = sample_arrays(_index(key))
            k = len(want["text"])
            assert np.array_equal(b["cond"][j].numpy(), want["cond"])
            assert np.array_equal(b["target"][j].numpy(), want["target"])
            assert np.array_equal(b["text"][j, :k].numpy(), want["text"]) and not b["text"][j, k:].any()
            assert b["text_mask"][j].tolist() == [True] * k + [False] * (3 - k)
            assert b["captions"][j] == want["captions"]
    assert loader.stats() == {"samples": 23, "skipped_samples": 0, "skipped_shards": 0, "reasons": {}, "examples": []}
    assert len(loader) == len(batches) and loader.num_samples == 23


def test_recycled_batches_hold_the_right_values(dataset):
    """A consumer that lets each batch go gets recycled arrays; every batch still holds its own samples."""
    ds, _ = dataset
    for b in EvalLoader(ds, "eval", batch_size=4, num_workers=0, pin_memory=False):
        for j, key in enumerate(b["key"]):
            assert np.array_equal(b["cond"][j].numpy(), sample_arrays(_index(key))["cond"])
        del b  # only the pool refers to the arrays now


def test_buffer_pool_reuses_only_released_arrays():
    pool = BufferPool(per_shape=2)
    first = torch.from_numpy(pool.get((3, 5), np.float16))
    view = first[1:]
    del first
    second = pool.get((3, 5), np.float16)  # `view` still holds the first array
    assert not np.shares_memory(second, view.numpy())
    ptr = view.data_ptr() - view.element_size() * 5
    del view
    again = pool.get((3, 5), np.float16)
    assert again.ctypes.data == ptr  # the first array, released, comes back
    assert pool.get((3, 5), np.float32).dtype == np.float32 and pool.get((2, 5), np.float16).shape == (2, 5)
    held = [pool.get((4,), np.float16) for _ in range(4)]  # beyond per_shape: plain new arrays, all distinct
    assert len({a.ctypes.data for a in held}) == 4


def test_eval_is_exactly_once_across_ranks_and_workers_in_a_stable_order(dataset):
    ds, keys = dataset
    for world, workers in [(1, 0), (2, 2), (3, 1), (4, 3)]:
        seen = []
        for rank in range(world):
            loader = EvalLoader(ds, "eval", batch_size=3, rank=rank, world_size=world, num_workers=workers)
            first = _keys(loader)
            assert first == _keys(loader), "a second pass reads the same order"
            assert len(first) == loader.num_samples
            seen += first
        assert sorted(seen) == keys["eval"] and len(seen) == len(set(seen)), (world, workers)


def test_stream_shard_assignment_is_disjoint_and_complete():
    for n_shards, n_streams in itertools.product([1, 2, 3, 7, 16], [1, 2, 3, 4, 8]):
        positions = set()
        for g in range(n_streams):
            for shard, stride, offset in stream_shards(n_shards, n_streams, g):
                mine = {(shard, p) for p in range(offset, 24, stride)}
                assert not positions & mine
                positions |= mine
        assert positions == {(s, p) for s in range(n_shards) for p in range(24)}


@pytest.mark.parametrize("world, workers", [(2, 0), (2, 2), (3, 1)])
def test_training_streams_are_disjoint_within_an_epoch(dataset, world, workers):
    ds, keys = dataset
    per_rank = {}
    for rank in range(world):
        loader = TrainLoader(ds, "train", batch_size=2, seed=3, rank=rank, world_size=world, num_workers=workers)
        # fewer samples than any stream holds in one epoch: no stream has wrapped around yet
        per_rank[rank] = _keys(itertools.islice(loader, 4))
        assert len(set(per_rank[rank])) == len(per_rank[rank])
    for a, b in itertools.combinations(per_rank.values(), 2):
        assert not set(a) & set(b)
    assert set().union(*per_rank.values()) <= set(keys["train"])


def test_training_stream_is_seeded_and_covers_each_epoch(dataset):
    ds, keys = dataset
    a = _keys(itertools.islice(TrainLoader(ds, "train", 3, seed=1), 19))  # 57 samples = one epoch
    b = _keys(itertools.islice(TrainLoader(ds, "train", 3, seed=1), 19))
    c = _keys(itertools.islice(TrainLoader(ds, "train", 3, seed=2), 19))
    assert a == b and a != c
    assert sorted(a) == keys["train"], "one epoch of one stream is every sample once"
    assert a != sorted(a), "shuffled"
    nxt = _keys(itertools.islice(TrainLoader(ds, "train", 3, seed=1), 38))[57:]
    assert sorted(nxt) == keys["train"] and nxt != a, "the next epoch is another permutation"


def _resume(ds, workers, consumed, more, batch_size=4, shuffle_buffer=25, through_json=True):
    make = lambda: TrainLoader(ds, "train", batch_size, seed=7, num_workers=workers, shuffle_buffer=shuffle_buffer)
    full = list(itertools.islice(make(), consumed + more))
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(consumed)]
    state = first.state_dict()
    del it
    if through_json:
        state = json.loads(json.dumps(state))
    second = make()
    second.load_state_dict(state)
    tail = list(itertools.islice(second, more))
    assert _keys(head) == _keys(full[:consumed])
    for got, want in zip(tail, full[consumed:], strict=True):
        assert got["key"] == want["key"]
        assert torch.equal(got["cond"], want["cond"]) and torch.equal(got["target"], want["target"])
        assert torch.equal(got["text"], want["text"]) and torch.equal(got["text_mask"], want["text_mask"])
    return first, second


@pytest.mark.parametrize("workers, consumed", [(0, 5), (0, 16), (2, 7), (3, 8)])
def test_resumed_stream_continues_exactly(dataset, workers, consumed):
    ds, _ = dataset
    # 57 samples per epoch at batch 4: 16 and more batches cross an epoch boundary
    first, second = _resume(ds, workers, consumed, more=9)
    assert second.batches == consumed + 9
    assert second.stats()["samples"] == (consumed + 9) * 4


def test_resume_without_shuffle_and_with_state_round_trips(dataset):
    ds, _ = dataset
    _resume(ds, 0, 6, 5, shuffle_buffer=0, through_json=False)


def test_changed_layout_warns_and_starts_fresh_streams(dataset):
    ds, _ = dataset
    loader = TrainLoader(ds, "train", 4, seed=7, num_workers=0)
    list(itertools.islice(loader, 20))  # past the first epoch
    state = loader.state_dict()
    other = TrainLoader(ds, "train", 4, seed=7, num_workers=2)
    with pytest.warns(UserWarning, match="layout changed.*streams 1 -> 2.*epoch 2"):
        other.load_state_dict(state)
    assert len(list(itertools.islice(other, 3))) == 3
    assert other.stats()["samples"] == 20 * 4 + 3 * 4


def _consume(ds, layout, batches, states=None):
    """Per stream of `layout` (world, workers): the keys of its share of `batches` batches per rank (after
    load_elastic(states); a rank's batches come from its streams in turn), and each rank's state after them."""
    world, workers = layout
    streams = max(1, workers)
    keys, out = [], []
    for rank in range(world):
        loader = TrainLoader(ds, "train", 2, seed=7, rank=rank, world_size=world, num_workers=workers,
                             shuffle_buffer=25)
        if states is not None:
            assert "sample(s) left in the current epoch" in loader.load_elastic(states)
        got = list(itertools.islice(loader, batches))
        keys += [_keys(got[w::streams]) for w in range(streams)]
        out.append(json.loads(json.dumps(loader.state_dict())))
    return keys, out


def _rest(seen: set, keys: list) -> list:
    """A new stream's keys up to the first one read before: the rest of the epoch it was handed."""
    out = []
    for key in keys:
        if key in seen or key in out:
            break
        out.append(key)
    return out


@pytest.mark.parametrize("old, new", [((2, 0), (1, 0)), ((1, 0), (2, 0)), ((2, 2), (3, 1)), ((1, 0), (4, 2))])
def test_elastic_resume_reads_the_rest_of_the_epoch_once(dataset, old, new):
    """Another world size or stream count (8 streams over 6 shards share shards): the samples read before
    and the rest of the epoch read after are the split, each once; then the next epoch starts."""
    ds, keys = dataset
    before, states = _consume(ds, old, 3)
    seen = [k for part in before for k in part]
    assert len(set(seen)) == len(seen) == 3 * 2 * old[0]
    after, _ = _consume(ds, new, 60, states)  # 120 samples a rank: past the rest of the epoch
    rest = [_rest(set(seen), part) for part in after]
    assert sorted(seen + [k for part in rest for k in part]) == keys["train"]
    assert all(len(part) < len(got) for part, got in zip(rest, after)), "each new stream went on to its next epoch"


def test_elastic_resume_of_an_elastic_resume(dataset):
    """Interrupted while reading the rest of an epoch (2 -> 3 ranks), then resumed on 1 rank."""
    ds, keys = dataset
    first, states = _consume(ds, (2, 0), 3)
    second, states = _consume(ds, (3, 0), 2, states)
    assert all(s.get("left") for s in states), "still in the rest of the epoch"
    third, _ = _consume(ds, (1, 0), 40, states)
    seen = [k for part in first + second for k in part]
    assert len(set(seen)) == len(seen) == 12 + 12
    assert sorted(seen + _rest(set(seen), third[0])) == keys["train"]


def test_same_layout_resume_inside_the_rest_of_an_epoch_is_exact(dataset):
    ds, _ = dataset
    _, states = _consume(ds, (2, 0), 3)
    straight, _ = _consume(ds, (1, 0), 9, states)
    head, mid = _consume(ds, (1, 0), 4, states)
    loader = TrainLoader(ds, "train", 2, seed=7, shuffle_buffer=25)
    loader.load_state_dict(mid[0])
    assert head[0] + _keys(itertools.islice(loader, 5)) == straight[0]


def test_loader_arguments_are_checked(dataset):
    ds, _ = dataset
    with pytest.raises(ValueError):
        TrainLoader(ds, "train", 4, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError):
        EvalLoader(ds, "eval", 0)
