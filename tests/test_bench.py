"""ds-accel bench: cost to target, seed aggregation and results.json's schema, the base model's cache key,
the stdlib corpus, and the scenarios' plan of runs. No training here (the bench's runs are processes of
the trainer, tested elsewhere); ``ds-accel bench --quick`` runs the whole thing."""
import json

import pytest

from ds_accel.bench import base as bench_base
from ds_accel.bench.report import compare, markdown, plot, stats, summarize, with_ratios
from ds_accel.bench.runs import cost_to_reach, merge
from ds_accel.bench.scenarios import EQUAL_STEPS, Scenario, load_config
from ds_accel.config import ConfigError, DataConfig, from_dict
from ds_accel.data import load_texts, stdlib_corpus


def test_cost_to_reach_interpolates_between_evaluations():
    curve = [(10.0, 1.0, 5.0), (20.0, 3.0, 4.0), (30.0, 4.0, 3.0)]
    # 3.5 lies halfway from 4.0 to 3.0: FLOPs 25, wall-clock 3.5
    assert cost_to_reach(curve, 3.5) == pytest.approx((25.0, 3.5))
    assert cost_to_reach(curve, 4.0) == (20.0, 3.0)
    assert cost_to_reach(curve, 6.0) == (10.0, 1.0)  # the first evaluation is already below
    assert cost_to_reach(curve, 2.9) is None
    # the first time counts, even if the curve rises again afterwards
    assert cost_to_reach([(1.0, 1.0, 4.0), (2.0, 2.0, 3.0), (3.0, 3.0, 3.5)], 3.5) == pytest.approx((1.5, 1.5))


def test_stats_and_range_comparison():
    assert stats([1.0, None, 3.0]) == {"mean": 2.0, "min": 1.0, "max": 3.0, "n": 2}
    assert stats([None]) == {"mean": None, "min": None, "max": None, "n": 0}
    dense = stats([3.0, 3.2])
    assert compare(stats([2.8, 2.9]), dense) == "lower"
    assert compare(stats([3.3, 3.4]), dense) == "higher"
    assert compare(stats([2.9, 3.1]), dense) == "overlap"
    assert compare(stats([2.0]), stats([3.0])) == "one seed"  # no range to separate


def run(seed, curve, steps=4):
    """A per-seed run record as scenarios.execute returns it; the final loss is the curve's last."""
    return {"seed": seed, "steps": steps, "final_val_loss": curve[-1][2], "source_val_loss": 2.0 + seed,
            "flops": curve[-1][0], "wall_s": curve[-1][1], "tokens": 100, "peak_mem_mb": 50.0 + seed,
            "process_s": 9.0, "curve": curve}


DENSE = [run(0, [(10.0, 2.0, 5.0), (20.0, 4.0, 4.0)]), run(1, [(10.0, 2.0, 5.2), (20.0, 4.0, 4.2)])]
# seed 0 reaches dense's 4.0 halfway between its evaluations (FLOPs 7.5 of dense's 20); seed 1 reaches
# 4.2 at its second evaluation; "slow" never reaches seed 0's target
FAST = [run(0, [(5.0, 1.0, 4.5), (10.0, 3.0, 3.5)], 6), run(1, [(5.0, 2.0, 4.4), (10.0, 4.0, 4.2)], 6)]
SLOW = [run(0, [(10.0, 2.0, 5.5), (20.0, 4.0, 4.1)]), run(1, [(10.0, 2.0, 5.0), (20.0, 4.0, 4.2)])]


def test_ratios_pair_each_seed_with_dense_of_the_same_seed():
    fast = with_ratios(FAST, DENSE)
    assert [r["target_val_loss"] for r in fast] == [4.0, 4.2]
    assert fast[0]["flops_ratio_to_target"] == pytest.approx(7.5 / 20) and fast[0]["time_ratio_to_target"] == pytest.approx(2.0 / 4)
    assert fast[1]["flops_ratio_to_target"] == pytest.approx(10 / 20) and fast[1]["time_ratio_to_target"] == pytest.approx(1.0)
    assert fast[0]["vs_dense"] == pytest.approx(3.5 / 4.0 - 1)
    slow = with_ratios(SLOW, DENSE)
    assert slow[0]["flops_ratio_to_target"] is None and slow[1]["flops_ratio_to_target"] == pytest.approx(1.0)


def executed():
    return {"plan": {"equal_compute": {"dense": 4, "fast": 6, "slow": 4}, "equal_steps": {"dense": 4, "slow": 4}},
            "runs": {"equal_compute": {"dense": DENSE, "fast": FAST, "slow": SLOW},
                     "equal_steps": {"dense": DENSE, "slow": SLOW}}}


def test_results_json_schema_and_figures():
    summary = summarize("cpt", [0, 1], executed(), {"machine": "test"})
    json.dumps(summary)  # serialisable
    assert summary["scenario"] == "cpt" and summary["seeds"] == [0, 1]
    assert summary["target_val_loss"] == pytest.approx(4.1)
    fast, slow, dense = (summary["methods"][m] for m in ("fast", "slow", "dense"))
    for entry in (fast, slow, dense):
        assert {"final_val_loss", "source_val_loss", "flops_ratio_to_target", "time_ratio_to_target",
                "runs"} <= set(entry)
        assert set(entry["final_val_loss"]) >= {"mean", "min", "max"} and len(entry["runs"]) == 2
    assert fast["final_val_loss"] == {"mean": pytest.approx(3.85), "min": 3.5, "max": 4.2, "n": 2}
    assert fast["flops_ratio_to_target"]["max"] == pytest.approx(0.5) and fast["flops_gain"]
    assert fast["final_val_loss_vs_dense"] == "overlap"  # 4.2 (seed 1) is not below dense's 4.0
    assert slow["flops_ratio_to_target"]["n"] == 1 and not slow["flops_gain"]
    assert slow["runs"][0]["flops_ratio_to_target"] is None
    assert dense["flops_ratio_to_target"] == {"mean": 1.0, "min": 1.0, "max": 1.0, "n": 2} and not dense["flops_gain"]
    assert dense["source_val_loss"]["mean"] == 2.5
    assert set(summary["equal_steps"]["methods"]) == {"dense", "slow"}
    assert "source_val_loss" not in summarize("scratch", [0, 1], executed(), {})["methods"]["dense"]


