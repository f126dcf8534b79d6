"""`extract` end to end with small randomly initialised `transformers` models and generated images:
shapes, the CLIP head and text tower, skipped damaged images, resume, and failures at start."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds

from blip3o_fast.cli import main
from blip3o_fast.data import EvalLoader, open_dataset, read_head, read_stats

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table, which CLIP's byte-level BPE vocabulary is made of."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def make_tiny_clip(folder, image_size=32, patch_size=8, hidden=32, projection=16, seed=0) -> str:
    """A random CLIPModel with image processor and a byte-level tokenizer (no merges), saved to folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=24, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden,
                           intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=projection)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")).save_pretrained(folder)
    return str(folder)


def make_tiny_vit(folder, image_size=32, patch_size=8, hidden=48) -> str:
    """A random ViT (loaded through AutoModel, like EVA-CLIP) with CLS + patch tokens."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    ViTModel(ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2), add_pooling_layer=False).save_pretrained(folder)
    return str(folder)


def make_image_tars(folder, shards=2, per_shard=5, broken=("0001_0002",)) -> list[str]:
    """WebDataset image shards: png/jpg + txt captions; keys in `broken` get undecodable image bytes."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for s in range(shards):
        name = os.path.join(folder, f"{s:05d}.tar")
        with wds.TarWriter(name, encoder=False) as w:
            for i in range(per_shard):
                key = f"{s:04d}_{i:04d}"
                img = Image.fromarray(rng.integers(0, 255, (40 + i, 36, 3), dtype=np.uint8))
                buf = io.BytesIO()
                ext = "png" if i % 2 else "jpg"
                img.save(buf, format="PNG" if ext == "png" else "JPEG")
                data = b"not an image" if key in broken else buf.getvalue()
                w.write({"__key__": key, ext: data, "txt": f"a picture number {s} {i}".encode()})
        names.append(name)
    return names


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"clip": make_tiny_clip(root / "clip"), "vit": make_tiny_vit(root / "vit"),
            "vit16": make_tiny_vit(root / "vit16", patch_size=16), "images": make_image_tars(root / "images")}


def _extract(models, out, *extra) -> int:
    return main(["extract", "--images", os.path.join(os.path.dirname(models["images"][0]), "{00000..00001}.tar"),
                 "--target-model", models["clip"], "--cond-model", models["vit"], "--out", str(out),
                 "--batch-size", "3", "--workers", "0", "--quiet", "--shard-size", "3", *extra])


