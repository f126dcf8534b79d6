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
