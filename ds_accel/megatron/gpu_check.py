"""The Megatron backend on one CUDA GPU: what the CPU tests cannot reach, in one short run.

``python -m ds_accel.megatron.gpu_check --out result.json`` checks, on CUDA (NCCL, no CPU shims):
the shims stay off; ``gpt_from_hf`` logits against HF Llama in fp32 (TF32 off); SAT's sliced step
(loss and gradients) against SAT on the HF model; a DeepSpeed ZeRO-1 bf16 engine of each backend with
SAT (``SATController`` with the Megatron or the HF model family) for a few steps from the same seeded
weights and tokens; the step time of both backends, dense and SAT at rate 0.5, on the ``base`` preset;
and the host synchronisations of one whole step of each engine (4 layers in ``tiny``, 12 in ``base``).
It prints and writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SELECTION = ({0: [0, 1, 4, 6], 1: [0, 2]}, {0: list(range(0, 96, 3)), 1: list(range(5, 30))})


def _small_llama(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=tied,
                       attention_bias=False, mlp_bias=False)
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(conf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = name.endswith("norm.weight")
            p.copy_(torch.randn(p.shape) * (0.3 if norm else 0.05) + (1.0 if norm else 0.0))
    return conf, model.cuda()


def _equivalence() -> dict:
    from ..sat import ImportanceTracker, omit
    from . import MegatronCausalLM, MegatronParams, gpt_from_hf

    conf, hf = _small_llama()
    gpt = gpt_from_hf(hf)
    lm = MegatronCausalLM(gpt, conf)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        logits = (lm(input_ids=x).logits - hf(input_ids=x).logits).abs().max().item()
    keep = [{k: torch.tensor(v) for k, v in d.items()} for d in SELECTION]
    out = {"logits_max_abs_diff_fp32": logits}
    grads = {}
    for name, model, target in (("hf", hf, hf), ("megatron", lm, gpt)):
        model.zero_grad()
        tracker = ImportanceTracker(range(2), 8, 4, 96, 8, device="cuda")
        with omit(target, *keep, tracker):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
        out[f"sat_loss_{name}"] = loss.item()
        if name == "hf":
            grads["hf"] = {n: p.grad for n, p in hf.named_parameters()}
        else:
            params = MegatronParams.of(gpt, conf)
            grads["megatron"] = {n: params.assemble(n, p.grad) for n, p in params.local.items()}
    out["sat_grad_max_rel_diff"] = max(((grads["megatron"][n] - g).abs().max() / g.abs().max()).item()
                                       for n, g in grads["hf"].items())
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _engine(backend: str, preset: str, seq: int, micro: int, rate: float, steps: int, total: int) -> dict:
    """``steps`` optimizer steps of a ZeRO-1 bf16 engine with SAT at ``rate`` (0: dense); losses and the
    mean step time of the last half."""
    from .. import runtime
    from ..config import from_dict
    from ..engine.build import free_engine, make_engine, new_model, resolve_ds_config
    from ..engine.sat import HF_LLAMA, SATController
    from ..models import llama_config
    from .engine import MEGATRON
    from .engine import new_model as new_megatron_model

    root = Path(__file__).resolve().parents[2]
    cfg = from_dict({"run": {"total_steps": total, "output_dir": "/tmp/gpu_check"},
                     "model": {"preset": preset, "backend": backend, "dtype": "bf16"},
                     "optim": {"micro_batch_size": micro, "warmup_steps": 1, "lr": 1e-3},
                     "sat": {"enabled": rate > 0, "omission_rate": max(rate, 0.0), "schedule": "constant"},
                     "data": {"seq_len": seq},
                     "deepspeed": {"config": str(root / "ds_configs" / "zero1.json")}})
    ds = resolve_ds_config(cfg, 1)
    conf = llama_config(preset, 2000)
    model = new_megatron_model(conf, cfg, 0) if backend == "megatron" else new_model(conf, ds, 0)
    engine = make_engine(model, cfg, ds)
    family = MEGATRON if backend == "megatron" else HF_LLAMA
    sat = SATController(cfg.sat, engine.module, total, 0, family=family) if rate > 0 else None
    if sat is not None:
        sat.attach(engine.optimizer)
    gen = torch.Generator().manual_seed(3)
    losses, times = [], []

    def step_fn(step: int, x: torch.Tensor) -> torch.Tensor:
        if sat is not None:
            sat.begin_step(step)
        with sat.omitting() if sat is not None else torch.enable_grad():
            loss = engine(input_ids=x, labels=x, use_cache=False).loss
            engine.backward(loss)
            engine.step()
        if sat is not None:
            sat.end_step()
        return loss

    for step in range(steps):
        x = torch.randint(0, conf.vocab_size, (micro, seq), generator=gen).to(runtime.device())
        _sync()
        start = time.perf_counter()
        loss = step_fn(step, x)
        _sync()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    # one more step, counting the times the host waits for the device (dense and SAT alike); a count that
    # grew with the layers would mean a wait per layer
    x = torch.randint(0, conf.vocab_size, (micro, seq), generator=gen).to(runtime.device())
    syncs = runtime.host_syncs(lambda: step_fn(steps, x), torch.device(runtime.device()))
    free_engine(engine)
    return {"losses": losses, "step_s": sum(times[steps // 2:]) / (steps - steps // 2),
            "layers": conf.num_hidden_layers, "host_syncs_per_step": syncs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from .. import runtime
    from . import _cpu, init_parallel

    init_parallel(1)
    with runtime.no_tf32():
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shims": _cpu.install(),
                  "equivalence": _equivalence()}
    torch.backends.cuda.matmul.allow_tf32 = True
    result["training_tiny"] = {backend: _engine(backend, "tiny", 64, 4, 0.5, 6, 12) for backend in ("hf", "megatron")}
    base = {f"{backend}_rate{rate}": _engine(backend, "base", 1024, 8, rate, 10, 40)
            for backend in ("hf", "megatron") for rate in (0.0, 0.5)}
    result["timing_base_seq1024_batch8"] = {name: run["step_s"] for name, run in base.items()}
    result["host_syncs_per_step"] = {f"{preset}_{name}": run["host_syncs_per_step"] for preset, runs in
                                     (("tiny", result["training_tiny"]), ("base", base)) for name, run in runs.items()}
    text = json.dumps(result, indent=1)
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