def test_markdown_and_plot(tmp_path):
    summary = summarize("cpt", [0, 1], executed(), {"base": {"target_val_loss": 6.0, "source_val_loss": 3.0}})
    text = markdown(summary, "# header")
    assert "| slow | 4 | 4.150 [4.100, 4.200] |" in text and "(1/2 reached)" in text
    assert "0.44 [0.38, 0.50] gain" in text and "Equal steps:" in text and "base-corpus val loss 3.0000" in text
    assert plot(summary, tmp_path / "p.png", "t").stat().st_size > 1000


def test_base_cache_key_ignores_plumbing_only():
    cfg = load_config("bench_cpt_base")
    key = bench_base.config_hash(cfg)
    assert bench_base.config_hash(merge(cfg, {"run": {"output_dir": "x", "progress": False, "save_every": 7}})) == key
    assert bench_base.config_hash(dict(reversed(list(cfg.items())))) == key
    assert bench_base.config_hash(merge(cfg, {"optim": {"lr": 1e-4}})) != key
    assert bench_base.config_hash(merge(cfg, {"run": {"seed": 1}})) != key
    from_dict(cfg)  # the committed base config is valid


def test_base_is_trained_once_and_resumed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench_base, "train_child", lambda cfg, run_dir, resume: calls.append((cfg, run_dir, resume)))
    cfg = {"run": {"total_steps": 5}, "model": {"preset": "tiny"}}
    run_dir = bench_base.pretrained_base(cfg, tmp_path)
    assert run_dir == tmp_path / bench_base.config_hash(cfg) and len(calls) == 1
    assert calls[0][0]["run"] == {"total_steps": 5, "output_dir": str(run_dir), "export": True} and not calls[0][2]
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step000002")
    bench_base.pretrained_base(cfg, tmp_path)
    assert calls[1][2]  # an interrupted pretraining resumes
    (run_dir / "result.json").write_text("{}")
    assert bench_base.pretrained_base(cfg, tmp_path) == run_dir and len(calls) == 2  # cached: no training


def test_stdlib_corpus_chooses_sources_and_orders_them_by_path_hash(tmp_path):
    import hashlib

    files = {"a.py": "x = 1\n", "pkg/b.py": "y = 2\n", "pkg/test/c.py": "t = 0\n", "site-packages/d.py": "d = 0\n",
             "idlelib/idle_test/e.py": "e = 0\n", "notes.txt": "no\n", "pkg/tests/f.py": "f = 0\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "latin.py").write_bytes(b"# -*- coding: latin-1 -*-\ns = '\xe9'\n")  # PEP 263 cookie
    kept = ["a.py", "pkg/b.py", "latin.py"]
    order = sorted(kept, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    expected = {"a.py": "x = 1\n", "pkg/b.py": "y = 2\n", "latin.py": "# -*- coding: latin-1 -*-\ns = '\u00e9'\n"}
    assert stdlib_corpus(tmp_path) == [expected[n] for n in order]


def test_stdlib_corpus_of_this_interpreter():
    texts = load_texts(DataConfig(corpus="stdlib", max_chars=200_000))
    assert 200_000 <= sum(len(t) + 1 for t in texts) < 200_000 + max(map(len, texts)) + 1
    assert any("def " in t for t in texts)
    whole = [t for t in stdlib_corpus() if t.strip()]  # empty __init__.py files are no documents
    assert texts == whole[:len(texts)] and len(whole) > 300
    with pytest.raises(ConfigError, match="data.corpus: 'stdlib' applies only when data.train_files is empty"):
        from_dict({"data": {"corpus": "stdlib", "train_files": [__file__]}})


def test_plan_lays_methods_over_equal_compute_and_equal_steps(monkeypatch):
    monkeypatch.setattr(Scenario, "vocab_size", lambda self: 2000)
    methods = ["dense", "sat", "sat-random", "vcycle", "vcycle+sat", "sat-freeze"]
    scenario = Scenario("scratch", merge(load_config("bench"), {"model": {"preset": "tiny"}}), methods)
    plan = scenario.plan()
    assert plan["equal_compute"]["dense"] == 600 and set(plan["equal_steps"]) == set(EQUAL_STEPS)
    assert "sat-freeze" not in plan["equal_compute"]  # same cost per step as sat: equal steps only
    assert all(steps == 600 for steps in plan["equal_steps"].values())
    # cheaper steps buy more of them; random and activation SAT cost the same
    assert plan["equal_compute"]["sat"] > 600 and plan["equal_compute"]["vcycle"] > 600
    assert plan["equal_compute"]["sat-random"] == plan["equal_compute"]["sat"]
    assert plan["equal_compute"]["vcycle+sat"] > plan["equal_compute"]["sat"]
    with pytest.raises(ConfigError, match="--methods: sat-weight not in the scratch scenario"):
        Scenario.build("scratch", methods=["sat-weight"])
