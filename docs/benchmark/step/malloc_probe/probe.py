"""Where the 7B-layer SAT step's time goes on CPU (r=0.5, 2048 tokens, adam)."""
import sys, time, json, torch
from ds_accel import step_bench as sb
from ds_accel.sat import omit
from ds_accel.sat.omit import resolve
shape = sb.catalogue()["llama2-7b-layer-2048"]
res = sb.bench_shape(shape, [0.5], 3, torch.device("cpu"), torch.float32, policies=("adam",))
print(json.dumps(res["adam"]["0.5"]), flush=True)
if len(sys.argv) > 1:
    model, data = sb._build(shape, torch.device("cpu"), torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sel = {r: sb._selection(model, r, "kv_group") for r in (0.0, 0.5)}
    def step(r):
        kh, kc = sel[r]
        with omit(model, kh, kc, selection=resolve(model, kh, kc)):
            model(data).backward()
        opt.step(); opt.zero_grad(set_to_none=True)
    step(0.0); step(0.5)
    for r in (0.0, 0.5):
        with torch.profiler.profile() as prof:
            step(r)
        print(f"== rate {r}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14), flush=True)
