"""Every DeepSpeed private attribute ds_accel uses (gathered in ds_accel.ds_private) still exists and means
what ds_accel takes it to mean, checked on real engines against DeepSpeed's public accessors where one
exists. A DeepSpeed upgrade that renames one fails here, naming it, instead of inside a training step."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from conftest import REPO, tiny_overrides


def _engine(tmp_path, stage: int, pipeline: bool = False):
    from ds_accel import runtime
    from ds_accel.config import from_dict
    from ds_accel.engine.build import make_engine, new_model, new_pipeline_model, resolve_ds_config
    from ds_accel.models import llama_config

    runtime.init_distributed()
    cfg = from_dict(tiny_overrides(tmp_path, deepspeed={"config": str(REPO / "ds_configs" / f"zero{stage}.json")}))
    ds = resolve_ds_config(cfg, 1)
    conf = llama_config("tiny", 512)
    model = new_pipeline_model(conf, 1, seed=0) if pipeline else new_model(conf, ds, seed=0)
    engine = make_engine(model, cfg, ds)
    if not pipeline:
        x = torch.randint(0, 512, (2, 16))
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    return engine


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_fragments_and_their_linking(tmp_path, stage):
    """On one rank a fragment is the whole parameter: it must equal DeepSpeed's public full accessors."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from ds_accel.ds_private import gradient_every_backward, has_hp_mapping, hp_fragment, link_optimizer_state

    engine = _engine(tmp_path, stage)
    params = dict(engine.module.named_parameters())
    assert all(has_hp_mapping(p) for p in params.values()), "_hp_mapping: ZeRO-1/2 no longer maps parameters"
    norm = params["model.norm.weight"]  # the second parameter group (undecayed)
    assert hp_fragment(norm, ("exp_avg",)).state == (), (
        "DeepSpeed now links later parameter groups' moments itself: ds_private.link_optimizer_state may go")
    link_optimizer_state(engine.optimizer)
    for name, p in params.items():
        fragment = hp_fragment(p, ("exp_avg", "exp_avg_sq"))
        assert fragment.start == 0 and fragment.numel == p.numel(), name  # one rank holds all of it
        assert torch.equal(fragment.master, safe_get_full_fp32_param(p).view(-1)), name
        assert len(fragment.state) == 2, f"{name}: moments not linked"
        for view, key in zip(fragment.state, ("exp_avg", "exp_avg_sq")):
            assert torch.equal(view, safe_get_full_optimizer_state(p, key).view(-1)), (name, key)
    assert gradient_every_backward(engine.optimizer) == (stage == 2)
    engine.destroy()


def test_zero3_fragment_and_flat_groups(tmp_path):
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    from ds_accel.ds_private import gradient_every_backward, zero3_flat_groups, zero3_fragment

    engine = _engine(tmp_path, 3)
    flats = zero3_flat_groups(engine.optimizer)
    assert flats and all(f.dtype == torch.float32 and f.dim() == 1 for f in flats), "fp32_partitioned_groups_flat"
    for name, p in engine.module.named_parameters():
        fragment = zero3_fragment(p, ("exp_avg", "exp_avg_sq"))
        storages = {f.untyped_storage().data_ptr() for f in flats}
        assert fragment.master.untyped_storage().data_ptr() in storages, f"{name}: not a view of a flat sub-group"
        assert torch.equal(fragment.master, safe_get_local_fp32_param(p)), name
        for view, key in zip(fragment.state, ("exp_avg", "exp_avg_sq")):
            assert torch.equal(view, safe_get_local_optimizer_state(p, key)), (name, key)
    assert gradient_every_backward(engine.optimizer)
    engine.destroy()


def test_zero0_needs_no_gradient_hooks_and_has_no_mapping(tmp_path):
    from ds_accel.ds_private import gradient_every_backward, has_hp_mapping

    engine = _engine(tmp_path, 0)
    assert not gradient_every_backward(engine.optimizer)
    assert not any(has_hp_mapping(p) for p in engine.module.parameters())
    engine.destroy()


def test_pipeline_layer_specs(tmp_path):
    from ds_accel.ds_private import pipeline_local_specs
    from ds_accel.parallel.pipeline import local_named_parameters

    engine = _engine(tmp_path, 0, pipeline=True)
    specs, local = pipeline_local_specs(engine.module)
    assert len(specs) == 4 + 3 and local == range(0, 7), "_layer_specs / _local_start / _local_stop"
    names = [n for n, _ in local_named_parameters(engine.module)]
    assert names[0] == "model.embed_tokens.weight" and "model.layers.3.mlp.down_proj.weight" in names
    engine.destroy()


def test_autotp_binds_gather_params_to_split_parameters():
    """AutoTP's layers bind their ``gather_params`` to the parameters they split (one rank cannot build an
    AutoTP engine: the binding is read off DeepSpeed's source; the tp=2 tests use it for real)."""
    from deepspeed.module_inject import layers

    for cls in (layers.LinearLayer, layers.LinearAllreduce):
        assert callable(getattr(cls, "gather_params", None)), f"{cls.__name__}.gather_params"
    assert ".gather_params = self.gather_params" in inspect.getsource(layers), \
        "AutoTP no longer binds gather_params to its parameters (ds_private.autotp_layer)"


def test_shm_op_build_hook_exists():
    assert hasattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op"), "deepspeed.comm.torch.build_shm_op"
