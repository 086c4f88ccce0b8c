"""Elastic resume (``ds_accel.engine.elastic``): a V-cycle + SAT run checkpointed inside level 2 on 2 ranks
(ZeRO-1, ZeRO-3) resumes on 1 rank, on 2 ranks with tp=2 and with pp=2, and from those layouts again.

Two references, neither of which goes through the conversion:

* the live engine at the moment it saved: every parameter's fp32 master weight and both Adam moments,
  gathered by HF name (``LevelParams.read``), and SAT's importance averaged over the two data-parallel
  ranks by the all-reduce the next selection runs. The converted checkpoint holds exactly these values,
  bit for bit: the conversion only moves fp32 values, and the merged score is the same two float
  operations ((a + b) / 2) as the all-reduce's mean;
* an uninterrupted single-process run of the same config and global batch (8 blocks per step), which
  writes no checkpoint before its end. A resumed run's losses equal it to rel 5e-5. The runs differ in
  reduction order only (two half-batch gradients averaged vs one batch mean, partial norms for
  clipping under ZeRO-3 and TP, TP's row-parallel partial sums, the pipeline's loss average): a few
  ulps (1e-7 relative) per step, which Adam's normalised update carries into the weights; measured at
  most 2.5e-7 over the resumed steps. A wrong weight, moment, kept shard (the de-coalesce + interpolate
  at step 5 reads them) or SAT selection errs by 1e-3 or more: a different SAT selection (TP's balanced
  instead of global) moved the first resumed loss by 8e-3.

Every resume also checks that the original checkpoint directory is byte-identical afterwards, and a
resume that can't be converted (another model.backend) fails with one ConfigError line before any work.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_overrides, train_rows
from ranks import run_ranks

# width_factor 1: tp=2 must divide every level's KV heads (tiny: 2); depth 2 halves 4 layers to 2 (pp=2 fits)
ML = {"enabled": True, "width_factor": 1, "step_fractions": [0.25, 0.375, 0.375], "lr_scale": [1.0, 4.0]}
SAT = {"enabled": True, "omission_rate": 0.5, "tp_selection": "global"}  # global: the single process's top-k
STOP = 3  # stages: level 1 steps 0-1, level 2 steps 2-4, level 1 steps 5-7


def _config(out: Path, ds_json: str, micro: int, **extra) -> dict:
    return tiny_overrides(out, multilevel=ML, sat=SAT, optim={"micro_batch_size": micro},
                          deepspeed={"config": str(REPO / "ds_configs" / ds_json)}, **extra)


def _losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return digest.hexdigest()


def _stop_and_gather(cfg_dict: dict, dump: str) -> None:
    """Run to STOP on this rank and, as it checkpoints, keep what the live engine holds (rank 0 writes
    ``dump``): fp32 weights and Adam moments by HF name, SAT scores averaged over the ranks."""
    import torch.distributed as dist

    from ds_accel import checkpoint
    from ds_accel.engine.transitions import MOMENTS, LevelParams

    real_save = checkpoint.save

    def save(engine, root, step, run_state, extra, keep, layout=None):
        view = LevelParams.of(engine.module, optimizer=engine.optimizer)
        params = {name: {key: view.read(name, None if key == "fp32" else key).cpu() for key in ("fp32",) + MOMENTS}
                  for name in view.shapes}
        scores = {}
        for kind, score in extra["sat"]["tracker"]["score"].items():
            total = score.clone()
            dist.all_reduce(total)
            scores[kind] = (total / dist.get_world_size()).cpu()
        if dist.get_rank() == 0:
            torch.save({"params": params, "scores": scores}, dump)
        return real_save(engine, root, step, run_state, extra, keep, layout)

    checkpoint.save = save
    train_rows(cfg_dict, STOP)


def _assert_converted_equals_live_engine(converted: Path, dump: Path) -> None:
    live = torch.load(dump)
    assert sorted(p.stem for p in (converted / "params").iterdir()) == sorted(live["params"])
    for name, states in live["params"].items():
        saved = torch.load(converted / "params" / f"{name}.pt")
        for key, value in states.items():
            assert torch.equal(saved[key], value), (name, key)
    assert min(v["exp_avg_sq"].abs().max().item() for v in live["params"].values()) > 0, "no Adam state was saved"
    merged = torch.load(converted / "extra_rank0.pt", weights_only=False)["sat"]["tracker"]
    for kind, score in live["scores"].items():
        assert torch.equal(merged["score"][kind], score), kind


def _assert_losses_match(rows: list[dict], reference: dict[int, float], steps: range) -> None:
    got = _losses(rows)
    for step in steps:
        assert got[step] == pytest.approx(reference[step], rel=5e-5), (step, got[step], reference[step])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The uninterrupted single-process run: losses by step."""
    rows = run_ranks(train_rows, 1, _config(tmp_path_factory.mktemp("ref") / "run", "zero0.json", 8))[0]
    levels = [r["level"] for r in rows if "loss" in r]
    assert levels == [1, 1, 2, 2, 2, 1, 1, 1] and max(r["omission_rate"] for r in rows if "loss" in r) == 0.5
    return _losses(rows)


