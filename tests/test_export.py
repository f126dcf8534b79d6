"""Using a trained model (docs/architecture.md §3.13): `FeatureGenerator.from_pretrained` on run, checkpoint and
export folders, `blip3o-fast export` (files readable without blip3o-fast, the model card, raw weights, the Hub
upload up to the network), and one-line errors for folders that are not models."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import ROOT, env, run_train, small_data  # noqa: F401  (the session dataset fixture)

from blip3o_fast.errors import UserError

STEPS = 20


@pytest.fixture(scope="session")
def trained_run(small_data, tmp_path_factory) -> Path:  # noqa: F811
    """A 20-step tiny run with an evaluation at step 20 (so eval/ and loss.png exist) and checkpoints at 10, 20."""
    run = tmp_path_factory.mktemp("use") / "run"
    run_train(small_data, run, STEPS, "train.ckpt_every=10", "train.eval_every=20", "train.eval_samples=16",
              "eval.steps=2", "eval.batch_size=8")
    return run


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    result = cli("export", str(trained_run), "--out", str(out))
    assert f"to {out}" in result.stdout
    return out


def cli(*args: str, check: bool = True, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "blip3o_fast.cli", *args], capture_output=True, text=True,
                            env={**env(), **(extra_env or {})}, cwd=ROOT, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def conditions(gen, n: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, gen.task.cond_tokens, gen.task.cond_dim, generator=g)


def test_export_then_load_is_bit_identical_to_the_run(trained_run, exported, tmp_path):
    from blip3o_fast import FeatureGenerator

    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "eval.json", "head.safetensors",
                                                          "loss.png", "model.safetensors"]
    from_run = FeatureGenerator.from_pretrained(trained_run, device="cpu")
    from_ckpt = FeatureGenerator.from_pretrained(trained_run / "checkpoints" / "step-0000020", device="cpu")
    from_export = FeatureGenerator.from_pretrained(exported, device="cpu")
    cond = conditions(from_run)
    feats = from_run.generate(cond, steps=3, sampler="heun", seed=7)
    assert feats.dtype == torch.float32 and feats.shape == (5, from_run.task.target_tokens, from_run.task.target_dim)
    assert torch.equal(feats, from_ckpt.generate(cond, steps=3, sampler="heun", seed=7))
    assert torch.equal(feats, from_export.generate(cond, steps=3, sampler="heun", seed=7))
    emb = from_export.image_embedding(feats)
    assert torch.equal(emb, from_run.image_embedding(feats))
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5))
    # save_pretrained of a loaded export writes the same folder again
    again = from_export.save_pretrained(tmp_path / "again")
    for name in ("model.safetensors", "config.json", "head.safetensors", "eval.json", "loss.png", "README.md"):
        assert (again / name).read_bytes() == (exported / name).read_bytes(), name


def test_exported_files_open_with_plain_safetensors_and_json(trained_run, small_data, exported):  # noqa: F811
    from blip3o_fast.config import ModelConfig, TaskConfig
    from blip3o_fast.model import DiT

    config = json.loads((exported / "config.json").read_text())
    assert config["format"] == "blip3o-fast" and config["format_version"] == 1
    model = DiT(ModelConfig(**config["model"]), TaskConfig(**config["task"]))
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict(tensors, strict=True)
    ema = load_file(str(trained_run / "checkpoints" / "step-0000020" / "ema.safetensors"))
    assert tensors.keys() == ema.keys() and all(torch.equal(tensors[k], ema[k]) for k in ema)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert config["parameters"] == model.num_parameters()
    manifest_sha = hashlib.sha256((small_data / "manifest.json").read_bytes()).hexdigest()
    assert config["training"] == {"weights": "ema", "step": STEPS, "data_path": str(small_data),
                                  "data_manifest_sha256": manifest_sha,
                                  "source": str(trained_run / "checkpoints" / "step-0000020")}
    with safe_open(str(exported / "head.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"post_layernorm.weight", "post_layernorm.bias", "visual_projection.weight"}
    newest = sorted((trained_run / "eval").glob("*.json"))[-1]
    assert (exported / "eval.json").read_bytes() == newest.read_bytes()
    card = (exported / "README.md").read_text()
    report = json.loads(newest.read_text())
    patch = report["metrics"]["patch_cosine"]
    for text in ("eva_to_clip", f"{model.num_parameters():,}", f"| training steps | {STEPS} |", manifest_sha,
                 "![training loss](loss.png)", "| metric | model | oracle | dataset_mean | chance |",
                 f"| patch_cosine | {patch['model']:.4f} | {patch['oracle']:.4f} | {patch['dataset_mean']:.4f} |"):
        assert text in card, text


def test_raw_weights_come_from_deepspeeds_model_states(trained_run, tmp_path):
    from blip3o_fast import FeatureGenerator

    ckpt = trained_run / "checkpoints" / "step-0000020"
    raw = FeatureGenerator.from_pretrained(ckpt, device="cpu", weights="raw")
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert all(torch.equal(raw.state[k], module[k].float()) for k in module)
    ema = FeatureGenerator.from_pretrained(ckpt, device="cpu")
    assert not all(torch.equal(raw.state[k], ema.state[k]) for k in module), "raw and EMA weights should differ"
    out = tmp_path / "raw"
    cli("export", str(trained_run), "--out", str(out), "--weights", "raw")
    assert json.loads((out / "config.json").read_text())["training"]["weights"] == "raw"
    cond = conditions(raw, 2)
    assert torch.equal(FeatureGenerator.from_pretrained(out, device="cpu").generate(cond, steps=2),
                       raw.generate(cond, steps=2))
    with pytest.raises(UserError, match="holds the raw weights only"):
        FeatureGenerator.from_pretrained(out, weights="ema")
    # ZeRO-3 partitions the raw weights across ranks: a one-line refusal
    zero3 = tmp_path / "zero3"
    shutil.copytree(ckpt, zero3)
    cfg = yaml.safe_load((zero3 / "config.yaml").read_text())
    cfg["train"]["zero_stage"] = 3
    (zero3 / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="ZeRO-3"):
        FeatureGenerator.from_pretrained(zero3, weights="raw")


def test_folders_that_are_not_models_are_one_line_errors(trained_run, exported, tmp_path):
    from blip3o_fast import FeatureGenerator

    def fails(path, match, **kw):
        with pytest.raises(UserError, match=match) as e:
            FeatureGenerator.from_pretrained(path, device="cpu", **kw)
        assert "\n" not in str(e.value)

    fails(tmp_path / "nothing", "does not exist")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "is not a model folder")
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    data = (exported / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:len(data) // 2])
    fails(broken, r"model.safetensors is not a readable safetensors file .*truncated or corrupt")
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    fails(broken, "model.safetensors is not a readable safetensors file")
    (broken / "model.safetensors").unlink()
    fails(broken, "has no model.safetensors")
    shutil.copyfile(exported / "model.safetensors", broken / "model.safetensors")
    (broken / "config.json").unlink()
    fails(broken, "has model.safetensors but no config.json")
    (broken / "config.json").write_text("{not json")
    fails(broken, "config.json is not valid JSON")
    (broken / "config.json").write_text('{"format": "other"}')
    fails(broken, "is not a blip3o-fast export config")
    head = tmp_path / "head"
    shutil.copytree(exported, head)
    (head / "head.safetensors").write_bytes(b"garbage")
    fails(head, "head.safetensors is not a readable safetensors file")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(trained_run / "checkpoints" / "step-0000020", incomplete)
    (incomplete / "COMPLETE").unlink()
    fails(incomplete, "not a complete checkpoint")
    fails(exported, "weights must be ema or raw", weights="best")
    result = cli("export", str(tmp_path / "empty"), "--out", str(tmp_path / "x"), check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "is not a model folder" in result.stderr


def test_push_to_hub_uploads_the_export_folder(trained_run, tmp_path, monkeypatch, capsys):
    hub = pytest.importorskip("huggingface_hub")  # the `hub` extra; transformers brings it along
    from blip3o_fast.cli.main import main

    calls = []
    monkeypatch.setattr(hub.HfApi, "create_repo", lambda self, **kw: calls.append(("create_repo", kw)))
    monkeypatch.setattr(hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload_folder", kw)))
    out = tmp_path / "hub"
    assert main(["export", str(trained_run), "--out", str(out), "--push-to-hub", "me/blip3o-tiny"]) == 0
    assert calls == [
        ("create_repo", {"repo_id": "me/blip3o-tiny", "repo_type": "model", "private": False, "exist_ok": True}),
        ("upload_folder", {"folder_path": str(out), "repo_id": "me/blip3o-tiny", "repo_type": "model",
                           "commit_message": "Upload blip3o-fast model"})]
    assert "https://huggingface.co/me/blip3o-tiny" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if the extra were not installed
    assert main(["export", str(trained_run), "--out", str(out), "--push-to-hub", "me/x"]) == 2
    assert "needs huggingface_hub" in capsys.readouterr().err


def test_import_stays_cheap_and_feature_generator_loads_lazily():
    code = ("import sys, blip3o_fast; assert 'torch' not in sys.modules, 'import blip3o_fast pulled in torch'; "
            "from blip3o_fast import FeatureGenerator; assert FeatureGenerator.__name__ == 'FeatureGenerator'; "
            "assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env=env(), cwd=ROOT, timeout=300)
    import blip3o_fast

    with pytest.raises(AttributeError):
        blip3o_fast.NoSuchThing  # noqa: B018
