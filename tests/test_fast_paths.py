"""The single-GPU fast paths: Liger's fused linear cross-entropy (``model.loss_kernel=liger``) and float8
linears (``model.linear_dtype=fp8``): their arithmetic and errors on CPU, their numerics on a GPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seqmesh.kernels.fused_loss import chunk_mem_const, liger_available, liger_linear_cross_entropy_sum
from seqmesh.trainer.config import ConfigError, config_from_dict
from seqmesh.trainer.float8 import check_float8_device, float8_eligible
from seqmesh.trainer.loss import token_loss_sum
from seqmesh.trainer.model import Transformer, tiny_config
from seqmesh.trainer.tiled import lm_loss_sum


def _liger_chunk(tokens: int, hidden: int, vocab: int, const: int) -> int:
    """Liger's own chunk size for ``chunk_mem_const`` (fused_linear_cross_entropy_forward)."""
    inc = -(-vocab // (const * hidden))
    return min(tokens, 1 << (math.ceil(math.log2(-(-tokens // inc)))))


@pytest.mark.parametrize("tokens,chunk", [(8192, 8192), (65536, 8192), (65536, 4096), (32768, 2048), (100, 8192)])
def test_chunk_mem_const_gives_chunks_of_about_the_asked_size(tokens: int, chunk: int) -> None:
    hidden, vocab = 2048, 128256
    got = _liger_chunk(tokens, hidden, vocab, chunk_mem_const(tokens, hidden, vocab, chunk))
    assert min(chunk, tokens) <= got <= 2 * min(chunk, tokens)  # Liger rounds up to a power of two
    assert _liger_chunk(8192, hidden, vocab, 1) == 256  # its default: the memory-bound 256-token chunks


def test_chunk_mem_const_rejects_non_positive_sizes() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        chunk_mem_const(0, 2048, 128256, 8192)


def test_liger_loss_names_the_fix_off_cuda() -> None:
    h, w = torch.randn(4, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match="model.loss_kernel=torch"):
        liger_linear_cross_entropy_sum(h, w, torch.zeros(4, dtype=torch.long), -100)
    model = Transformer(tiny_config(vocab_size=32))
    with pytest.raises(ValueError, match="loss kernel 'cut'"):
        lm_loss_sum(model, torch.randn(3, 256), torch.zeros(3, dtype=torch.long), kernel="cut")


def test_float8_selects_the_large_decoder_linears_only() -> None:
    """Llama-1B's shapes: Q, O and the MLP become float8; the 2048 -> 512 K/V projections, the LM head and
    any width that is not a multiple of 16 stay as they are."""
    assert float8_eligible(nn.Linear(2048, 2048), "model.layers.0.self_attn.q_proj")
    assert float8_eligible(nn.Linear(2048, 8192), "model.layers.0.mlp.gate_proj")
    assert float8_eligible(nn.Linear(8192, 2048), "model.layers.3._checkpoint_wrapped_module.mlp.down_proj")
    assert not float8_eligible(nn.Linear(2048, 512), "model.layers.0.self_attn.k_proj")
    assert not float8_eligible(nn.Linear(2048, 128256), "lm_head")
    assert not float8_eligible(nn.Linear(2048, 8200), "model.layers.0.mlp.up_proj")
    assert not float8_eligible(nn.RMSNorm(2048), "model.norm")


def test_float8_refuses_a_cpu_device_naming_the_fix() -> None:
    with pytest.raises(ValueError, match="model.linear_dtype=bf16"):
        check_float8_device(torch.device("cpu"))


@pytest.mark.parametrize("model,parallel,launch,match", [
    ({"linear_dtype": "fp8"}, {}, {}, "model.dtype=bf16"),
    ({"linear_dtype": "fp8", "dtype": "bf16"}, {}, {"device": "cpu"}, "launch.device=cpu"),
    ({"linear_dtype": "fp8", "dtype": "bf16"}, {"tp": 2}, {"num_workers": 2}, "tp=1 and zero_stage<=2"),
    ({"linear_dtype": "fp8", "dtype": "bf16"}, {"zero_stage": 3}, {}, "tp=1 and zero_stage<=2"),
    ({"loss_kernel": "liger"}, {"tp": 2}, {"num_workers": 2}, "model.loss_kernel=torch"),
    ({"loss_kernel": "cut"}, {}, {}, "choose one of torch, liger"),
    ({"residual_dtype": "bf16"}, {}, {}, "set model.dtype=bf16 or model.residual_dtype=fp32"),
    ({"residual_dtype": "fp16", "dtype": "bf16"}, {}, {}, "choose one of fp32, bf16"),
])
def test_config_refuses_what_the_fast_paths_cannot_run(model: dict, parallel: dict, launch: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model": model, "parallel": parallel, "launch": launch})


@pytest.mark.gpu
@pytest.mark.skipif(not liger_available(), reason="needs liger-kernel")
def test_gpu_liger_loss_matches_torch_loss_and_gradients() -> None:
    """Same sum and gradients as the plain loss under bf16 autocast, with an upstream gradient that is not 1
    (the step loop divides by the global token count) and ignored labels.

    Both compute bf16 logits from the same bf16 operands (a logit may round differently, by one bf16 ulp,
    when the product is tiled differently), the softmax in fp32, and pass a bf16 logits gradient to the
    products: each token's loss moves by at most eps * |logit| << eps * loss, and the gradients by a few
    bf16 epsilons (eps = 2**-8) in norm."""
    torch.manual_seed(0)
    tokens, hidden, vocab, denominator = 3000, 256, 5000, 7919.0
    h = torch.randn(tokens, hidden, device="cuda", requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda") * 0.05).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    labels[::5] = -100
    grads = []
    for fused in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (liger_linear_cross_entropy_sum(h, w, labels, -100, chunk_tokens=1024) if fused
                    else token_loss_sum(h @ w.T, labels))
        (loss / denominator).backward()
        grads.append((loss.detach(), h.grad.clone(), w.grad.clone()))
        h.grad = w.grad = None
    (l0, dh0, dw0), (l1, dh1, dw1) = grads
    eps = 2.0**-8
    assert l1.dtype == torch.float32 and torch.isfinite(l1)
    assert abs(l1 - l0) <= eps * abs(l0)
    for got, ref in ((dh1, dh0), (dw1, dw0)):
        assert (got - ref).norm() <= 4 * eps * ref.norm()


@pytest.mark.gpu
def test_gpu_float8_linears_train_close_to_bf16() -> None:
    """One forward/backward of a SwiGLU MLP with float8 linears against bf16: inputs and weights in e4m3
    (3 mantissa bits, relative rounding 2**-4), output gradients in e5m2 (2 bits, 2**-3), so outputs and
    gradients agree in norm to within twice the coarser rounding, 0.25, and no better is expected."""
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs float8 matrix units")
    from seqmesh.trainer.float8 import apply_float8_linears

    config = tiny_config(vocab_size=512, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8)
    torch.manual_seed(0)
    ref = Transformer(config).cuda()
    fp8 = Transformer(config).cuda()
    fp8.load_state_dict(ref.state_dict())
    names = apply_float8_linears(fp8, torch.device("cuda"))
    assert "model.layers.0.mlp.gate_proj" in names and "lm_head" not in names
    x = torch.randn(2048, 1024, device="cuda")
    outs = []
    for model in (ref, fp8):
        layer = model.model.layers[0].mlp
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().square().mean().backward()
        outs.append((y.float(), xi.grad, layer.gate_proj.weight.grad))
    for got, want in zip(outs[1], outs[0]):
        assert (got - want).norm() <= 0.25 * want.norm()