@pytest.mark.distributed
def test_zero1_checkpoint_resumes_on_one_rank_and_on_tp2(tmp_path, reference, capfd):
    """ZeRO-1 on 2 ranks (dp=2) -> 1 rank under ZeRO-0 (torch's AdamW state) to the end, with export;
    and the same checkpoint -> tp=2 (dp=1) to the end. Before that, a resume with another model.backend
    is refused in one line and leaves the checkpoints byte-identical."""
    from ds_accel.config import ConfigError, from_dict
    from ds_accel.trainer import train

    out = tmp_path / "run"
    run_ranks(_stop_and_gather, 2, _config(out, "zero1.json", 4), str(tmp_path / "live.pt"))
    root = out / "checkpoints"
    before, original = _tree_hash(root), _tree_hash(root / "step000003")
    megatron = _config(out, "zero1.json", 8, model={"preset": "tiny", "backend": "megatron"})
    with pytest.raises(ConfigError, match=r"^model\.backend: checkpoint .*step000003 \(2 ranks \(dp2 tp1 pp1, ZeRO-1, "
                                          r"fp32\)\) was written with model\.backend=hf, this run has megatron; set "
                                          r"model\.backend=hf$"):
        train(from_dict(megatron), resume=True)
    assert _tree_hash(root) == before
    shutil.copytree(out, tmp_path / "tp2")
    capfd.readouterr()

    one = _config(out, "zero0.json", 8)
    one["run"]["export"] = True
    rows = run_ranks(train_rows, 1, one, None, True)[0]
    messages = [line for line in capfd.readouterr().out.splitlines() if line.startswith("resume:")]
    assert messages == [
        "resume: step000003 was written on 2 ranks (dp2 tp1 pp1, ZeRO-1, fp32), this run has 1 rank (dp1 tp1 pp1, "
        "ZeRO-0, fp32); converted into step000003.to-dp1-tp1-pp1-zero0-fp32: weights and Adam moments of 20 "
        "parameters at Adam step 1 (DeepSpeed universal checkpoint); kept shards re-cut for 1 rank; SAT state "
        "merged over the saved ranks; V-cycle stage 1 (level 2), LORS and data continue at step 3; global batch 8 "
        "as before (the same samples at every step)"]
    _assert_converted_equals_live_engine(root / "step000003.to-dp1-tp1-pp1-zero0-fp32", tmp_path / "live.pt")
    _assert_losses_match(rows, reference, range(STOP + 1, 9))
    assert [r["transition"] for r in rows if "transition" in r] == ["coalesce", "decoalesce+interpolate"]
    from transformers import LlamaForCausalLM

    exported = LlamaForCausalLM.from_pretrained(out / "export")
    assert exported.model.layers[3].mlp.gate_proj.weight.shape == (176, 64)

    tp2 = _config(tmp_path / "tp2", "tp2.json", 8)
    _assert_losses_match(run_ranks(train_rows, 2, tp2, None, True)[0], reference, range(STOP + 1, 9))
    assert (tmp_path / "tp2" / "checkpoints" / "step000003.to-dp1-tp2-pp1-zero1-fp32").is_dir()
    assert _tree_hash(root / "step000003") == original
    assert _tree_hash(tmp_path / "tp2" / "checkpoints" / "step000003") == original


