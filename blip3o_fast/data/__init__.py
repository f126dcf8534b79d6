"""The data layer (DESIGN §6): the shard format, readers and writers, and the dataset producers.

The trainer and evaluator use:

    ds = open_dataset(cfg.data.path)
    check_compatible(ds, cfg.task)
    train = train_loader(ds, "train", batch_size, seed, rank, world_size, num_workers, shuffle_buffer, pin_memory)
    state = train.state_dict(); train.load_state_dict(state)   # exact resume
    for batch in eval_loader(ds, "eval", batch_size, rank, world_size, num_workers): ...

Batches are dicts: `cond` float16 [B, Nc, Dc], `target` float16 [B, Nt, Dt], `key` list[str],
`captions` list[list[str]] and, when the dataset has text, `text` float16 [B, K, Dg] (zero padded) and
`text_mask` bool [B, K]. `loader.stats()` counts good and skipped samples and shards, by reason.
"""

from .format import (FORMAT_VERSION, DataError, Dataset, ShardInfo, StreamSpec, TextSpec, check_compatible,
                     open_dataset)
from .head import head_eps, load_head, load_head_metadata, save_head
from .reader import EvalLoader, TrainLoader, eval_loader, train_loader

__all__ = [
    "FORMAT_VERSION", "DataError", "Dataset", "ShardInfo", "StreamSpec", "TextSpec", "check_compatible",
    "open_dataset", "head_eps", "load_head", "load_head_metadata", "save_head", "EvalLoader", "TrainLoader",
    "eval_loader", "train_loader",
]
