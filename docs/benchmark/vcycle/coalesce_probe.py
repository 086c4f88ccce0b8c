"""What the V-cycle's operators cost in loss, taken apart (python docs/benchmark/vcycle/coalesce_probe.py).

The study's transition table shows the small level starting far above dense. This probe asks which
operator does it, with no training in between: the tiny preset is trained as the V-cycle's first
stage (plain AdamW, LR warmed up linearly to the study's peak over the stage, the study's batch and
sequence length; 908 steps, where the study's V-cycle coalesces) and then coalesced in width only, in
depth only and in both, with either pairing; the de-coalesced round trip and its interpolation with
the large model (alpha 0.25 / 0.5) show what de-coalescing + interpolation cost on their own. Every
loss is the mean over the same 256 validation sequences; ln(vocab) is the uniform prediction's loss.
Writes coalesce_probe.json and .md beside this file.
"""

import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from ds_accel.config import from_dict
from ds_accel.data import prepare
from ds_accel.models import initial_value, model_config
from ds_accel.multilevel.operators import coalesce, decoalesce, interpolate
from ds_accel.vcycle_study import BASE, merge

STEPS = 908  # the study's V-cycle stage 1 at budget 1 (10% of 9,077 steps)
HERE = Path(__file__).parent


@torch.no_grad()
def val_loss(model: LlamaForCausalLM, val: torch.Tensor) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in val.split(16)]
    model.train()
    return sum(losses) / len(losses)


def main(steps: int = STEPS, seed: int = 0) -> None:
    torch.set_num_threads(1)
    cfg = from_dict(merge(BASE, {"model": {"preset": "tiny"}, "data": {"corpus": "kjv"}}))
    corpus = prepare(cfg.data)
    conf = model_config(cfg.model, corpus.vocab_size)
    model = LlamaForCausalLM(conf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(initial_value(name, p.shape, conf, seed))
    val = corpus.val[:256]
    peak, batch = cfg.optim.lr, cfg.optim.micro_batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=peak, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=cfg.optim.weight_decay)
    g = torch.Generator().manual_seed(seed)
    rows = [{"model": "untrained", "val_loss": val_loss(model, val)}]
    start = time.time()
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = peak * (t + 1) / steps  # the authors' stage 1: all warm-up, at its peak when coalescing
        ids = corpus.train[torch.randint(len(corpus.train), (batch,), generator=g)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(f"trained {steps} steps in {time.time() - start:.0f} s", file=sys.stderr)
    rows.append({"model": f"large, after {steps} steps", "val_loss": val_loss(model, val)})
    adjacent = {"hidden": "adjacent", "mlp": "adjacent", "layers": "adjacent"}  # heads: half, as GQA needs
    for label, pairing in (("half", "half"), ("adjacent (heads: half)", adjacent)):
        for width, depth in ((2, 1), (1, 2), (2, 2)):
            small = coalesce(model, width, depth, pairing)
            rows.append({"model": f"coalesced: width /{width}, depth /{depth}, pairing {label}",
                         "val_loss": val_loss(small, val)})
    small = coalesce(model, 2, 2, "half")
    back = decoalesce(small, conf, "half")
    rows.append({"model": "de-coalesced round trip (width and depth /2, half)", "val_loss": val_loss(back, val)})
    for alpha in (0.25, 0.5):
        rows.append({"model": f"interpolated with the large model, alpha {alpha}",
                     "val_loss": val_loss(interpolate(model, back, alpha), val)})
    uniform = math.log(corpus.vocab_size)
    (HERE / "coalesce_probe.json").write_text(json.dumps(
        {"steps": steps, "seed": seed, "preset": "tiny", "uniform_loss": uniform, "rows": rows}, indent=1))
    lines = [f"# Operators' cost in loss: tiny preset after {steps} steps of stage 1 (seed {seed})", "",
             f"Validation loss over 256 sequences; the uniform prediction scores ln({corpus.vocab_size}) = "
             f"{uniform:.3f}. No training between the operators.", "", "| model | val loss |", "|---|---|"]
    lines += [f"| {r['model']} | {r['val_loss']:.3f} |" for r in rows]
    (HERE / "coalesce_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
