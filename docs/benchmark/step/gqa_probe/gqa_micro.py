"""SAT's attention on the `small` preset's kept heads at r = 0.5 (kv_group granularity: 4 query heads on
2 KV heads, head_dim 32, 8 x 128 tokens): forward + backward of SDPA after an index_select copy of each
query head's KV head ("index", SAT before), after HF's repeat_kv expand ("expand"), and with SDPA's own
GQA ("gqa", what HF's dense attention uses without a mask). Median ms of 300, three rounds.

    .venv/bin/python docs/benchmark/step/gqa_probe/gqa_micro.py
"""
import time

import torch
import torch.nn.functional as F

b, s, d, nkv, g = 8, 128, 32, 2, 2
q_to_kv = torch.arange(nkv).repeat_interleave(g)


def median_ms(mode: str, n: int = 300) -> float:
    torch.manual_seed(0)
    q = torch.randn(b, nkv * g, s, d, requires_grad=True)
    k, v = (torch.randn(b, nkv, s, d, requires_grad=True) for _ in range(2))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        kk, vv = k, v
        if mode == "index":
            kk, vv = k.index_select(1, q_to_kv), v.index_select(1, q_to_kv)
        elif mode == "expand":
            kk, vv = (t[:, :, None].expand(b, nkv, g, s, d).reshape(b, nkv * g, s, d) for t in (k, v))
        F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=mode == "gqa").sum().backward()
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2] * 1e3


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
for _ in range(3):
    print({mode: round(median_ms(mode), 3) for mode in ("index", "expand", "gqa")})
