"""The `small` preset's SAT speedup at r = 0.5 (`adam`) pooled over every committed step-benchmark run that
kept its rounds: each round's dense time over SAT's, the median over all rounds, and a bootstrap 95%
interval of that median (2,000 resamples, seed 0). The runs are at different commits (SAT's code changed
between them by a few percent at most) and in different phases of the machine; the pooled median says what
one run of 15 rounds cannot: where the speed sits against the 1.6x target. Two pools, never mixed: the runs
of the sliced step alone, and the runs whose SAT step also records importance, as the trainer's does (from
commit fddc317 on: ``sat_records_importance`` in the JSON; run_0519utc, the first, started before that
field existed and had a test run beside it, so it is left out of both).

    .venv/bin/python docs/benchmark/step/pooled_small.py > docs/benchmark/step/pooled_small.txt
"""
import json
import random
import statistics
from pathlib import Path

here = Path(__file__).parent
CONTAMINATED = {"run_0519utc"}  # a 9-second test ran beside it (its README)
pools: dict[str, list[float]] = {"the sliced step alone": [], "recording importance": []}
limits = set()
for path in sorted(here.glob("run_*/sat_step.json")) + [here / "sat_step.json"]:
    if path.parent.name in CONTAMINATED:
        print(f"{path.relative_to(here)}: a test ran beside it, left out")
        continue
    run = json.loads(path.read_text())
    rate = run["shapes"]["small adam"]["rates"]["0.5"]
    if "dense_ms_rounds" not in rate:
        print(f"{path.relative_to(here)}: no rounds kept (older format), left out")
        continue
    pool = "recording importance" if run.get("sat_records_importance") else "the sliced step alone"
    ratios = [d / s for d, s in zip(rate["dense_ms_rounds"], rate["sat_ms_rounds"])]
    pools[pool] += ratios
    limits.add(round(rate["flops_limit_speedup"], 4))
    print(f"{path.relative_to(here)}: {pool}, {len(ratios)} rounds, median {statistics.median(ratios):.3f}x")
(limit,) = limits
for pool, ratios in pools.items():
    random.seed(0)
    medians = sorted(statistics.median(random.choices(ratios, k=len(ratios))) for _ in range(2000))
    median = statistics.median(ratios)
    print(f"pooled, {pool}: {len(ratios)} rounds, median {median:.3f}x ({median / limit:.1%} of the {limit}x "
          f"FLOPs limit), bootstrap 95% interval {medians[49]:.3f}-{medians[1949]:.3f}x")
