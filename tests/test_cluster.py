"""Cluster operation (issue 17): srun tasks as ranks, logs a batch job can read, exit codes, run-folder
safety and start-up checks. Multi-process runs are CPU/gloo, as in test_train.py."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import ROOT, complete_checkpoints, env, losses, run_train, small_data, train_cmd  # noqa: F401

from blip3o_fast.errors import UserError
from blip3o_fast.runtime import exit_codes
from blip3o_fast.runtime.slurm import HostlistError, expand_hostlist, rank_env

# -- SLURM: hostlists and the rank mapping -------------------------------------------------------------


@pytest.mark.parametrize("hostlist, hosts", [
    ("node01", ["node01"]),
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("gpu[8-10],cpu3", ["gpu8", "gpu9", "gpu10", "cpu3"]),
    ("a[098-101,7]", ["a098", "a099", "a100", "a101", "a7"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("x-[1,3],y.z", ["x-1", "x-3", "y.z"]),
    ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["node[01-04", "node[a-b]", "node]1["])
def test_a_bad_hostlist_is_a_one_line_error(bad):
    with pytest.raises(HostlistError, match="set MASTER_ADDR"):
        expand_hostlist(bad)


SRUN = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node[07-08]",
        "SLURM_JOB_ID": "123456", "SLURM_TASKS_PER_NODE": "4(x2)"}


def test_an_srun_task_becomes_a_rank_of_one_job():
    assert rank_env(SRUN) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                              "MASTER_ADDR": "node07", "MASTER_PORT": str(10000 + 123456 % 20000)}
    # what the job script or a launcher already set wins
    assert rank_env({**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "29400"}).keys() == {
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
    assert rank_env({**SRUN, "RANK": "0"}) == {}  # torchrun inside the allocation
    assert rank_env({**SRUN, "BLIP3O_FAST_SLURM": "off"}) == {}
    assert rank_env({"SLURM_JOB_ID": "5"}) == {}  # an allocation, not a task
    assert rank_env({**SRUN, "SLURM_NTASKS": "1"}) == {"RANK": "3", "WORLD_SIZE": "1", "LOCAL_RANK": "1",
                                                      "LOCAL_WORLD_SIZE": "4"}
    with pytest.raises(UserError, match="set MASTER_PORT"):
        rank_env({k: v for k, v in SRUN.items() if k != "SLURM_JOB_ID"})


def srun_job(data: Path, run: Path, steps: int, *extra: str, tasks: int = 2, **popen) -> list[subprocess.Popen]:
    """The tasks `srun --ntasks N python -m blip3o_fast.cli train ...` starts: plain processes that only
    SLURM's variables tell apart."""
    job_id = str(random.randrange(10**6, 10**7))  # MASTER_PORT derives from it: another one per job
    return [subprocess.Popen(train_cmd(data, run, steps, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT, **popen,
                             env={**env(), "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_NTASKS": str(tasks),
                                  "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "127.0.0.[1-4]"})
            for r in range(tasks)]


def test_a_lone_task_of_a_multi_task_allocation_fails_in_bounded_time_with_one_line(small_data, tmp_path):  # noqa: F811
    """`python -m blip3o_fast.cli train` run directly in a batch script of --ntasks 2 is one task of two:
    it waits for the other only as long as the collective timeout, then says to put srun before it."""
    e = {**env(), "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "127.0.0.1",
         "SLURM_JOB_ID": str(random.randrange(10**6, 10**7)), "BLIP3O_FAST_COLLECTIVE_TIMEOUT_S": "3"}
    result = subprocess.run(train_cmd(small_data, tmp_path / "lone", 1), capture_output=True, text=True, cwd=ROOT,
                            env=e, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("blip3o-fast train: error: rank 0 of 2: the other ranks did not join within 3 s")
    assert "put srun before it, or set BLIP3O_FAST_SLURM=off" in last


@pytest.mark.slow
def test_an_srun_style_two_task_job_trains_as_torchrun_does(small_data, tmp_path):  # noqa: F811
    """Two plain `python -m blip3o_fast.cli train` processes with only SLURM's variables join one job
    and repeat a `torchrun --nproc_per_node 2` job's losses exactly."""
    ref = tmp_path / "torchrun"
    run_train(small_data, ref, 3, "train.ckpt_every=100", procs=2)
    run = tmp_path / "srun"
    procs = srun_job(small_data, run, 3, "train.ckpt_every=100")
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert losses(run) == losses(ref) and sorted(losses(run)) == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints" / "step-0000003").glob("rank-*.pt")) == \
        ["rank-00000.pt", "rank-00001.pt"]


# -- logs a batch job can read -----------------------------------------------------------------------

def test_without_a_terminal_rank_0_prints_plain_lines_and_logs_info_and_the_profile_is_written(small_data,  # noqa: F811
                                                                                                 tmp_path):
    """A run as in a batch job (stdout is a pipe), with the profiler window on steps [1, 2)."""
    import json

    run = tmp_path / "log"
    result = run_train(small_data, run, 3, "train.ckpt_every=2", "train.log_every=2", "train.profile=true",
                       "train.profile_steps=[1,2]")
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/3", "3/3"], result.stdout
    assert re.match(r"step 2/3  loss \d+\.\d{4}  lr \S+  samples/s \d+\.\d  data wait \d+%$", lines[0]), lines[0]
    # logging is configured at start: the checkpoint INFO lines reach the log, tagged with the rank
    assert re.search(r"rank 0 INFO blip3o_fast\.train: checkpoint \S+step-0000002 \(periodic\)", result.stderr), \
        result.stderr[-2000:]
    # the profile: a Chrome trace holding the fused ops, and the CPU memory timeline
    trace = json.loads((run / "profile" / "trace-rank0.json").read_text())
    assert any("blip3o_fast::" in e.get("name", "") for e in trace["traceEvents"])
    assert (run / "profile" / "memory-timeline-rank0.html").stat().st_size > 0
    assert "rank 0 INFO blip3o_fast.profile: profile of steps 2-2" in result.stderr


def test_warnings_of_other_ranks_carry_their_rank():
    code = ("from blip3o_fast.runtime.logs import configure_logging; import logging, warnings; configure_logging(); "
            "warnings.warn('disk nearly full'); logging.getLogger('blip3o_fast.x').info('rank 0 only')")
    for rank in ("1", "0"):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                                env={**env(), "RANK": rank}, timeout=120)
        assert result.returncode == 0, result.stderr
        assert re.search(rf"rank {rank} WARNING py\.warnings: .*disk nearly full", result.stderr), result.stderr
        assert ("rank 0 only" in result.stderr) == (rank == "0")


# -- exit codes --------------------------------------------------------------------------------------

def test_exit_codes_are_distinct_and_in_the_readme():
    codes = [code for code, _ in exit_codes.TABLE]
    assert len(set(codes)) == len(codes)
    assert {exit_codes.OK, exit_codes.CRASH, exit_codes.USER_ERROR, exit_codes.NONFINITE, exit_codes.STOPPED,
            exit_codes.INTERRUPTED} <= set(codes)
    readme = (ROOT / "README.md").read_text()
    for code, meaning in exit_codes.TABLE:
        assert f"| {code} | {meaning} |" in readme, f"README's exit-code table lacks {code}"


def test_a_crash_exits_1_with_its_traceback(monkeypatch, capsys):
    from blip3o_fast.cli import info, main

    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(info, "run", boom)
    assert main(["info"]) == exit_codes.CRASH
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug" in err


# -- run-folder safety ---------------------------------------------------------------------------------

def test_resume_auto_into_another_experiments_folder_is_refused(small_data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    run_train(small_data, run, 1)
    before = sorted(p.name for p in run.rglob("*"))
    result = run_train(small_data, run, 2, "model.hidden_size=64", "model.num_heads=4", "model.attention=math",
                       check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"blip3o-fast train: error: --resume auto: run folder {run} holds another experiment")
    assert "model.hidden_size (32 -> 64)" in last and "model.num_heads (2 -> 4)" in last
    assert "model.attention" not in last and "model.depth" not in last  # how to run it is not the experiment
    assert "--out NEW_FOLDER" in last and f"--resume {run / 'checkpoints' / 'step-0000001'}" in last
    assert sorted(p.name for p in run.rglob("*")) == before


def test_only_what_defines_the_experiment_is_compared():
    from blip3o_fast.runtime.checkpoint import differing_keys

    saved = {"data": {"path": "d", "batch_size": 8, "num_workers": 2, "pin_memory": True}, "train": {"lr": 1.0},
             "model": {"depth": 2, "fused_ops": True}, "task": {"name": "eva_to_clip"}}
    now = {"data": {"path": "d", "batch_size": 16, "num_workers": 0, "pin_memory": False}, "train": {"lr": 2.0},
           "model": {"depth": 2, "fused_ops": False}, "task": {"name": "clip_to_eva"}}
    assert differing_keys(saved, now) == ["task.name ('eva_to_clip' -> 'clip_to_eva')", "data.batch_size (8 -> 16)"]


# -- start-up checks -------------------------------------------------------------------------------------

def test_a_missing_eval_split_fails_at_start(small_data, tmp_path):  # noqa: F811
    run = tmp_path / "noeval"
    result = run_train(small_data, run, 5, "train.eval_every=4", "data.eval_split=heldout", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "train.eval_every=4 evaluates on split 'heldout'" in last and "train.eval_every=0" in last
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_a_missing_head_fails_at_start_when_recall_is_computed(small_data, tmp_path):  # noqa: F811
    from blip3o_fast.config import RunConfig
    from blip3o_fast.data import DataError, open_dataset
    from blip3o_fast.engine.preflight import check_eval_split

    copy = tmp_path / "data"
    shutil.copytree(small_data, copy)
    dataset = open_dataset(copy)
    cfg = RunConfig()
    cfg.task.target_dim, cfg.train.eval_every = dataset.target_dim, 100
    check_eval_split(cfg, dataset)  # with its head: fine
    (copy / "head.safetensors").unlink()
    with pytest.raises(DataError, match=r"computes Recall@K, which needs the target head .*head\.safetensors"):
        check_eval_split(cfg, open_dataset(copy))


def test_too_little_disk_for_a_checkpoint_fails_at_start(tmp_path):
    from blip3o_fast.engine.preflight import DiskSpaceError, check_disk_space

    class Usage:
        def __init__(self, free):
            self.free = free

    check_disk_space(tmp_path / "new" / "run", 10**6, usage=lambda p: Usage(10**9))
    with pytest.raises(DiskSpaceError, match=r"0\.01 GiB free .* needs about 1\.86 GiB"):
        check_disk_space(tmp_path / "new" / "run", 10**8, usage=lambda p: Usage(10**7))
    assert not (tmp_path / "new").exists()


def test_the_sbatch_example_runs_srun_and_requeues_on_the_stop_code():
    script = (ROOT / "docs" / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --nodes=" in script and "#SBATCH --requeue" in script
    assert re.search(r"^srun --kill-on-bad-exit=1 [^\n]*\\\n\s+python -m blip3o_fast\.cli train", script, re.M)
    assert f"-eq {exit_codes.STOPPED}" in script and "scontrol requeue" in script
    bash = shutil.which("bash")
    assert subprocess.run([bash, "-n", str(ROOT / "docs" / "slurm" / "train.sbatch")]).returncode == 0
    assert os.access(ROOT / "docs" / "slurm" / "train.sbatch", os.R_OK)


# -- your own DeepSpeed config; precision ----------------------------------------------------------------

def _cfg(**train):
    from blip3o_fast.config import RunConfig

    cfg = RunConfig()
    cfg.data.batch_size, cfg.train.grad_accum, cfg.model.hidden_size = 8, 2, 64
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _write(tmp_path, config: dict) -> str:
    import json

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_users_deepspeed_config_is_merged_with_auto_fields_and_clipping_stays_on(tmp_path, stage):
    from blip3o_fast.engine.ds_config import deepspeed_config

    user = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2,
            "bf16": {"enabled": "auto"}, "communication_data_type": "fp32",
            "zero_optimization": {"stage": "auto", "reduce_bucket_size": "auto",
                                  "offload_optimizer": {"device": "cpu"}},
            "flops_profiler": {"enabled": True, "profile_step": 3}}
    got = deepspeed_config(_cfg(zero_stage=stage, deepspeed_config=_write(tmp_path, user)), "bf16", world_size=4)
    assert got["train_batch_size"] == 64 and got["train_micro_batch_size_per_gpu"] == 8
    assert got["bf16"] == {"enabled": True} and got["fp16"]["enabled"] is False
    assert got["zero_optimization"]["stage"] == stage and got["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert got["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert got["communication_data_type"] == "fp32" and got["flops_profiler"]["profile_step"] == 3
    assert got["gradient_clipping"] == 1.0  # the JSON says nothing about clipping: ours, on for every stage
    assert deepspeed_config(_cfg(zero_stage=stage), "fp32")["gradient_clipping"] == 1.0


def test_a_users_deepspeed_config_that_disagrees_is_one_line(tmp_path):
    from blip3o_fast.config.schema import ConfigError
    from blip3o_fast.engine.ds_config import deepspeed_config

    path = _write(tmp_path, {"train_micro_batch_size_per_gpu": 16, "gradient_clipping": 0.0,
                             "fp16": {"enabled": True}, "zero_optimization": {"stage": 0}})
    with pytest.raises(ConfigError) as e:
        deepspeed_config(_cfg(deepspeed_config=path), "bf16")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path} disagrees with the run config:")
    assert "train_micro_batch_size_per_gpu=16 but data.batch_size gives 8" in message
    assert "gradient_clipping=0.0 but train.grad_clip gives 1.0" in message
    assert "fp16.enabled=true but train.precision gives false" in message
    assert "zero_optimization.stage" not in message  # it agrees
    with pytest.raises(ConfigError, match="remove 'optimizer'; the optimizer and its schedule come from train.lr"):
        deepspeed_config(_cfg(deepspeed_config=_write(tmp_path, {"optimizer": {"type": "Adam"}})), "fp32")
    with pytest.raises(ConfigError, match=r"no value for \"auto\" in zero_optimization\.sub_group_size"):
        deepspeed_config(_cfg(deepspeed_config=_write(tmp_path, {"zero_optimization": {"sub_group_size": "auto"}})),
                         "fp32")
    with pytest.raises(ConfigError, match="is not JSON"):
        (tmp_path / "bad.json").write_text("{")
        deepspeed_config(_cfg(deepspeed_config=str(tmp_path / "bad.json")), "fp32")


def test_training_with_a_users_deepspeed_config_and_its_errors(small_data, tmp_path):  # noqa: F811
    import json

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
                              "zero_optimization": {"stage": "auto", "reduce_bucket_size": "auto"},
                              "communication_data_type": "fp32"}))
    plain, own = tmp_path / "plain", tmp_path / "own"
    run_train(small_data, plain, 1)
    run_train(small_data, own, 1, "--deepspeed_config", str(ds))
    assert losses(own) == losses(plain)
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    result = run_train(small_data, tmp_path / "bad", 1, f"train.deepspeed_config={ds}", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"blip3o-fast train: error: {ds} disagrees with the run config: train_micro_batch_size_per_gpu=4 but "
        "data.batch_size gives 8; set those keys to \"auto\" or change the run config")


def test_precision_auto_picks_bf16_only_where_supported(monkeypatch):
    import torch

    from blip3o_fast.config.schema import ConfigError
    from blip3o_fast.engine.ds_config import generated
    from blip3o_fast.engine.model_engine import resolve_precision

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", gpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", gpu) == "fp16"  # a V100 or T4
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", gpu) == "fp16"
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    fp16 = generated(_cfg(), "fp16", 1)
    assert fp16["fp16"]["enabled"] is True and fp16["fp16"]["loss_scale"] == 0 and fp16["bf16"]["enabled"] is False


# -- W&B: one run across resumes -------------------------------------------------------------------------

def test_the_wandb_run_id_is_kept_in_the_run_folder_and_passed_on_resume(tmp_path, monkeypatch):
    """wandb is not a dependency: a stand-in module records what wandb.init is given (no network)."""
    import types

    from blip3o_fast.engine.metrics import MetricsLogger

    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or types.SimpleNamespace(finish=lambda: None,
                                                                                            log=lambda *a, **k: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    settings = dict(project="p", entity="team", name="base", group="ablation", tags=["a", "b"])
    for resume_step in (0, 5):  # the first job, then the resumed one
        logger = MetricsLogger(tmp_path, True, settings, {"x": 1}, resume_step=resume_step)
        logger.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{8}", run_id)
    assert [c["id"] for c in calls] == [run_id, run_id] and all(c["resume"] == "allow" for c in calls)
    assert {k: calls[1][k] for k in settings} == settings and calls[1]["dir"] == str(tmp_path)
    MetricsLogger(tmp_path / "other", True, settings).close()
    assert calls[2]["id"] != run_id  # another run folder, another W&B run


# -- fine-tune: weights only -------------------------------------------------------------------------------

def test_init_from_starts_from_the_weights_with_a_new_optimizer_at_step_0(small_data, tmp_path):  # noqa: F811
    source = tmp_path / "source"
    run_train(small_data, source, 2)
    tuned = tmp_path / "tuned"
    result = run_train(small_data, tuned, 1, f"train.init_from={source}")
    assert f"initialized from {source / 'checkpoints' / 'step-0000002' / 'ema.safetensors'}" in result.stdout
    assert "resumed from" not in result.stdout and sorted(losses(tuned)) == [1]
    # same seed, data and schedule as the source's first steps: only the starting weights differ
    assert losses(tuned)[1] != losses(source)[1]
    import json

    rows = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    first = [json.loads(line) for line in (source / "metrics.jsonl").read_text().splitlines()][0]
    assert rows[0]["lr"] == first["lr"]  # the warmup starts again: step 0 of a new schedule
    again = run_train(small_data, tuned, 2, f"train.init_from={source}")
    assert "resumed from" in again.stdout and "initialized from" not in again.stdout  # its own checkpoint wins


def test_init_from_a_model_of_another_shape_is_one_line(tmp_path):
    from safetensors.torch import save_file

    from blip3o_fast.config import RunConfig
    from blip3o_fast.engine.init_from import load_init_weights
    from blip3o_fast.model import DiT

    cfg = RunConfig()
    cfg.task.cond_dim, cfg.task.target_dim, cfg.task.grid = 16, 8, (2, 2)
    cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads = 32, 1, 2
    model = DiT(cfg.model, cfg.task)
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(export / "model.safetensors"))
    other = DiT(cfg.model, cfg.task)
    assert load_init_weights(other, export) == export / "model.safetensors"
    assert all(torch_equal(other.state_dict()[k], v) for k, v in model.state_dict().items())
    cfg.model.hidden_size = 64
    with pytest.raises(UserError, match=r"does not fit the configured model \(other shape: .*\(.*\) there"):
        load_init_weights(DiT(cfg.model, cfg.task), export)
    with pytest.raises(UserError, match="not an export folder"):
        load_init_weights(model, tmp_path)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


# -- a rank that dies ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_when_a_rank_dies_the_other_exits_in_bounded_time_and_the_job_resumes(small_data, tmp_path):  # noqa: F811
    import signal
    import time

    run = tmp_path / "death"
    procs = srun_job(small_data, run, 100000, "train.ckpt_every=2", "train.keep_last=100")
    try:
        deadline = time.time() + 300
        while not ((run / "checkpoints").is_dir() and complete_checkpoints(run) and len(losses(run)) >= 4):
            assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
            assert time.time() < deadline, "no training progress"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        out, err = procs[0].communicate(timeout=120)
        took = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == exit_codes.RANK_LOST, err[-3000:]
    assert took < 60, f"the surviving rank took {took:.0f} s to exit"
    assert "rank 0: another rank died or stopped answering" in err
    last = complete_checkpoints(run)[-1]
    resumed = srun_job(small_data, run, int(last.split("-")[1]) + 1, "train.ckpt_every=2", "train.keep_last=100")
    outs = [p.communicate(timeout=600) for p in resumed]
    assert [p.returncode for p in resumed] == [0, 0], outs[0][1][-3000:]
    assert f"resumed from {run / 'checkpoints' / last}" in outs[0][0]
