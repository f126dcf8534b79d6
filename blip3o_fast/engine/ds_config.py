"""The DeepSpeed config of a run (docs/architecture.md §3.10): generated from ours, with a user's JSON
merged over it.

    deepspeed_config(cfg, precision, world_size) -> dict

`train.deepspeed_config=ds.json` (or `train --deepspeed_config ds.json`) brings DeepSpeed's own settings:
offload, bucket sizes, communication dtype, the flops profiler... Its keys win, except those our config
also sets (batch sizes, accumulation, clipping, precision, ZeRO stage): there the JSON says `"auto"` (filled
from our config, as Hugging Face's integration does), repeats our value, or is a one-line error naming both
keys. `"auto"` bucket sizes are derived from the model width, as Hugging Face does. The optimizer and the LR
schedule are ours (train.*): a JSON with `optimizer` or `scheduler` is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import RunConfig
from ..config.schema import ConfigError

AUTO = "auto"
# the JSON may not bring these: our AdamW and warmup + cosine are set per step from train.*
OURS_ONLY = {"optimizer": "train.lr, train.betas, train.weight_decay", "scheduler": "train.warmup_steps, train.min_lr"}


def generated(cfg: RunConfig, precision: str, world_size: int) -> dict:
    """Our DeepSpeed config. Clipping is on for every ZeRO stage (train.grad_clip, default 1.0)."""
    zero = {"stage": cfg.train.zero_stage}
    if cfg.train.zero_stage == 3:
        # gather parameters per use and keep no persistent full copies: ZeRO-3's point
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=int(1e9))
    return {
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # dynamic loss scaling (loss_scale 0): fp16 steps whose scaled gradients overflow are skipped, the scale halves
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


# the keys both configs set, with the name of ours in messages
SHARED = {
    ("train_batch_size",): "data.batch_size x train.grad_accum x ranks",
    ("train_micro_batch_size_per_gpu",): "data.batch_size",
    ("gradient_accumulation_steps",): "train.grad_accum",
    ("gradient_clipping",): "train.grad_clip",
    ("zero_optimization", "stage"): "train.zero_stage",
    ("bf16", "enabled"): "train.precision",
    ("fp16", "enabled"): "train.precision",
}


def deepspeed_config(cfg: RunConfig, precision: str, world_size: int = 1) -> dict:
    ours = generated(cfg, precision, world_size)
    if not cfg.train.deepspeed_config:
        return ours
    path = Path(cfg.train.deepspeed_config)
    user = read_user_config(path)
    for key, what in OURS_ONLY.items():
        if key in user:
            raise ConfigError(f"{path}: remove {key!r}; the optimizer and its schedule come from {what}")
    if "fp16" in user and "bf16" in user and _get(user, ("fp16", "enabled")) is True \
            and _get(user, ("bf16", "enabled")) is True:
        raise ConfigError(f"{path}: fp16.enabled and bf16.enabled are both true; enable one (train.precision)")
    disagree = []
    for keys, name in SHARED.items():
        value = _get(user, keys)
        if value is None or value == AUTO:
            continue
        mine = _get(ours, keys)
        if value != mine and not (isinstance(value, (int, float)) and isinstance(mine, (int, float))
                                  and float(value) == float(mine)):
            disagree.append(f"{'.'.join(keys)}={json.dumps(value)} but {name} gives {json.dumps(mine)}")
    if disagree:
        raise ConfigError(f"{path} disagrees with the run config: {'; '.join(disagree)}; set those keys to \"auto\" "
                          "or change the run config")
    merged = _merge(ours, user)
    for keys in SHARED:  # "auto" (or absent) means ours
        _set(merged, keys, _get(ours, keys))
    _fill_auto_buckets(merged, cfg.model.hidden_size)
    left = _auto_keys(merged)
    if left:
        raise ConfigError(f"{path}: no value for \"auto\" in {', '.join(left)}; give a number there")
    return merged


def read_user_config(path: Path) -> dict:
    try:
        user = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"train.deepspeed_config: cannot read {path} ({e.strerror}); pass a DeepSpeed JSON "
                          "config") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config: {path} is not JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"train.deepspeed_config: {path} must hold a JSON object")
    return user


def _fill_auto_buckets(config: dict, hidden: int) -> None:
    """Hugging Face's rules for "auto" ZeRO bucket sizes, from the model width H."""
    zero = config.get("zero_optimization", {})
    rules = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
             "stage3_param_persistence_threshold": 10 * hidden}
    for key, value in rules.items():
        if zero.get(key) == AUTO:
            zero[key] = value


def _auto_keys(config: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        if isinstance(value, dict):
            out += _auto_keys(value, f"{prefix}{key}.")
        elif value == AUTO:
            out.append(prefix + key)
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _get(config: dict, keys: tuple):
    for key in keys:
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def _set(config: dict, keys: tuple, value) -> None:
    for key in keys[:-1]:
        config = config.setdefault(key, {})
    config[keys[-1]] = value
