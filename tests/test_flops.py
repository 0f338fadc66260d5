import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config

from seqmesh.trainer.flops import (device_name, forward_flops, mfu, peak_flops, seqlens_from_cu_seqlens,
                                   train_flops)


def tiny_config(**overrides) -> LlamaConfig:
    kwargs = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=96, max_position_embeddings=256, tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def test_train_flops_matches_hand_count():
    cfg = tiny_config()  # h=64, I=160, 4 heads x 16, 2 kv heads, 2 layers, V=96
    lengths = [10, 30, 0, 7]
    tokens, squares = 47, 100 + 900 + 49
    q, kv = 4 * 16, 2 * 16
    per_layer_token = 2 * (64 * q + 2 * 64 * kv + q * 64 + 3 * 64 * 160)
    assert per_layer_token == 2 * (4096 + 4096 + 4096 + 30720) == 86016
    linear = tokens * (2 * per_layer_token + 2 * 64 * 96)
    full_attention = squares * 2 * (2 * 2 * q)
    assert train_flops(cfg, lengths, causal_half=False) == 3 * (linear + full_attention)
    assert train_flops(cfg, lengths) == 3 * (linear + full_attention / 2)
    assert train_flops(cfg, lengths) == 3 * forward_flops(cfg, lengths)


def test_attention_counts_documents_not_the_pack():
    cfg = tiny_config()
    packed, one_long = train_flops(cfg, [100, 100]), train_flops(cfg, [200])
    # Same 200 tokens, so the linear terms cancel; attention is 2 * 100^2 vs 200^2 squares, each
    # worth 3 (fwd+bwd) x 2 layers x 2 products x 2 FLOPs x 64 (heads x head_dim) x 1/2 (causal).
    assert one_long - packed == (200**2 - 2 * 100**2) * 3 * 2 * 2 * 2 * 64 / 2
    assert train_flops(cfg, []) == 0.0


def test_gqa_head_dim_and_qwen2_config():
    mha = tiny_config(num_key_value_heads=4)
    gqa = tiny_config(num_key_value_heads=1)
    # K and V shrink from 64 to 16 columns: 2 matrices x 2 layers x 2 FLOPs x 64 x 48 per token.
    assert train_flops(mha, [5]) - train_flops(gqa, [5]) == 3 * 5 * 2 * 2 * 2 * 64 * 48
    explicit = tiny_config(head_dim=32)  # heads x head_dim need not equal hidden_size
    assert train_flops(explicit, [8]) > train_flops(tiny_config(), [8])
    qwen = Qwen2Config(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2, vocab_size=96)
    assert train_flops(qwen, [10, 30]) == train_flops(tiny_config(), [10, 30])
    assert train_flops(qwen.to_dict(), [10, 30]) == train_flops(qwen, [10, 30])


def test_cu_seqlens_and_bad_input():
    assert seqlens_from_cu_seqlens(torch.tensor([0, 3, 3, 10], dtype=torch.int32)) == [3, 0, 7]
    cfg = tiny_config()
    assert train_flops(cfg, torch.tensor([3, 7])) == train_flops(cfg, [3, 7])
    with pytest.raises(ValueError, match="start at 0"):
        seqlens_from_cu_seqlens([1, 3])
    with pytest.raises(ValueError, match=">= 0"):
        train_flops(cfg, [4, -1])
    with pytest.raises(ValueError, match="lacks"):
        train_flops(object(), [4])


def brute_train_flops(cfg: LlamaConfig, length: int) -> int:
    """FLOPs PyTorch itself counts for one forward + backward of the HF model (eager attention)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager")
    ids = torch.randint(0, cfg.vocab_size, (1, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("tie", [False, True])
def test_train_flops_matches_flop_counter(tie):
    # Eager attention multiplies the full L x L score matrix and masks it afterwards, so the brute
    # count is the non-causal one. The matrix products are all the counter sees; what the formula
    # leaves out (norms, RoPE, softmax, SiLU, loss) the counter does not count either, so the two
    # agree exactly -- including the gradient of layer 0's input, which flows into the embedding.
    torch.set_num_threads(1)
    cfg = tiny_config(tie_word_embeddings=tie)
    length = 48
    assert brute_train_flops(cfg, length) == pytest.approx(train_flops(cfg, [length], causal_half=False), rel=1e-9)


def test_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp8") == pytest.approx(1978.9e12)
    assert peak_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe") == pytest.approx(756.5e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert peak_flops("NVIDIA A100-PCIE-40GB", "fp8") is None  # Ampere has no FP8 tensor cores
    assert peak_flops("NVIDIA A10G") == pytest.approx(125e12)
    assert peak_flops("NVIDIA L40S") == pytest.approx(362.1e12)
    assert peak_flops("NVIDIA L4") == pytest.approx(121e12)
    assert peak_flops("NVIDIA GH200 480GB") == pytest.approx(989.4e12)
    assert peak_flops("cpu") is None
    assert peak_flops("NVIDIA GeForce GTX 1080") is None
    assert peak_flops("cpu", override_tflops=2.5) == pytest.approx(2.5e12)
    with pytest.raises(ValueError, match="peak_tflops"):
        peak_flops("cpu", override_tflops=0)
    with pytest.raises(ValueError, match="dtype"):
        peak_flops("NVIDIA H200", "int4")


def test_mfu_and_device_name():
    assert mfu(494.7e12, 2.0, 989.4e12) == pytest.approx(0.25)
    assert mfu(1e12, 1.0, None) is None
    assert device_name("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert device_name() == "cpu"


@pytest.mark.gpu
def test_the_machines_gpu_is_in_the_table():
    name = device_name()
    assert name != "cpu" and peak_flops(name) is not None, f"add {name!r} to the peak table"
