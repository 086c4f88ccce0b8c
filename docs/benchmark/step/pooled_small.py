"""The `small` preset's SAT speedup at r = 0.5 (`adam`) pooled over every committed step-benchmark run that
kept its rounds: each round's dense time over SAT's, the median over all rounds, and a bootstrap 95%
interval of that median (2,000 resamples, seed 0). The runs are at different commits (SAT's code changed
between them by a few percent at most) and in different phases of the machine; the pooled median says what
one run of 15 rounds cannot: where the speed sits against the 1.6x target. Only runs of the sliced step
alone are pooled: from commit fddc317 on, SAT's step also records importance, as the trainer's does
(``sat_records_importance`` in the JSON; run_0519utc, the first, started before that field existed).

    .venv/bin/python docs/benchmark/step/pooled_small.py > docs/benchmark/step/pooled_small.txt
"""
import json
import random
import statistics
from pathlib import Path

here = Path(__file__).parent
RECORDING = {"run_0519utc"}  # recorded importance before the JSON said so
pooled, limits = [], set()
for path in sorted(here.glob("run_*/sat_step.json")) + [here / "sat_step.json"]:
    run = json.loads(path.read_text())
    if run.get("sat_records_importance") or path.parent.name in RECORDING:
        print(f"{path.relative_to(here)}: SAT's step records importance, left out")
        continue
    rate = run["shapes"]["small adam"]["rates"]["0.5"]
    if "dense_ms_rounds" not in rate:
        print(f"{path.relative_to(here)}: no rounds kept (older format), left out")
        continue
    ratios = [d / s for d, s in zip(rate["dense_ms_rounds"], rate["sat_ms_rounds"])]
    pooled += ratios
    limits.add(round(rate["flops_limit_speedup"], 4))
    print(f"{path.relative_to(here)}: {len(ratios)} rounds, median {statistics.median(ratios):.3f}x")
(limit,) = limits
random.seed(0)
medians = sorted(statistics.median(random.choices(pooled, k=len(pooled))) for _ in range(2000))
median = statistics.median(pooled)
print(f"pooled: {len(pooled)} rounds, median {median:.3f}x ({median / limit:.1%} of the {limit}x FLOPs limit), "
      f"bootstrap 95% interval {medians[49]:.3f}-{medians[1949]:.3f}x")