@pytest.mark.distributed
def test_zero3_checkpoint_resumes_on_pp2_then_on_one_rank(tmp_path, reference):
    """ZeRO-3 on 2 ranks -> pp=2 (ZeRO-1, dp=1), stopped again one step later inside level 2 -> 1 rank
    under ZeRO-3: pipeline layer names become HF names, each stage's SAT scores go back together, the
    kept shards are re-cut twice and still give the interpolation at step 5."""
    out = tmp_path / "run"
    run_ranks(_stop_and_gather, 2, _config(out, "zero3.json", 4), str(tmp_path / "live.pt"))
    root = out / "checkpoints"
    original = _tree_hash(root / "step000003")
    piped = _config(out, "pp2.json", 8, parallel={"pp": 2})
    rows = run_ranks(train_rows, 2, piped, STOP + 1, True)[0]
    _assert_converted_equals_live_engine(root / "step000003.to-dp1-tp1-pp2-zero1-fp32", tmp_path / "live.pt")
    _assert_losses_match(rows, reference, range(STOP + 1, STOP + 2))
    assert _tree_hash(root / "step000003") == original
    pp_checkpoint = _tree_hash(root / "step000004")
    rows = run_ranks(train_rows, 1, _config(out, "zero3.json", 8), None, True)[0]
    _assert_losses_match(rows, reference, range(STOP + 2, 9))
    assert json.loads((root / "step000004.to-dp1-tp1-pp1-zero3-fp32" / "layout.json").read_text())[
        "converted_from"]["layout"]["pp"] == 2
    assert _tree_hash(root / "step000004") == pp_checkpoint


def test_reshard_recuts_shards_of_any_world():
    """``reshard`` of another world's shards equals ``shard_of`` of the whole tensor, uneven sizes included."""
    from ds_accel.engine.elastic import reshard
    from ds_accel.engine.params import shard_of

    for numel in (1, 7, 64, 101):
        full = torch.arange(numel, dtype=torch.float32)
        for old in (1, 2, 3, 8):
            parts = [shard_of(full, r, old) for r in range(old)]
            for new in (1, 2, 4, 5):
                for rank in range(new):
                    assert torch.equal(reshard(parts, rank, new), shard_of(full, rank, new)), (numel, old, new, rank)


