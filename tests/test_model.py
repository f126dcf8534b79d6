"""The DiT (docs/architecture.md §3.7): zero init, shapes and errors, CFG null condition, attention backends,
checkpointing, RoPE tables, sizes. Mostly on the reference ops; fused-vs-reference lives in
test_model_fused.py."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from blip3o_fast.config import ConfigError, ModelConfig, TaskConfig, load_config
from blip3o_fast.errors import UserError
from blip3o_fast.model import DiT
from blip3o_fast.model.attention import attention, flash_available, math_attention

CONFIGS = Path(__file__).resolve().parent.parent / "blip3o_fast" / "configs"
SMALL_TASK = TaskConfig(cond_dim=24, target_dim=16, grid=(3, 4), target_cls=True)


def small_model(task: TaskConfig = SMALL_TASK, **overrides) -> DiT:
    cfg = ModelConfig(**{"hidden_size": 32, "depth": 2, "num_heads": 2, "fused_ops": False, **overrides})
    torch.manual_seed(0)
    return DiT(cfg, task)


def randomize(model: DiT, seed: int = 0) -> DiT:
    """Replaces the zero init by random weights so every branch, gate and the head carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def inputs(task: TaskConfig, batch: int = 3, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, task.target_tokens, task.target_dim, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype)
    cond = torch.randn(batch, task.cond_tokens, task.cond_dim, generator=g, dtype=dtype)
    return x_t, t, cond


# -- init and interface ---------------------------------------------------------------------------


@pytest.mark.parametrize("mlp,norm", [("swiglu", "layer"), ("gelu", "rms")])
def test_new_model_predicts_exactly_zero_velocity(mlp, norm):
    model = small_model(mlp=mlp, norm=norm)
    x_t, t, cond = inputs(SMALL_TASK)
    v = model(x_t, t, cond)
    assert v.shape == x_t.shape
    assert torch.equal(v, torch.zeros_like(v))
    # as in DiT, the first gradient reaches only out_proj; once it moves, the gates learn too
    target = torch.randn_like(v)
    (v - target).pow(2).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"out_proj.weight", "out_proj.bias"}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    (model(x_t, t, cond) - target).pow(2).sum().backward()
    for block in model.blocks:
        assert block.adaLN_modulation[-1].weight.grad.abs().sum() > 0


def test_forward_accepts_half_precision_data_and_returns_model_dtype():
    model = randomize(small_model())
    x_t, t, cond = inputs(SMALL_TASK)
    v = model(x_t.half(), t, cond.half())
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, model(x_t.half().float(), t, cond.half().float()))


@pytest.mark.parametrize(
    "which,shape",
    [("x_t", (3, 12, 16)), ("x_t", (3, 13, 15)), ("cond", (3, 12, 23)), ("cond", (3, 13, 24)), ("cond", (2, 12, 24))],
)
def test_mismatched_dims_raise_one_line_user_error(which, shape):
    model = small_model()
    x_t, t, cond = inputs(SMALL_TASK)
    args = {"x_t": x_t, "t": t, "cond": cond}
    args[which] = torch.randn(shape)
    with pytest.raises(UserError) as err:
        model(**args)
    assert "\n" not in str(err.value) and which in str(err.value)


