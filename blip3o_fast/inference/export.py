"""The export folder (docs/architecture.md §3.13) and its upload to the Hugging Face Hub.

    model.safetensors   the DiT's float32 weights (EMA by default)
    config.json         {format, format_version, task, model, flow, eval, training, parameters}: enough to
                        rebuild the DiT without blip3o-fast's YAML
    head.safetensors    the target encoder's global head, when the training data had one (data/head.py)
    stats.safetensors   the training data's per-channel statistics, when the model normalises (data/stats.py)
    eval.json           the run's newest evaluation report, when it has one
    loss.png            the run's loss curve, when it has one
    README.md           the model card
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..config.schema import plain
from ..data import save_head, save_stats
from ..errors import UserError
from ..evaluation.evaluate import sampling_label
from ..runtime.files import atomic_write_text, commit, partial_path

MODEL_FILE, CONFIG_FILE, CARD_FILE, EVAL_FILE, LOSS_FILE = (
    "model.safetensors", "config.json", "README.md", "eval.json", "loss.png")
EXPORT_FORMAT = 1

BASELINES = ("model", "oracle", "dataset_mean", "chance")


def export_config(gen) -> dict:
    """`gen`: a FeatureGenerator (its config, provenance and parameter count)."""
    cfg = gen.cfg.to_dict()
    flow = {k: cfg["flow"][k] for k in ("head", "target_norm", "cond_norm")}
    return {"format": "blip3o-fast", "format_version": EXPORT_FORMAT, "task": cfg["task"], "model": cfg["model"],
            "flow": flow, "eval": cfg["eval"], "training": gen.provenance.to_dict(),
            "parameters": gen.num_parameters()}


def write_export(gen, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out / MODEL_FILE)
    save_file({k: v.contiguous() for k, v in gen.state.items()}, str(tmp), metadata={"format": "pt"})
    commit(tmp, out / MODEL_FILE)
    config = export_config(gen)
    atomic_write_text(out / CONFIG_FILE, json.dumps(plain(config), indent=1) + "\n")
    if gen.head_weights is not None:
        w = gen.head_weights
        save_head(out, *(w.tensors[k] for k in ("post_layernorm.weight", "post_layernorm.bias",
                                                 "visual_projection.weight")), layer_norm_eps=w.layer_norm_eps)
    if gen.stats is not None and gen.norm.active:  # the model's normalisation travels with its weights (§3.1.1)
        save_stats(out, gen.stats)
    for name, source in gen.provenance.files.items():
        if source.resolve() != (out / name).resolve():
            shutil.copyfile(source, out / name)
    report = json.loads((out / EVAL_FILE).read_text()) if (out / EVAL_FILE).is_file() else None
    atomic_write_text(out / CARD_FILE, model_card(config, report, (out / LOSS_FILE).is_file()))
    return out


def _eval_table(report: dict) -> str:
    lines = ["| metric | " + " | ".join(BASELINES) + " |", "|---|" + "---:|" * len(BASELINES)]
    for name, row in report["metrics"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row.get(b, float('nan')):.4f}" for b in BASELINES) + " |")
    return "\n".join(lines)


def model_card(config: dict, report: dict | None, has_loss: bool) -> str:
    task, model, train = config["task"], config["model"], config["training"]
    grid = "x".join(map(str, task["grid"]))
    nc = task["grid"][0] * task["grid"][1] + int(task["cond_cls"])
    nt = task["grid"][0] * task["grid"][1] + int(task["target_cls"])
    rows = [
        ("task", f"`{task['name']}`: generate target tokens from condition tokens ({grid} patch grid)"),
        ("condition", f"[{nc}, {task['cond_dim']}]" + (" (CLS first)" if task["cond_cls"] else "")),
        ("target", f"[{nt}, {task['target_dim']}]" + (" (CLS first)" if task["target_cls"] else "")),
        ("model", f"DiT, hidden {model['hidden_size']}, depth {model['depth']}, {model['num_heads']} heads, "
                  f"{model['mlp']} MLP"),
        ("parameters", f"{config['parameters']:,}"),
        ("weights", train.get("weights")),
        ("training steps", train.get("step")),
        ("data manifest sha256", f"`{train.get('data_manifest_sha256')}`"),
    ]
    lines = ["---", "library_name: blip3o-fast", "tags:", "- blip3o-fast", "- rectified-flow",
             "- diffusion-transformer", "- feature-generation", "---", "",
             f"# blip3o-fast {task['name']} feature generator", "",
             "A Diffusion Transformer trained by rectified flow matching to generate one image encoder's patch "
             "tokens from another's.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Evaluation", ""]
    if report is not None:
        lines += [f"{report.get('samples')} held-out samples, {sampling_label(report)}, "
                  f"guidance {report.get('guidance_scale')}; global embedding: "
                  f"{report.get('global_embedding')}. Full report: `eval.json`.", "", _eval_table(report)]
    else:
        lines.append("No evaluation was recorded for this model (`blip3o-fast eval --model DIR --data DATASET`).")
    if has_loss:
        lines += ["", "## Training loss", "", "![training loss](loss.png)"]
    lines += ["", "## Use", "", "```python", "from blip3o_fast import FeatureGenerator", "",
              "gen = FeatureGenerator.from_pretrained(\"PATH_OR_DOWNLOADED_FOLDER\")",
              f"feats = gen.generate(cond, steps=30)   # cond [B, {nc}, {task['cond_dim']}] -> "
              f"[B, {nt}, {task['target_dim']}]", "```", "",
              "Or over a whole dataset: `blip3o-fast generate --model DIR --data DATASET --out OUT`.", ""]
    return "\n".join(lines)


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Uploads the export folder to a Hub model repository (created when missing); returns its URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("--push-to-hub needs huggingface_hub: pip install 'blip3o-fast[hub]'") from None
    api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="Upload blip3o-fast model")
    return f"https://huggingface.co/{repo_id}"