def test_merge_sat_states_takes_each_unit_from_its_holders():
    """Scores of 2 TP ranks x 2 data-parallel ranks (TP inner), and of 2 pipeline stages: each unit's
    score is the mean over the ranks holding it; what a rank merely decayed is ignored."""
    from ds_accel.engine.elastic import merge_sat_states

    def state(layers, heads, channels, seen=True):
        tracker = {"layers": layers, "metric": "activation", "generator": torch.Generator().get_state(),
                   "score": {"heads": torch.tensor(heads), "channels": torch.tensor(channels)},
                   "seen": {"heads": torch.full((len(layers), 4), seen),
                            "channels": torch.full((len(layers), 2), seen)}}
        return {"tracker": tracker, "rate": 0.5, "keep_heads": {layer: torch.tensor([0, 1]) for layer in layers},
                "keep_channels": {}}

    junk = 99.0  # what a rank holds for units outside its TP block
    tp_dp = [state([0], [[1.0, 2.0, junk, junk]], [[5.0, junk]]), state([0], [[junk, junk, 3.0, 4.0]], [[junk, 6.0]]),
             state([0], [[3.0, 4.0, junk, junk]], [[7.0, junk]]), state([0], [[junk, junk, 5.0, 8.0]], [[junk, 8.0]])]
    merged = merge_sat_states(tp_dp, tp=2)["tracker"]
    assert merged["score"]["heads"].tolist() == [[2.0, 3.0, 4.0, 6.0]]
    assert merged["score"]["channels"].tolist() == [[6.0, 7.0]]
    stages = [state([0, 1], [[1.0] * 4, [2.0] * 4], [[1.0, 1.0], [2.0, 2.0]]),
              state([2, 3], [[3.0] * 4, [4.0] * 4], [[3.0, 3.0], [4.0, 4.0]], seen=False)]
    merged = merge_sat_states(stages, tp=1)
    assert merged["tracker"]["layers"] == [0, 1, 2, 3] and sorted(merged["keep_heads"]) == [0, 1, 2, 3]
    assert merged["tracker"]["score"]["heads"][:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert merged["tracker"]["seen"]["channels"].tolist() == [[True, True]] * 2 + [[False, False]] * 2
    assert merge_sat_states([None, None], tp=1) is None


def test_pipeline_names_become_hf_names():
    from ds_accel.engine.elastic import hf_name

    names = {"tied_modules.embed_tokens.weight": "model.embed_tokens.weight", "0.weight": "model.embed_tokens.weight",
             "1.self_attn.q_proj.weight": "model.layers.0.self_attn.q_proj.weight",
             "2.mlp.down_proj.weight": "model.layers.1.mlp.down_proj.weight", "3.weight": "model.norm.weight",
             "4.weight": "lm_head.weight",
             "model.layers.1.input_layernorm.weight": "model.layers.1.input_layernorm.weight"}
    assert {name: hf_name(name, num_layers=2) for name in names} == names


def test_check_resume_refuses_what_cannot_convert(tmp_path):
    """The decision reads the recorded layouts only: what can't be converted is one ConfigError naming the
    field; a changed global batch is named with the grad_accum that keeps it."""
    from dataclasses import asdict, replace

    from ds_accel.config import ConfigError
    from ds_accel.engine.elastic import Layout, check_resume

    saved = Layout(world=2, dp=1, tp=1, pp=2, zero_stage=0, dtype="fp32", backend="hf", micro_batch_size=4,
                   grad_accum=1)

    def checkpoint_of(layout, ranks=2):
        root = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        (root / "step000003").mkdir(parents=True)
        (root / "latest").write_text("step000003")
        (root / "step000003" / "run_state.json").write_text(json.dumps({"step": 3}))
        for rank in range(ranks):
            (root / "step000003" / f"extra_rank{rank}.pt").write_bytes(b"")
        if layout is not None:
            (root / "step000003" / "layout.json").write_text(json.dumps({"layout": asdict(layout), "adam_step": 3}))
        return root

    root = checkpoint_of(saved)
    with pytest.raises(ConfigError, match=r"^deepspeed\.config: checkpoint .* \(2 ranks \(dp1 tp1 pp2, ZeRO-0, "
                                          r"fp32\)\) is a ZeRO-0 checkpoint with tensor or pipeline parallelism, "
                                          r".*this run has 1 rank \(dp1 tp1 pp1, ZeRO-1, fp32\); resume with a ZeRO-0 "
                                          r"deepspeed\.config, autotp_size=1, parallel\.pp=2"):
        check_resume(root, replace(saved, world=1, pp=1, zero_stage=1))
    more_data_parallel = check_resume(root, replace(saved, world=4, dp=2))  # ZeRO-0: DeepSpeed's files as they are
    assert more_data_parallel.converts and more_data_parallel.target.name == "step000003.to-dp2-tp1-pp2-zero0-fp32"
    assert more_data_parallel._data_note() == (
        "global batch 4 -> 8: from step 3 on the epoch's sample order is cut into batches of 8, so samples of this "
        "epoch may repeat or be skipped (make optim.micro_batch_size x optim.grad_accum x 2 data-parallel ranks = 4 "
        "to keep it)")
    megatron = replace(saved, pp=1, tp=2, zero_stage=1, backend="megatron")
    with pytest.raises(ConfigError, match=r"^parallel\.tp: .* model\.backend megatron, whose checkpoints resume "
                                          r"only on their own layout, .*run on 2 ranks with parallel\.tp=2 and a "
                                          r"ZeRO-1"):
        check_resume(checkpoint_of(megatron), replace(megatron, world=1, dp=1, tp=1))
    with pytest.raises(ConfigError, match=r"^--resume: .* records no layout \(it predates elastic resume\) and was "
                                          r"written on 2 ranks, this run has 1; resume it on 2 ranks"):
        check_resume(checkpoint_of(None), replace(saved, world=1, pp=1))
    one = replace(saved, world=1, dp=1, tp=1, pp=1, zero_stage=1)
    assert check_resume(checkpoint_of(None, ranks=1), one).converts is False
    assert check_resume(tmp_path / "none", one) is None
    doubled = check_resume(checkpoint_of(replace(saved, world=2, dp=2, pp=1, zero_stage=1)),
                           replace(one, micro_batch_size=4))
    assert doubled._data_note().endswith("(set optim.grad_accum=2 to keep it)")