def test_drop_cond_replaces_the_condition_by_the_null_condition():
    model = randomize(small_model())
    x_t, t, cond = inputs(SMALL_TASK)
    drop = torch.tensor([True, False, True])
    v1 = model(x_t, t, cond, drop_cond=drop)
    v2 = model(x_t, t, torch.randn_like(cond), drop_cond=drop)
    torch.testing.assert_close(v1[drop], v2[drop], rtol=0, atol=0)  # dropped rows ignore cond
    assert not torch.allclose(v1[~drop], v2[~drop])
    # drop_cond=None and all-False are the same model
    torch.testing.assert_close(model(x_t, t, cond), model(x_t, t, cond, drop_cond=torch.zeros(3, dtype=torch.bool)))
    # the null condition is learned
    model(x_t, t, cond, drop_cond=drop).sum().backward()
    assert model.null_cond.grad.abs().sum() > 0


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_activation_checkpointing_gives_the_same_outputs_and_grads(fused):
    plain = randomize(small_model(fused_ops=fused))
    ckpt = small_model(fused_ops=fused, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x_t, t, cond = inputs(SMALL_TASK)
    outs = []
    for model in (plain, ckpt):
        v = model(x_t, t, cond)
        (v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum().backward()
        outs.append((v, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_rope_tables_follow_device_but_not_dtype_and_are_not_saved():
    model = small_model()
    assert not any("rope" in key for key in model.state_dict())
    model.bfloat16()
    assert model.in_proj.weight.dtype == torch.bfloat16
    assert model.rope.target_cos.dtype == torch.float64  # angles never rounded to bf16
    x_t, t, cond = inputs(SMALL_TASK)
    assert model(x_t, t, cond).dtype == torch.bfloat16


def test_model_builds_on_meta_device_and_deepcopies():
    with torch.device("meta"):
        model = small_model()
    assert model.in_proj.weight.is_meta and not model.rope.target_cos.is_meta
    copy.deepcopy(small_model())  # EMA copies the model


@pytest.mark.parametrize("rope,rope_cross", [(True, False), (False, True), (False, False)])
def test_rope_off_adds_learned_positions_and_still_runs(rope, rope_cross):
    model = randomize(small_model(rope=rope, rope_cross=rope_cross))
    assert (model.pos_embed is not None) == (not (rope and rope_cross))
    assert (model.cond_pos_embed is not None) == (not rope_cross)
    x_t, t, cond = inputs(SMALL_TASK)
    assert torch.isfinite(model(x_t, t, cond)).all()


def test_cls_tokens_get_a_learned_type_embedding_only_without_position_tables():
    """With RoPE and no position table, only a type embedding tells the CLS token from a patch token."""
    both = TaskConfig(cond_dim=24, target_dim=16, grid=(3, 4), target_cls=True, cond_cls=True)
    model = randomize(small_model(both))
    assert model.target_cls_embed is not None and model.cond_cls_embed is not None
    x_t, t, cond = inputs(both)
    model(x_t, t, cond).square().sum().backward()
    assert model.target_cls_embed.grad.abs().sum() > 0 and model.cond_cls_embed.grad.abs().sum() > 0
    plain = small_model(replace(both, target_cls=False, cond_cls=False))
    assert plain.target_cls_embed is None and plain.cond_cls_embed is None
    with_table = small_model(both, rope_cross=False)  # position tables already mark the CLS rows
    assert with_table.target_cls_embed is None and with_table.cond_cls_embed is None


@pytest.mark.parametrize("target_cls,cond_cls", [(True, False), (True, True), (False, True), (False, False)])
def test_cond_add_gives_each_target_token_its_own_grid_cells_condition(target_cls, cond_cls):
    """model.cond_add: target token (r, c) gets the projection of condition patch (r, c); the target CLS gets the
    condition CLS, else the patch mean; a dropped condition adds nothing."""
    task = TaskConfig(cond_dim=24, target_dim=16, grid=(3, 4), target_cls=target_cls, cond_cls=cond_cls)
    model = randomize(small_model(task, cond_add=True))
    assert model.cond_add is not None and small_model(task).cond_add is None
    _, _, cond = inputs(task)
    projected = model.cond_add(cond)
    aligned = model._aligned_cond(projected, None)
    assert aligned.shape == (3, task.target_tokens, 32)
    patches = projected[:, int(cond_cls):]
    torch.testing.assert_close(aligned[:, int(target_cls):], patches, rtol=0, atol=0)
    if target_cls:
        expected_cls = projected[:, 0] if cond_cls else patches.mean(1)
        torch.testing.assert_close(aligned[:, 0], expected_cls, rtol=0, atol=0)
    drop = torch.tensor([True, False, True])
    dropped = model._aligned_cond(projected, drop)
    assert dropped[drop].abs().max() == 0 and torch.equal(dropped[~drop], aligned[~drop])


def test_cond_add_moves_each_target_token_with_its_own_patch_only():
    """Changing condition patch k changes target token k through the added projection: with cross-attention and
    self-attention closed (zero gates), no other token moves. The weights learn from the loss."""
    task = TaskConfig(cond_dim=24, target_dim=16, grid=(3, 4))
    model = randomize(small_model(task, cond_add=True))
    with torch.no_grad():
        for block in model.blocks:  # every block's residual branches closed: token k sees only its own inputs
            block.adaLN_modulation[-1].weight.zero_()
            block.adaLN_modulation[-1].bias.zero_()
    x_t, t, cond = inputs(task)
    moved = cond.clone()
    moved[:, 5] += 1.0
    delta = (model(x_t, t, moved) - model(x_t, t, cond)).abs().amax(dim=(0, 2))
    assert delta[5] > 1e-3 and torch.count_nonzero(delta) == 1
    model(x_t, t, cond).square().sum().backward()
    assert model.cond_add.weight.grad.abs().sum() > 0


def test_self_attention_is_position_aware_through_rope():
    """Permuting target tokens must change the output of a RoPE model (it would not without positions)."""
    task = replace(SMALL_TASK, target_cls=False)
    model = randomize(small_model(task))
    x_t, t, cond = inputs(task)
    perm = torch.randperm(task.target_tokens)
    assert not torch.allclose(model(x_t[:, perm], t, cond), model(x_t, t, cond)[:, perm], atol=1e-4)


# -- attention backends ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_attention_backends_match_math(backend, dtype, tol):
    g = torch.Generator().manual_seed(0)
    # k/v with another length, q as a strided view of a fused projection, like the model's
    qkv = torch.randn(2, 7, 3, 3, 8, generator=g, dtype=dtype)
    q = qkv[:, :, 0]
    k, v = torch.randn(2, 2, 11, 3, 8, generator=g, dtype=dtype).unbind(0)
    want = math_attention(q, k, v)
    # the math backend is the textbook formula
    ref = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(8), -1) @ v.transpose(1, 2)
    torch.testing.assert_close(want, ref.transpose(1, 2), rtol=tol, atol=tol)
    torch.testing.assert_close(attention(q, k, v, backend), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_attention_keeps_dtype_and_matches_float32(dtype):
    """On CPU, bf16/fp16 attention runs SDPA in float32 (faster there) and returns the input dtype."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 3, 16, generator=g).to(dtype).requires_grad_() for _ in range(3))
    out = attention(q, k, v, "auto")
    assert out.dtype == dtype and out.shape == q.shape
    want = math_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad.float()).all() and q.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_model_backends_match_math_outputs_and_grads(backend):
    task = replace(SMALL_TASK, target_cls=False, cond_cls=True)  # Nt != Nc
    results = {}
    for name in ("math", backend):
        model = randomize(small_model(task, attention=name))
        x_t, t, cond = inputs(task)
        v = model(x_t, t, cond)
        (v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum().backward()
        results[name] = (v, {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results[backend][0], results["math"][0], rtol=1e-5, atol=1e-5)
    for n, grad in results["math"][1].items():
        torch.testing.assert_close(results[backend][1][n], grad, rtol=1e-4, atol=1e-5, msg=n)


def test_flash_attn_refuses_what_it_cannot_run():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(UserError, match="flash_attn") as err:
        attention(q, q, q, "flash_attn")  # CPU float32: never flash-attn's
    assert "\n" not in str(err.value)
    if not flash_available():
        with pytest.raises(ConfigError, match="flash-attn is not installed"):
            small_model(attention="flash_attn")


# -- configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"hidden_size": 100, "num_heads": 3}, "must divide"),
        ({"hidden_size": 64, "num_heads": 2, "rope_sections": (8, 12, 8)}, "summing to the head dim 32"),
        ({"hidden_size": 64, "num_heads": 2, "rope_sections": (7, 13, 12)}, "three even numbers"),
        ({"mlp": "relu"}, "model.mlp"),
        ({"attention": "xformers"}, "model.attention"),
        ({"cond_drop": 1.0}, "cond_drop"),
    ],
)
def test_bad_model_configs_fail_at_construction_in_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        ModelConfig(**overrides)
    assert "\n" not in str(err.value)


def _load_files(names, overrides):
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run.yaml"
        run.write_text(yaml.safe_dump({"include": [str(CONFIGS / n) for n in names]}))
        return load_config(run, list(overrides))


@pytest.mark.parametrize(
    "size,hidden,depth,heads,millions",
    [("tiny", 128, 4, 4, 2.62), ("small", 512, 8, 8, 57.25), ("base", 768, 12, 12, 184.05),
     ("large", 1024, 24, 16, 641.27)],
)
def test_model_sizes(size, hidden, depth, heads, millions, capsys):
    cfg = _load_files([f"model/{size}.yaml", "task/eva_to_clip.yaml"], ["model.fused_ops=false"])
    assert (cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads) == (hidden, depth, heads)
    with torch.device("meta"):
        model = DiT(cfg.model, cfg.task)
    print(model.describe())
    assert f"{millions:.2f}M parameters" in capsys.readouterr().out
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "task,cond,target", [("eva_to_clip", (256, 4096), (257, 1024)), ("clip_to_eva", (256, 1024), (256, 4096)),
                         ("demo", (64, 64), (65, 32))]
)
def test_task_configs(task, cond, target):
    t = _load_files([f"task/{task}.yaml"], []).task
    assert (t.cond_tokens, t.cond_dim) == cond and (t.target_tokens, t.target_dim) == target
