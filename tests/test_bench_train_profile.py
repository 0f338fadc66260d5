"""bench/train.py and bench/profile_step.py arithmetic: overrides, paired loss gaps, kernel categories,
idle time; bench/composition.py's choice of layouts for the GPUs present."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from bench.composition import fitting_layouts
from bench.profile_step import CATEGORIES, breakdown, classify, covered_us
from bench.train import loss_gap_pct, merge_overrides, parse_variant, seqmesh_overrides, summarize

VOCAB = 128256


def test_later_overrides_replace_earlier_ones_of_the_same_key(tmp_path) -> None:
    out = seqmesh_overrides(8192, 8, False, tmp_path / "c.jsonl", 7, tmp_path,
                            ["model.activation_checkpointing=true", "model.loss_kernel=liger"])
    assert out.count("model.activation_checkpointing=true") == 1 and "model.activation_checkpointing=false" not in out
    assert out[-1] == "model.loss_kernel=liger"
    with pytest.raises(ValueError, match="not key=value"):
        merge_overrides(["a=1"], ["oops"])


def test_variants_keep_the_equals_signs_of_their_overrides() -> None:
    assert parse_variant("compiled=model.compile_layers=true") == ("compiled", None, ["model.compile_layers=true"])
    assert parse_variant("both@8192=model.compile_layers=true,model.loss_kernel=liger") == (
        "both", 8192, ["model.compile_layers=true", "model.loss_kernel=liger"])
    for bad in ("compiled", "compiled=", "=model.compile_layers=true", "x@8k=a=1", "x=a=1,oops"):
        with pytest.raises(ValueError, match="write NAME=key=value"):
            parse_variant(bad)


def test_loss_gap_is_relative_over_the_paired_steps_after_warmup() -> None:
    ref = {"records": [{"loss": 9.0}, {"loss": 8.0}, {"loss": 4.0}, {"loss": 6.0}]}
    other = {"records": [{"loss": 1.0}, {"loss": 1.0}, {"loss": 4.2}, {"loss": 6.3}, {"loss": 5.0}]}
    assert loss_gap_pct(other, ref) == pytest.approx(100 * (10.5 - 10.0) / 10.0)  # steps 2-3 of both only
    assert loss_gap_pct({"error": "oom"}, ref) is None


@pytest.mark.parametrize("kernel,ancestry,want", [
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNN", [("aten::mm", [[8192, 2048], [2048, 8192]])], "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", [("aten::mm", [[8192, 2048], [2048, VOCAB]])], "lm_head_loss"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", [("aten::_cudnn_attention", [])], "attention"),
    ("liger_cross_entropy_kernel", [], "lm_head_loss"),
    ("vectorized_elementwise_kernel", [("aten::nll_loss_backward", []), ("NllLossBackward0", [])], "lm_head_loss"),
    ("multi_tensor_apply_kernel", [("aten::_fused_adamw_", []), ("Optimizer.step#AdamW.step", [])], "optimizer"),
    ("reduce_kernel", [("aten::_foreach_norm", [])], "optimizer"),
    ("triton_poi_fused_mul_silu_0", [("CompiledFunction", [])], "norms_elementwise"),
    ("triton_poi_fused__fused_rms_norm__scaled_mm__to_copy_clamp_mul_1", [("CompiledFunction", [])], "norms_elementwise"),
    ("nvjet_sm90_qqtst_192x192_128x4_1x1_h_bz_coopB_TNN", [("aten::_scaled_mm", [])], "matmul"),
    ("Memcpy DtoD (Device -> Device)", [("aten::copy_", [])], "memcpy"),
])
def test_kernels_fall_in_their_category(kernel: str, ancestry: list, want: str) -> None:
    assert classify(kernel, ancestry, VOCAB) == want


def test_covered_time_counts_overlapping_kernels_once() -> None:
    assert covered_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == pytest.approx(17.0)
    assert covered_us([]) == 0.0


def _event(name: str, device: DeviceType, start: float = 0.0, end: float = 0.0, parent=None, shapes=None,
           kernels=(), annotation: bool = False):
    return SimpleNamespace(name=name, device_type=device, cpu_parent=parent, input_shapes=shapes or [],
                           is_user_annotation=annotation,
                           kernels=[SimpleNamespace(name=n, duration=d) for n, d in kernels],
                           time_range=SimpleNamespace(start=start, end=end))


def test_breakdown_links_kernels_to_their_operators_and_sums_to_the_wall_time() -> None:
    step = _event("Optimizer.step#AdamW.step", DeviceType.CPU)
    adam = _event("aten::_fused_adamw_", DeviceType.CPU, parent=step)
    mm = _event("aten::mm", DeviceType.CPU, shapes=[[4096, 2048], [2048, 8192]])
    # Kernels hang under the runtime call that launched them; its ancestors are the operators.
    launches = [_event("cudaLaunchKernel", DeviceType.CPU, parent=mm, kernels=[("nvjet_gemm", 60.0)]),
                _event("cudaLaunchKernel", DeviceType.CPU, parent=adam, kernels=[("multi_tensor_apply_kernel", 20.0)])]
    events = [step, adam, mm, *launches,
              _event("nvjet_gemm", DeviceType.CUDA, 0, 60),
              _event("multi_tensor_apply_kernel", DeviceType.CUDA, 50, 70),
              _event("unlinked_elementwise_kernel", DeviceType.CUDA, 80, 90)]
    out = breakdown(events, wall_us=100.0, vocab=VOCAB)
    assert out["ms"]["matmul"] == pytest.approx(0.060) and out["ms"]["optimizer"] == pytest.approx(0.020)
    assert out["ms"]["norms_elementwise"] == pytest.approx(0.010)
    assert out["kernel_busy_ms"] == pytest.approx(0.080) and out["ms"]["idle"] == pytest.approx(0.020)
    assert set(out["share"]) == set(CATEGORIES) and out["top_kernels"][0]["kernel"] == "nvjet_gemm"


def test_composition_runs_the_layouts_the_gpus_present_can_hold() -> None:
    assert fitting_layouts(["1gpu", "tp2", "hdp2_zero1"], 1) == ["1gpu"]
    assert fitting_layouts(["1gpu", "tp2"], 2) == ["1gpu", "tp2"]
    with pytest.raises(SystemExit, match="add 1gpu"):
        fitting_layouts(["tp2", "pp2"], 1)


def test_summary_takes_the_fastest_bf16_row_and_keeps_missing_figures_none() -> None:
    rows = [{"seq_len": 32768, "seqmesh": {"tokens_per_s_per_device": 20.0, "mfu": 0.3},
             "seqmesh_noreco": {"tokens_per_s_per_device": 25.0, "mfu": 0.375},
             "hf": {"tokens_per_s": 20.0}, "hf_liger": {"error": "oom"}}]
    out = summarize(rows, ["noreco"], steps=6)
    assert out["seqmesh_row_32k"] == "seqmesh_noreco" and out["mfu_32k"] == 0.375
    assert out["speedup_vs_hf_transformers_32k"] == pytest.approx(1.25) and out["speedup_vs_hf_liger_32k"] is None
    assert out["mfu_8k"] is None and out["fp8_linear_speedup_8k"] is None and out["mfu"] == 0.375
    assert out["loss_gap_steps"] == 4
    assert summarize([{"seq_len": 8192, "steps": 8}, *rows], [], steps=6)["loss_gap_steps"] == 6


def test_merge_keeps_the_other_lengths_of_the_same_commit_and_configuration(tmp_path, monkeypatch) -> None:
    import json

    import bench.train as train

    monkeypatch.setattr("bench.common.head_commit", lambda: "abc1234")
    monkeypatch.setattr("bench.common.device_tag", lambda: "h200")
    old = {"commit": "abc1234", "config": {"seqmesh_overrides": ["model.loss_kernel=liger"], "variants": {"noreco": [32768, []]}},
           "rows": [{"seq_len": 8192, "seqmesh": {}}, {"seq_len": 32768, "seqmesh": {}}]}
    (tmp_path / "train_h200.json").write_text(json.dumps(old))
    config = {"seqmesh_overrides": ["model.loss_kernel=liger"], "variants": {}}
    kept, names = train.earlier_rows(tmp_path, [32768], config)
    assert [r["seq_len"] for r in kept] == [8192] and names == ["noreco"] and config["earlier_run"] == old["config"]
    with pytest.raises(SystemExit, match="without --merge"):
        train.earlier_rows(tmp_path, [32768], {"seqmesh_overrides": [], "variants": {}})
    assert train.earlier_rows(tmp_path / "none", [8192], config) == ([], [])


def test_compiled_graph_annotations_are_not_counted_as_kernels() -> None:
    # Inductor records "## Call CompiledFxGraph ... ##" on the device's timeline around its graph's kernels,
    # a span that also covers the gaps between them; the CPU side lists it among the kernels it launched.
    span = "## Call CompiledFxGraph f4zw6pdp ##"
    call = _event("CompiledFunction", DeviceType.CPU, kernels=[(span, 90.0), ("triton_poi_fused_add_0", 30.0)])
    events = [call, _event(span, DeviceType.CUDA, 0, 90, annotation=True),
              _event("triton_poi_fused_add_0", DeviceType.CUDA, 0, 30),
              _event("nvjet_gemm", DeviceType.CUDA, 60, 90)]
    out = breakdown(events, wall_us=100.0, vocab=VOCAB)
    assert out["ms"]["norms_elementwise"] == pytest.approx(0.030) and out["ms"]["matmul"] == pytest.approx(0.030)
    assert out["kernel_busy_ms"] == pytest.approx(0.060) and out["ms"]["idle"] == pytest.approx(0.040)
    assert sum(out["share"].values()) == pytest.approx(1.0)
