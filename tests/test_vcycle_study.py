"""The V-cycle study runner's pure parts on synthetic metrics rows (the runner itself is checked end to end
by running it on a short tiny config: ``ds-accel vcycle-study --tokens-per-param 0.5 --seeds 2``)."""

import os

import pytest

from ds_accel.vcycle_study import CONTROL, VCYCLE, method_config, summarize, transition_costs, with_steps


def _rows(losses, transition_at=None, evals=()):
    rows = []
    for step, loss in enumerate(losses, 1):
        row = {"step": step, "loss": loss, "flops": 10.0 * step, "wall_s": float(step)}
        if step in evals:
            row["val_loss"] = loss + 0.5
        rows.append(row)
        if step == transition_at:
            rows.append({"step": step, "transition": "coalesce", "level": 2})
    return rows


def test_transition_cost_is_the_jump_of_the_gap_to_dense_on_the_same_steps():
    """Dense's loss falls by 0.1 a step. The V-cycle runs 0.2 above it for steps 1-6, coalesces after step 6,
    and its first step at level 2 (step 7) is 0.5 above dense: the gap grew by 0.3. Its last evaluation before
    the transition is at step 4 (val 1.9 + 0.5 at 40 FLOPs), where dense's validation curve (val 2.4 at step 2,
    20 FLOPs; 1.8 at step 8, 80 FLOPs) reads linearly 2.4 - 0.6 * (40 - 20) / 60 = 2.2."""
    dense = _rows([2.0 - 0.1 * t for t in range(10)], evals=(2, 8))
    vc = _rows([2.2 - 0.1 * t for t in range(6)] + [1.9, 1.6, 1.5, 1.4], transition_at=6, evals=(4,))
    (cost,) = transition_costs(vc, dense)
    assert cost["step"] == 6 and cost["transition"] == "coalesce"
    assert cost["gap_before"] == pytest.approx(0.2) and cost["gap_after"] == pytest.approx(0.5)
    assert cost["cost"] == pytest.approx(0.3)
    assert cost["val_before"] == pytest.approx(2.4) and cost["dense_val_same_flops"] == pytest.approx(2.2)


def test_summary_ratios_are_per_seed_against_that_seeds_dense():
    """Seed 0: dense ends at val 1.5 after 100 FLOPs; the method reaches 1.5 halfway between its evaluations
    at 20 (val 2.0) and 40 (val 1.0) FLOPs, i.e. at 30: ratio 0.3. Seed 1 never reaches its dense's 0.5."""
    def run(curve):
        return {"result": {"val_loss": curve[-1][2], "flops": curve[-1][0], "wall_s": curve[-1][1], "step": 4},
                "curve": curve, "rows": []}

    dense = [run([(50.0, 5.0, 2.0), (100.0, 10.0, 1.5)]), run([(50.0, 5.0, 1.0), (100.0, 10.0, 0.5)])]
    method = [run([(20.0, 2.0, 2.0), (40.0, 4.0, 1.0)]), run([(20.0, 2.0, 2.0), (40.0, 4.0, 1.0)])]
    summary = summarize({"dense": dense, "m": method})
    ratio = summary["m"]["flops_to_dense_final"]
    assert (ratio["mean"], ratio["n"], ratio["of"]) == (pytest.approx(0.3), 1, 2)
    assert summary["m"]["final_val_loss"]["min"] == 1.0
    assert summary["m"]["vs_dense"]["max"] == pytest.approx(1.0 / 0.5 - 1)


def test_configs_of_the_methods():
    base = {"optim": {"lr": 1e-3}, "run": {}}
    control = method_config(base, CONTROL, small_init="/x")
    assert control["model"]["pretrained"] == "/x" and control["optim"]["lr"] == 1e-3 * VCYCLE["lr_scale"][1]
    warm = with_steps(method_config(base, "vcycle+warmup"), 1000)
    assert warm["multilevel"]["transition_warmup"] == 20 and warm["optim"]["warmup_steps"] == 20
    assert warm["run"]["total_steps"] == 1000 and warm["run"]["eval_every"] == 25
    assert method_config(base, "vcycle-share25")["multilevel"]["step_fractions"] == [0.1, 0.25, 0.65]
    width = method_config(base, "vcycle-width")["multilevel"]
    assert (width["depth_factor"], width.get("width_factor"), width["lr_schedule"]) == (1, None, "authors")  # 2


def test_runs_side_by_side_each_on_its_own_cores_longest_first(monkeypatch, tmp_path):
    """``--jobs 2``: every planned run trains once, pinned to a core set no other running run holds,
    the run with the most steps starts first, and each result comes back under its (seed, method)."""
    import threading
    import time

    from ds_accel import vcycle_study

    held, seen, started, lock = [], [], [], threading.Lock()

    def fake_run_method(name, cfg, out, reuse, cpus):
        with lock:
            assert not any(cpus & other for other in held), "two running runs share a core"
            held.append(cpus)
            seen.append(frozenset(cpus))
            started.append(name)
        time.sleep(0.05)
        run_dir = out / name
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
        with lock:
            held.remove(cpus)
        return {"result": {"name": name, "seed": cfg["run"]["seed"]}, "curve": [], "run_dir": run_dir}

    monkeypatch.setattr(vcycle_study, "run_method", fake_run_method)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7})  # this process's cores
    plan = [(seed, method, {"run": {"seed": seed, "total_steps": steps}})
            for seed in (0, 1) for method, steps in (("dense", 10), ("dense-small", 40), ("vcycle", 20))]
    done = vcycle_study.run_all(plan, tmp_path, jobs=2)
    assert sorted(done) == sorted((seed, method) for seed, method, _ in plan)
    assert all(run["result"] == {"name": m, "seed": s} and run["rows"] == [{"step": 1, "loss": 1.0}]
               for (s, m), run in done.items())
    assert started[:2] == ["dense-small", "dense-small"] and started[-2:] == ["dense", "dense"]
    assert set(seen) == {frozenset({4, 5}), frozenset({6, 7})}


def test_a_run_pinned_by_train_child_runs_on_those_cores_only(monkeypatch, tmp_path):
    """``train_child(cpus=...)`` pins the child (seen from inside it) and sends its output to the run's
    train.log; a failing child raises, naming that log. The child here stands in for ``ds-accel train``."""
    import subprocess
    import sys

    from ds_accel.bench import runs

    core = min(os.sched_getaffinity(0))
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!/bin/sh\nsleep 0.5\nexec {sys.executable} -c "
                    "\"import os, sys; print(sorted(os.sched_getaffinity(0))); sys.exit(int(os.environ['FAIL']))\"\n")
    fake.chmod(0o755)
    monkeypatch.setattr(runs.sys, "executable", str(fake))
    monkeypatch.setenv("FAIL", "0")
    runs.train_child({"run": {}}, tmp_path / "run", cpus={core})
    assert (tmp_path / "run" / "train.log").read_text().split() == [f"[{core}]"]
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(subprocess.CalledProcessError, match="returned non-zero"):
        runs.train_child({"run": {}}, tmp_path / "run2", cpus={core})