def test_extract_end_to_end(models, tmp_path, capsys):
    from transformers import AutoTokenizer, CLIPModel, CLIPVisionModel, ViTModel

    assert _extract(models, tmp_path, "--target-cls") == 0
    ds = open_dataset(tmp_path)
    assert (ds.grid, ds.target_tokens, ds.target_dim, ds.target_cls) == ((4, 4), 17, 32, True)
    assert (ds.cond_tokens, ds.cond_dim, ds.cond_cls, ds.text_dim) == (16, 48, False, 16)
    assert ds.split_samples("train") == 9 and "1 skipped" in capsys.readouterr().out
    assert ds.manifest["streams"]["cond"]["model"] == models["vit"]
    stats = read_stats(tmp_path, ds.cond_dim, ds.target_dim)  # the train split's, from one reading pass
    assert stats.samples == 9 and stats.target_std.shape == (32,) and bool((stats.cond_std > 0).all())
    clip = CLIPModel.from_pretrained(models["clip"]).eval()
    head = read_head(tmp_path).tensors
    assert torch.equal(head["visual_projection.weight"], clip.visual_projection.weight.detach())
    assert torch.equal(head["post_layernorm.bias"], clip.vision_model.post_layernorm.bias.detach())

    batch = next(iter(EvalLoader(ds, "train", 16)))
    assert "0001_0002" not in batch["key"] and len(batch["key"]) == 9
    # recompute one sample with the models: the shards hold their tokens, CLS kept for the target only
    from PIL import Image
    from transformers import AutoImageProcessor

    j = batch["key"].index("0000_0003")
    tar = dict((s["__key__"], s) for s in wds.tarfile_samples([{"url": models["images"][0]}]))["0000_0003"]
    image = Image.open(io.BytesIO(tar["png"])).convert("RGB")
    pixels = AutoImageProcessor.from_pretrained(models["clip"])(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want_target = CLIPVisionModel.from_pretrained(models["clip"])(pixel_values=pixels).last_hidden_state[0]
        want_cond = ViTModel.from_pretrained(models["vit"])(pixel_values=pixels).last_hidden_state[0, 1:]
        tok = AutoTokenizer.from_pretrained(models["clip"])(["a picture number 0 3"], return_tensors="pt")
        want_text = clip.get_text_features(**tok)
        want_text = want_text if isinstance(want_text, torch.Tensor) else want_text.pooler_output
    torch.testing.assert_close(batch["target"][j].float(), want_target, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(batch["cond"][j].float(), want_cond, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(batch["text"][j, :1].float(), want_text, atol=2e-3, rtol=2e-3)
    assert batch["captions"][j] == ["a picture number 0 3"] and batch["text_mask"][j].tolist() == [True] + [False] * 4

    # a rerun skips the finished input shards and leaves the shards as they were
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    assert _extract(models, tmp_path, "--target-cls") == 0
    assert "2 of 2 input shards already finished" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")} == before


def test_extract_writes_int8_storage(models, tmp_path, capsys):
    assert _extract(models, tmp_path / "f16") == 0 and _extract(models, tmp_path / "int8", "--storage", "int8") == 0
    f16, int8 = open_dataset(tmp_path / "f16"), open_dataset(tmp_path / "int8")
    assert int8.cond.int8 and int8.cond.scale == "channel" and not int8.target.int8 and not f16.cond.int8
    a, b = (next(iter(EvalLoader(ds, "train", 16))) for ds in (f16, int8))
    assert a["key"] == b["key"] and torch.equal(a["target"], b["target"])
    err = (a["cond"].float() - b["cond"].float()).norm() / a["cond"].float().norm()
    assert 0 < err < 0.01
    # one storage per stream: adding to the folder with another storage is refused before any work
    before = sorted(p.name for p in (tmp_path / "int8").rglob("*"))
    more = make_image_tars(tmp_path / "more", shards=1, broken=())
    assert main(["extract", "--images", more[0], "--split", "more",
                 "--target-model", models["clip"], "--cond-model", models["vit"], "--out", str(tmp_path / "int8"),
                 "--workers", "0", "--quiet"]) == 2
    assert "--storage" in capsys.readouterr().err and sorted(p.name for p in (tmp_path / "int8").rglob("*")) == before


def test_mismatched_encoders_fail_at_start(models, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["extract", "--images", os.path.dirname(models["images"][0]), "--target-model", models["clip"],
                 "--cond-model", models["vit16"], "--out", str(out), "--workers", "0", "--quiet"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("blip3o-fast extract: error: --target-model gives a 4x4 patch grid but --cond-model 2x2")
    assert not out.exists() or not list(out.iterdir())
    assert main(["extract", "--images", os.path.dirname(models["images"][0]), "--target-model", models["clip"],
                 "--cond-model", models["vit"], "--out", str(out), "--cond-cls", "--workers", "0", "--quiet"]) == 0
    # the same folder with encoders of other dims: refused before any work
    other = make_tiny_clip(tmp_path / "clip64", hidden=64)
    assert main(["extract", "--images", os.path.dirname(models["images"][0]), "--target-model", other,
                 "--cond-model", models["vit"], "--out", str(out), "--workers", "0", "--quiet"]) == 2
    assert "holds a dataset with cond 17x48, target 16x32 but these encoders give" in capsys.readouterr().err
    assert main(["extract", "--images", str(tmp_path / "none" / "{0..1}.tar"), "--target-model", models["clip"],
                 "--cond-model", models["vit"], "--out", str(out)]) == 2
    assert "image shards do not exist" in capsys.readouterr().err
    assert main(["extract", "--images", os.path.dirname(models["images"][0]), "--target-model", str(tmp_path / "x"),
                 "--cond-model", models["vit"], "--out", str(out)]) == 2
    assert "cannot load model config" in capsys.readouterr().err


@pytest.mark.slow
def test_extract_on_two_ranks(models, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "blip3o_fast.cli", "extract", "--images", os.path.dirname(models["images"][0]),
           "--target-model", models["clip"], "--cond-model", models["vit"], "--out", str(tmp_path),
           "--workers", "1", "--quiet", "--split", "eval"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = open_dataset(tmp_path)
    files = [s.file for s in ds.shards("eval")]  # named by source: <split>-<file name>_<hash of the source>-NNNNNN
    assert [f.split("_")[0] for f in files] == ["eval-00000", "eval-00001"] and ds.split_samples("eval") == 9
    assert all(f.endswith("-000000.tar") for f in files)
    keys = [k for b in EvalLoader(ds, "eval", 4) for k in b["key"]]
    assert sorted(keys) == sorted(f"{s:04d}_{i:04d}" for s in range(2) for i in range(5) if (s, i) != (1, 2))


def test_extraction_is_keyed_by_source_and_reads_pipes(models, tmp_path, capsys):
    """Tars 0 today and 1 tomorrow (through `pipe:`, as webdataset opens remote shards) make one dataset; a rerun
    of either skips it."""
    folder = os.path.dirname(models["images"][0])
    common = ["--target-model", models["clip"], "--cond-model", models["vit"], "--out", str(tmp_path), "--workers",
              "0", "--quiet"]
    assert main(["extract", "--images", os.path.join(folder, "{00000..00000}.tar"), *common]) == 0
    assert open_dataset(tmp_path).split_samples("train") == 5
    assert main(["extract", "--images", f"pipe:cat {folder}/{{00001..00001}}.tar", *common]) == 0
    ds = open_dataset(tmp_path)
    assert ds.split_samples("train") == 9 and len({s.file for s in ds.shards("train")}) == 2
    keys = sorted(k for b in EvalLoader(ds, "train", 16) for k in b["key"])
    assert keys == sorted(f"{s:04d}_{i:04d}" for s in range(2) for i in range(5) if (s, i) != (1, 2))
    capsys.readouterr()
    assert main(["extract", "--images", f"pipe:cat {folder}/00001.tar", *common]) == 0
    assert "1 of 1 input shards already finished" in capsys.readouterr().out
    assert main(["extract", "--images", os.path.join(folder, "00000.tar"), *common, "--eval-fraction", "0.5"]) == 2
    assert "was extracted into split 'train' with --eval-fraction 0.0 before" in capsys.readouterr().err
    # a record of the earlier index-keyed layout (.extract/<split>-<i>.json) counts for its source too
    (record,) = (tmp_path / ".extract").glob("00000_*.json")
    new = json.loads(record.read_text())
    record.unlink()
    (tmp_path / ".extract" / "train-000000.json").write_text(
        json.dumps({"source": new["source"], "shards": new["splits"]["train"], "stats": new["stats"]}))
    assert main(["extract", "--images", os.path.join(folder, "00000.tar"), *common]) == 0
    assert "1 of 1 input shards already finished" in capsys.readouterr().out
    assert open_dataset(tmp_path).split_samples("train") == 9


def make_captioned_tars(folder) -> str:
    """Two image shards of 6: COCO-style 5 captions in a .json list, single .txt captions, and one image without."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    for s in range(2):
        with wds.TarWriter(os.path.join(folder, f"{s:05d}.tar"), encoder=False) as w:
            for i in range(6):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(buf, format="JPEG")
                sample = {"__key__": f"img{s}{i}", "jpg": buf.getvalue()}
                if i == 0:
                    captions = [f"caption {c} of image {s}{i}" for c in range(5)]
                    sample["json"] = json.dumps({"captions": captions}).encode()
                else:
                    sample["txt"] = b"" if (s, i) == (1, 5) else f"image {s} {i}".encode()
                w.write(sample)
    return os.path.join(folder, "{00000..00001}.tar")


@pytest.mark.slow
def test_readme_journey_from_image_tars_to_an_evaluated_model(models, tmp_path):
    """The README's real-data journey on random-weight encoders: extract with an eval split (5 captions per image
    where given, the caption-less image skipped), train with the base config (it evaluates during training), then
    `eval` with its overrides."""
    from test_train import ROOT, env

    images, data, run = make_captioned_tars(tmp_path / "images"), tmp_path / "data", tmp_path / "run"
    assert main(["extract", "--images", images, "--eval-fraction", "0.3", "--target-model", models["clip"],
                 "--cond-model", models["vit"], "--out", str(data), "--target-cls", "--workers", "0",
                 "--quiet"]) == 0
    ds = open_dataset(data)
    train_n, eval_n = ds.split_samples("train"), ds.split_samples("eval")
    assert train_n + eval_n == 11 and train_n > eval_n > 0 and ds.max_captions == 5
    keys = {k: n for split in ("train", "eval") for b in EvalLoader(ds, split, 16)
            for k, n in zip(b["key"], b["text_mask"].sum(1).tolist())}
    assert "img15" not in keys and keys["img00"] == keys["img10"] == 5 and keys["img01"] == 1

    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "blip3o_fast.cli", *args], capture_output=True, text=True,
                                env=env(), cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    cli("train", "--config", "eva_to_clip_base", "--out", str(run), f"data.path={data}", "task.cond_dim=48",
        "task.target_dim=32", "task.grid=[4, 4]", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
        "train.steps=4", "train.warmup_steps=1", "train.precision=fp32", "train.compile=false", "train.zero_stage=0",
        "data.batch_size=4", "data.num_workers=0", "train.eval_every=2", "train.eval_samples=4", "eval.steps=2",
        "eval.batch_size=4", "train.ckpt_every=4", "train.log_every=1")
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4] and "recall@1" in evals[0]
    out = cli("eval", "--run", str(run), "--steps", "2", "--batch-size", "2", "--timestep-shift", "3",
              "model.fused_ops=false")
    report = json.loads((run / "eval" / "step-0000004-euler2-s3.json").read_text())
    assert (report["samples"], report["batch_size"], report["timestep_shift"]) == (eval_n, 2, 3.0)
    assert report["fused_ops"] is False and "recall@5" in report["metrics"] and "recall@1" in out


def test_remote_sources_are_opened_as_webdataset_does_and_named_by_their_file():
    from blip3o_fast.data.images import expand_images, opener_url, source_name

    urls = expand_images("s3://bucket/train/{00008..00009}.tar")
    assert urls == ["s3://bucket/train/00008.tar", "s3://bucket/train/00009.tar"]  # not checked for existence
    assert opener_url(urls[0]) == "pipe:aws s3 cp s3://bucket/train/00008.tar -"
    assert opener_url("https://h/a.tar") == "https://h/a.tar" and opener_url("pipe:cat a.tar") == "pipe:cat a.tar"
    assert [source_name(u) for u in (urls[1], "pipe:aws s3 cp s3://b/000.tar -", "https://h/x/a-b.tar")] == \
        ["00009", "000", "a_b"]
