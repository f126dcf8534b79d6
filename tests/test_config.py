"""Config loading: includes, overrides, coercion, one-line errors, and the README's generated reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from blip3o_fast.config import ConfigError, RunConfig, load_config, reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_includes_then_file_then_overrides(tmp_path):
    (tmp_path / "size.yaml").write_text("model: {hidden_size: 64, depth: 3, num_heads: 4}\n")
    (tmp_path / "run.yaml").write_text("include: [size.yaml]\nmodel: {depth: 5}\ntrain: {lr: 3e-4}\n")
    cfg = load_config(tmp_path / "run.yaml", ["model.num_heads=8", "task.grid=[4, 5]", "train.betas=[0.8, 0.9]"])
    assert (cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads) == (64, 5, 8)
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # PyYAML reads 3e-4 as a string
    assert cfg.task.grid == (4, 5) and cfg.task.target_tokens == 20 and cfg.train.betas == (0.8, 0.9)
    # the resolved config round-trips through its own YAML
    (tmp_path / "resolved.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("overrides,message", [
    (["model.hiden_size=3"], "unknown config key 'model.hiden_size' (did you mean 'hidden_size'?)"),
    (["trian.lr=1"], "unknown config key 'trian' (did you mean 'train'?)"),
    (["model.depth=two"], "model.depth must be an integer, got 'two'"),
    (["model.rope=maybe"], "model.rope must be true or false, got 'maybe'"),
    (["train.zero_stage=4"], "train.zero_stage must be 0, 1, 2 or 3, got 4"),
    (["model.num_heads=5"], "model.num_heads=5 must divide model.hidden_size=768"),
    (["eval.sampler=rk4"], "eval.sampler must be one of euler, heun; got 'rk4'"),
    (["lr"], "override 'lr' must look like section.key=value"),
])
def test_bad_values_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value) == message and "\n" not in str(e.value)


def test_missing_file_and_include_cycle(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("include: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "blip3o_fast" / "configs").rglob("*.yaml")):
        assert isinstance(load_config(path), RunConfig), path


def test_every_key_is_documented():
    undocumented = [line for line in reference_markdown().splitlines() if line.endswith("|  |")]
    assert not undocumented, undocumented


def test_readme_config_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- config-reference")
    start = readme.index("\n", start) + 1
    end = readme.index("<!-- end config-reference -->")
    assert readme[start:end] == reference_markdown(), (
        "README's config reference is stale: regenerate it with "
        "python -c 'from blip3o_fast.config import reference_markdown; print(reference_markdown())'")


def test_configs_by_shipped_name_or_path(tmp_path, capsys):
    from blip3o_fast.cli import main
    from blip3o_fast.config import resolve_config, shipped_names

    shipped = ROOT / "blip3o_fast" / "configs"
    assert load_config("demo") == load_config(shipped / "demo.yaml") == load_config("demo.yaml")
    assert load_config("eva_to_clip_base").task.target_cls and load_config("model/large").model.depth == 24
    assert shipped_names()[:3] == ["clip_to_eva_base", "demo", "eva_to_clip_base"] and "task/demo" in shipped_names()
    # a file of that name in the working folder wins over the shipped one; a path is a path
    (tmp_path / "demo").write_text("model: {depth: 1}\n")
    assert resolve_config(tmp_path / "demo") == tmp_path / "demo" and load_config(tmp_path / "demo").model.depth == 1
    # a copied template's includes resolve from the package when they are not beside it
    (tmp_path / "mine.yaml").write_text("include: [model/small.yaml, task/eva_to_clip.yaml]\ntrain: {steps: 7}\n")
    cfg = load_config(tmp_path / "mine.yaml")
    assert (cfg.model.hidden_size, cfg.task.cond_dim, cfg.train.steps) == (512, 4096, 7)
    with pytest.raises(ConfigError) as e:
        load_config("eva_to_clip_bse")
    assert str(e.value) == ("config 'eva_to_clip_bse' is neither a file nor a shipped config name (did you mean "
                            "'eva_to_clip_base'?): give a YAML path or a name from `blip3o-fast config list`")

    assert main(["config", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == shipped_names() and listed[1].startswith("demo  ")
    assert main(["config", "show", "eva_to_clip_base", "train.steps=5", "data.path=/d"]) == 0
    (tmp_path / "shown.yaml").write_text(capsys.readouterr().out)
    assert load_config(tmp_path / "shown.yaml") == load_config("eva_to_clip_base", ["train.steps=5", "data.path=/d"])
    assert main(["config", "show", "nope"]) == 2
    assert capsys.readouterr().err.startswith("blip3o-fast config: error: config 'nope' is neither a file")
