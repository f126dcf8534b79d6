"""What a run will need, checked before its first step (docs/architecture.md §4.4): a run that would
fail hours in (at its first evaluation, its first checkpoint) fails now, with one line.

    check_eval_split(cfg, dataset)         # when train.eval_every > 0
    check_disk_space(run_dir, n_params)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..config import RunConfig
from ..data import HEAD_FILE, DataError, Dataset, read_head
from ..errors import UserError

# bytes per parameter of one checkpoint: module weights (fp32), AdamW's two moments, the fp32 EMA, and
# (bf16/fp16) the fp32 master copy; DeepSpeed's files and our small ones add little beyond it
CHECKPOINT_BYTES_PER_PARAM = 20


class DiskSpaceError(UserError):
    """Not enough free space in the run folder's filesystem for a checkpoint."""


def check_eval_split(cfg: RunConfig, dataset: Dataset) -> None:
    """train.eval_every > 0 reads data.eval_split, and Recall@K (a dataset with captions) needs the head."""
    split, every = cfg.data.eval_split, cfg.train.eval_every
    if split not in dataset.split_names() or dataset.split_samples(split) == 0:
        raise DataError(f"train.eval_every={every} evaluates on split {split!r}, which dataset {dataset.path} does not "
                        f"have (it has: {', '.join(dataset.split_names()) or 'none'}); set data.eval_split to one "
                        "of them, or train.eval_every=0")
    if dataset.text is None:
        return
    head = read_head(dataset.path, cfg.task.target_dim)
    if head is None and (dataset.manifest.get("head") or dataset.text_dim != cfg.task.target_dim):
        file = dataset.path / (dataset.manifest.get("head") or HEAD_FILE)
        raise DataError(f"train.eval_every={every}: the split {split!r} has captions, so evaluation computes "
                        f"Recall@K, which needs the target head {file} (missing); restore it (blip3o-fast extract "
                        "writes it), or set train.eval_every=0")


def check_disk_space(run_dir: Path, n_params: int, usage=shutil.disk_usage) -> None:
    """One checkpoint must fit: older ones are pruned only after a newer one is complete."""
    folder = Path(run_dir).resolve()
    while not folder.exists():  # the run folder may not exist yet: its filesystem is its nearest ancestor's
        folder = folder.parent
    free = usage(folder).free
    need = n_params * CHECKPOINT_BYTES_PER_PARAM
    if free < need:
        raise DiskSpaceError(f"run folder {run_dir}: {free / 2**30:.2f} GiB free on its filesystem, a checkpoint "
                             f"of this model needs about {need / 2**30:.2f} GiB; free space or pass --out on a larger "
                             "disk")
