"""The data layer (docs/architecture.md §3.9): the shard format, readers and writers, and the dataset producers.

The trainer and evaluator use:

    ds = open_dataset(cfg.data.path)
    check_compatible(ds, cfg.task)
    train = TrainLoader(ds, "train", batch_size, seed, rank, world_size, num_workers, shuffle_buffer, pin_memory)
    state = train.state_dict(); train.load_state_dict(state)   # exact resume
    for batch in EvalLoader(ds, "eval", batch_size, rank, world_size, num_workers): ...

Batches are dicts: `cond` float16 [B, Nc, Dc], `target` float16 [B, Nt, Dt], `key` list[str],
`captions` list[list[str]] and, when the dataset has text, `text` float16 [B, K, Dg] (zero padded) and
`text_mask` bool [B, K]. `loader.stats()` counts good and skipped samples and shards, by reason. An int8
stream (quant.py) reads as float16 too, unless `ds.dequantize = "device"`: then `cond` is int8 with
`cond_scale` beside it, for `quant.to_device` to dequantise after the host-to-device copy.
"""

from .format import (
                     FORMAT_VERSION,
                     HEAD_FILE,
                     STATS_FILE,
                     DataError,
                     Dataset,
                     ShardInfo,
                     StreamSpec,
                     TextSpec,
                     check_compatible,
                     open_dataset,
)
from .head import HeadWeights, read_head, save_head
from .reader import EvalLoader, TrainLoader
from .stats import DatasetStats, read_stats, save_stats

__all__ = [
    "FORMAT_VERSION", "HEAD_FILE", "STATS_FILE", "DatasetStats", "read_stats", "save_stats",
    "DataError", "Dataset", "ShardInfo", "StreamSpec", "TextSpec", "check_compatible",
    "open_dataset", "HeadWeights", "read_head", "save_head", "EvalLoader", "TrainLoader",
]
