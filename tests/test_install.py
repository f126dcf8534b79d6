"""Installing blip3o-fast as a user does: the metadata's floors and pins are true, every third-party module the
package imports is declared, importing it and `generate` need neither deepspeed nor matplotlib, the sdist
carries every csrc/ file, and a wheel built from a clean copy of the tree installs into a fresh venv and
runs info, data synth, train, eval and export from a folder outside the tree (slow)."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from test_export import exported, trained_run  # noqa: F401  (session fixtures)
from test_train import ROOT, env, small_data  # noqa: F401

DIST = "blip3o-fast"
# import name -> distribution, for the optional ones that may not be installed here
KNOWN = {"flash_attn": "flash-attn", "PIL": "pillow", "yaml": "pyyaml", "wandb": "wandb"}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def _requirements() -> tuple[dict[str, Requirement], dict[str, dict[str, Requirement]]]:
    core, extras = {}, {}
    for text in importlib.metadata.requires(DIST) or []:
        req = Requirement(text)
        if req.marker is None:
            core[_norm(req.name)] = req
            continue
        extra = str(req.marker).split("==")[-1].strip().strip("\"'")
        extras.setdefault(extra, {})[_norm(req.name)] = req
    return core, extras


def _third_party_imports() -> set[str]:
    found = set()
    for path in (ROOT / "blip3o_fast").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "blip3o_fast"}


def test_metadata_floors_pins_and_extras_are_true():
    meta = importlib.metadata.metadata(DIST)
    python = SpecifierSet(meta["Requires-Python"])
    assert hasattr(hashlib, "file_digest") and "3.11.0" in python and "3.10.12" not in python  # data/writer.py
    core, extras = _requirements()
    # the compiled _C loads only with the torch it was built against: the wheel pins that version
    assert str(core["torch"].specifier) == f"=={torch.__version__.split('+')[0]}"
    assert set(extras) >= {"extract", "hub", "wandb", "flash", "dev"}
    transformers = extras["extract"]["transformers"].specifier
    assert "4.55.9" not in transformers and "4.56.0" in transformers  # from_pretrained(dtype=...) is 4.56
    assert "pillow" in extras["extract"] and "huggingface-hub" in extras["hub"] and "wandb" in extras["wandb"]
    assert {"deepspeed", "matplotlib", "braceexpand", "webdataset", "safetensors"} <= set(core)
    assert not {"transformers", "pillow", "huggingface-hub"} & set(core), "the core is what training needs"

    declared = set(core).union(*extras.values())
    mapping = importlib.metadata.packages_distributions()
    undeclared = []
    for module in sorted(_third_party_imports()):
        dists = {_norm(d) for d in mapping.get(module, [])} or {_norm(KNOWN.get(module, module))}
        if not dists & declared:
            undeclared.append(f"{module} ({', '.join(sorted(dists))})")
    assert not undeclared, f"imported but not declared in the metadata: {undeclared}"
    for name in ("transformers",):  # the floors hold for what is installed here too
        assert importlib.metadata.version(name) in extras["extract"][name].specifier


BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("deepspeed", "matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, Block())
import blip3o_fast
from blip3o_fast.cli import main
code = main(sys.argv[1:])
assert not {m.split(".")[0] for m in sys.modules} & {"deepspeed", "matplotlib"}
sys.exit(code)
"""


def test_import_and_generate_need_neither_deepspeed_nor_matplotlib(exported, small_data, tmp_path):  # noqa: F811
    out = tmp_path / "gen"
    result = subprocess.run([sys.executable, "-c", BLOCK, "generate", "--model", str(exported), "--data",
                             str(small_data), "--out", str(out), "--steps", "2", "--quiet"],
                            capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "manifest.json").is_file()


