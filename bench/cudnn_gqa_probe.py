"""Does torch's cuDNN attention take fewer K/V heads than query heads, forward and backward, and what does
passing them unexpanded save? A feasibility probe (GPU only; prints, writes no result file): for one causal
sequence of 8K and 128K tokens at the Llama-8B attention shape (32 query heads, 8 KV heads of 128), the aten
ops seqmesh calls (``kernels/attention.py``) with K/V repeated for every query head and with their own heads,
their outputs and gradients compared and the peak memory each call adds per token; then the same through
``F.scaled_dot_product_attention(enable_gqa=True)`` on the cuDNN backend. Log of the run on an H100:
``bench/results/probe_cudnn_gqa_h100.log``.

    python bench/cudnn_gqa_probe.py
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

dev, H, Hkv, D = "cuda", 32, 8, 128
g = H // Hkv
sc = D ** -0.5


def bhsd(x):  # [S, H, D] -> [1, H, S, D] view, as seqmesh passes it
    return x.unsqueeze(0).transpose(1, 2)



def main() -> None:
    for n in (8192, 131072):
        torch.manual_seed(0)
        q = torch.randn(n, H, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(n, Hkv, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(n, Hkv, D, device=dev, dtype=torch.bfloat16)
        dout = torch.randn(n, H, D, device=dev, dtype=torch.bfloat16)
        ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        rng = (torch.zeros(2, dtype=torch.uint64, device=dev), torch.zeros((), dtype=torch.uint64, device=dev))
        for name, kk, vv in (("expanded", ke, ve), ("native", k, v)):
            try:
                torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
                t = time.perf_counter()
                res = torch.ops.aten._scaled_dot_product_cudnn_attention(bhsd(q), bhsd(kk), bhsd(vv), None, True, 0.0,
                                                                         True, False, scale=sc)
                out, lse = res[0], res[1]
                grads = torch.ops.aten._cudnn_attention_backward(bhsd(dout), bhsd(q), bhsd(kk), bhsd(vv), out, lse,
                                                                 rng[0], rng[1], None, None, None, n, n, 0.0, True,
                                                                 scale=sc)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t
                peak = (torch.cuda.max_memory_allocated() - base) / n / 1e3
                dk = grads[1][0].transpose(0, 1)
                if dk.shape[1] != Hkv:
                    dk = dk.reshape(n, Hkv, g, D).sum(2)
                if name == "expanded":
                    ref_out, ref_dq, ref_dk = out, grads[0], dk
                    print(n, name, "ok", f"{dt:.3f}s", f"peak {peak:.1f} KB/token", flush=True)
                else:
                    print(n, name, "ok", f"{dt:.3f}s", f"peak {peak:.1f} KB/token", "dk heads", grads[1].shape,
                          "out diff", (out.float() - ref_out.float()).abs().max().item(),
                          "dq diff", (grads[0].float() - ref_dq.float()).abs().max().item(),
                          "dk diff", (dk.float() - ref_dk.float()).abs().max().item(), flush=True)
            except Exception as e:
                print(n, name, "FAILED", type(e).__name__, str(e)[:300], flush=True)
        # the public API
        try:
            qq, kk2, vv2 = (bhsd(x).detach().requires_grad_() for x in (q, k, v))
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = F.scaled_dot_product_attention(qq, kk2, vv2, is_causal=True, enable_gqa=True, scale=sc)
                o.backward(bhsd(dout))
            torch.cuda.synchronize()
            diff = (o.detach().float() - ref_out.float()).abs().max().item()
            print(n, "sdpa enable_gqa cudnn ok, peak", (torch.cuda.max_memory_allocated() - base) / n / 1e3, "KB/token",
                  "out diff", diff, flush=True)
        except Exception as e:
            print(n, "sdpa enable_gqa cudnn FAILED", type(e).__name__, str(e)[:300], flush=True)
        del q, k, v, dout, ke, ve
        torch.cuda.empty_cache()
    print(torch.__version__, torch.backends.cudnn.version())


if __name__ == "__main__":
    main()