def source_copy(dest: Path) -> Path:
    """The tree as a fresh clone has it (tracked and untracked-but-not-ignored files): no build outputs, no venv."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_sdist_carries_every_csrc_file(tmp_path):
    src = source_copy(tmp_path / "src")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src, check=True,
                   capture_output=True, env={**env(), "BLIP3O_FAST_CPU_ONLY": "1"}, timeout=300)
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    csrc = {p.relative_to(src).as_posix() for p in (src / "csrc").rglob("*") if p.is_file()}
    assert any(n.endswith(".cu") for n in csrc) and any(n.endswith(".cuh") for n in csrc)
    assert csrc - names == set(), "the sdist must build the extension anywhere"
    configs = {p.relative_to(src).as_posix() for p in (src / "blip3o_fast" / "configs").rglob("*.yaml")}
    assert configs and configs <= names and {"LICENSE", "setup.py", "pyproject.toml", "README.md"} <= names


def _venv(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=120)
    return folder / "bin"


def reuse_compiled_extension(src: Path) -> None:
    """Puts this tree's compiled _C (built by `make setup` from the same csrc/) where setup.py's build_ext looks,
    newer than the sources, so the wheel build (BLIP3O_FAST_REUSE_BUILD=1) packages it instead of compiling for
    minutes on 2 cores again; the from-scratch compile is what `make setup` does on every fresh clone."""
    built = sorted((ROOT / "blip3o_fast").glob("_C.*.so"))
    assert built, "the extension is not built in this tree: run make setup"
    lib = src / "build" / f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}" / "blip3o_fast"
    lib.mkdir(parents=True)
    shutil.copy(built[0], lib / built[0].name)


@pytest.mark.slow
def test_wheel_installs_into_a_clean_venv_and_runs_outside_the_tree(tmp_path):
    src = source_copy(tmp_path / "src")
    reuse_compiled_extension(src)
    build_env = {**env(), "MAX_JOBS": "2", "BLIP3O_FAST_CPU_ONLY": "1", "BLIP3O_FAST_REUSE_BUILD": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, env=build_env, timeout=900)
    (wheel,) = (tmp_path / "dist").glob("blip3o_fast-*.whl")
    # about 4 min on 2 shared cores: torch's wheel unpacked, the deps, and DeepSpeed's JIT build of its CPU
    # shared-memory op on the first training step (its sources are new files in every new venv, so no cache helps)
    bin_dir = _venv(tmp_path / "venv")
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-compile"]  # no .pyc of all of torch
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True, timeout=600)
    subprocess.run([*pip, str(wheel)], check=True, timeout=900)
    work = tmp_path / "elsewhere"
    work.mkdir()
    run_env = {**{k: v for k, v in env().items() if k != "PYTHONPATH"}, "TORCH_EXTENSIONS_DIR": str(tmp_path / "jit")}

    def cli(*args: str) -> str:
        result = subprocess.run([str(bin_dir / "blip3o-fast"), *args], capture_output=True, text=True, cwd=work,
                                env=run_env, timeout=600)
        assert result.returncode == 0, f"{args[0]}: {result.stderr[-3000:]}"
        return result.stdout

    assert "extension        loaded, " in cli("info")
    assert _where(bin_dir).startswith(str(tmp_path / "venv")) and "eva_to_clip_base" in cli("config", "list")
    cli("data", "synth", "--out", "data", "--train-samples", "64", "--eval-samples", "16", "--shard-size", "32",
        "--quiet")
    cli("train", "--config", "demo", "--out", "run", "data.path=data", "train.steps=4", "train.ckpt_every=4",
        "train.eval_every=0", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "data.num_workers=0",
        "data.batch_size=8")
    assert "recall@1" in cli("eval", "--run", "run", "--steps", "2", "--batch-size", "8")
    cli("export", "run", "--out", "model")
    assert (work / "model" / "model.safetensors").is_file() and (work / "model" / "config.json").is_file()


def _where(bin_dir: Path) -> str:
    """Where the venv imports blip3o_fast from (its site-packages, not this tree)."""
    return subprocess.run([str(bin_dir / "python"), "-c", "import blip3o_fast; print(blip3o_fast.__file__)"],
                          capture_output=True, text=True, cwd="/", check=True).stdout


def test_the_build_knobs_are_namespaced_and_documented():
    """Every environment variable setup.py reads is ours (BLIP3O_FAST_*) or torch's/the compiler's, and the README
    lists it; the license file matches the metadata."""
    setup = (ROOT / "setup.py").read_text()
    read = set(re.findall(r'(?:_truthy|os\.environ\.get|os\.environ\.setdefault)\(\s*"([A-Z0-9_]+)"', setup))
    theirs = {"TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "MAX_JOBS", "CXX"}
    assert {"BLIP3O_FAST_DEBUG", "BLIP3O_FAST_CPU_ONLY", "BLIP3O_FAST_FORCE_CUDA"} <= read
    assert not {k for k in read if not k.startswith("BLIP3O_FAST_")} - theirs, "a bare knob another tool may set"
    readme = (ROOT / "README.md").read_text()
    assert not [k for k in (read | theirs) - {"CXX"} if f"`{k}" not in readme], "list every build knob in the README"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert importlib.metadata.metadata(DIST)["License"] == "MIT"


def test_a_missing_extra_is_named_in_one_line(monkeypatch, tmp_path, capsys):
    from blip3o_fast.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the `extract` extra were not installed
    assert main(["extract", "--images", str(tmp_path), "--target-model", "a", "--cond-model", "b", "--out",
                 str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == ("blip3o-fast extract: error: extract needs transformers, which is not "
                                               "installed: pip install 'blip3o-fast[extract]'")
