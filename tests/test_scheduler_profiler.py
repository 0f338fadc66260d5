import json

import numpy as np
import pytest

from seqmesh.scheduler.cost_model import CostModel
from seqmesh.scheduler.fitting import fit_linear, fit_quadratic, predicted_error, refine
from seqmesh.trainer.profile import measure_a2a, profile_main
from tests.distributed import run_distributed

TRUE = CostModel(alpha1_ms_per_tok2=3e-6, alpha2_ms_per_tok=0.11, beta_ms=25.0, a2a_GBps={2: 110.0, 4: 90.0},
                 comm_bytes_per_token=3.1e6, mem_bytes_per_token=4e5, mem_static_bytes=1.8e10, mem_limit_bytes=8e10)


def test_fit_quadratic_recovers_coefficients():
    s = np.array([512, 1024, 2048, 4096, 8192], dtype=float)
    a1, a2, b = fit_quadratic(s, 2e-6 * s * s + 0.05 * s + 3.0)
    assert (a1, a2, b) == pytest.approx((2e-6, 0.05, 3.0), rel=1e-6)


def test_fit_linear_keeps_the_slope_of_a_launch_bound_start():
    # Short lengths cost a flat launch floor, longer ones grow linearly: the slope survives.
    s = np.array([1024, 2048, 4096, 8192, 16384], dtype=float)
    a, b = fit_linear(s, np.maximum(4.0, 1e-3 * s))
    assert a > 5e-4 and b >= 0
    assert fit_linear(s, 0.02 * s + 1.5) == pytest.approx((0.02, 1.5), rel=1e-6)


def test_refine_recovers_the_model_from_group_timings():
    rng = np.random.default_rng(0)
    obs = []
    for _ in range(40):
        d = int(rng.choice([1, 2, 4]))
        lengths = [int(x) for x in rng.integers(200, 40000, int(rng.integers(1, 6)))]
        obs.append((lengths, d, TRUE.group_ms(lengths, d)))
    start = CostModel.from_dict({**TRUE.to_dict(), "alpha1_ms_per_tok2": 1e-5, "alpha2_ms_per_tok": 0.3,
                                 "beta_ms": 100.0, "a2a_GBps": {"2": 50.0, "4": 20.0, "8": 10.0}})
    fitted = refine(start, obs)
    assert fitted.alpha1_ms_per_tok2 == pytest.approx(3e-6, rel=1e-4)
    assert fitted.alpha2_ms_per_tok == pytest.approx(0.11, rel=1e-4)
    assert fitted.beta_ms == pytest.approx(25.0, rel=1e-3)
    assert fitted.a2a_GBps[2] == pytest.approx(110.0, rel=1e-3) and fitted.a2a_GBps[4] == pytest.approx(90.0, rel=1e-3)
    assert fitted.a2a_GBps[8] == 10.0  # never observed: kept
    assert predicted_error(fitted, obs) < 1e-4 < predicted_error(start, obs)
    with pytest.raises(ValueError, match="at least 5 observations \\(3 \\+ one per SP size seen\\), got 4"):
        refine(start, [([100], 1, 1.0), ([200], 1, 2.0), ([100], 2, 1.0), ([100], 4, 1.0)])


def _timings(truth: CostModel, sizes, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    obs = []
    for _ in range(n):
        d = int(rng.choice(sizes))
        lengths = [int(x) for x in rng.integers(200, 40000, int(rng.integers(1, 6)))]
        obs.append((lengths, d, truth.group_ms(lengths, d)))
    return obs


def test_refine_from_one_group_size_prices_that_size_without_the_old_all_to_all():
    # Under static SP=2 alpha2 and c_2 are one column: NNLS may give all of it to alpha2 (c_2 = 0), and keeping
    # the profile's bandwidth then would add its all-to-all time back on top of the fit.
    truth = CostModel.from_dict({**TRUE.to_dict(), "a2a_GBps": {"2": 400.0}})
    start = CostModel.from_dict({**TRUE.to_dict(), "alpha2_ms_per_tok": 0.05, "a2a_GBps": {"2": 20.0}})
    obs, check = _timings(truth, [2], 12), _timings(truth, [2], 20, seed=1)
    for prior_sd in (None, 0.5):
        fitted = refine(start, obs, prior_sd=prior_sd)
        assert predicted_error(fitted, check) < 1e-3, prior_sd


def test_refine_with_a_prior_rescales_the_profile_where_timings_say_little():
    start = CostModel.from_dict({**TRUE.to_dict(), "alpha1_ms_per_tok2": 1e-5, "alpha2_ms_per_tok": 0.3,
                                 "beta_ms": 100.0})
    one = [([3000, 5000], 1, 2.5 * start.group_ms([3000, 5000], 1))]
    with pytest.raises(ValueError, match="at least 3 observations"):
        refine(start, one)
    fitted = refine(start, one, prior_sd=0.5)
    # One timing 2.5x the profile's: every coefficient scales by 2.5, the proportions stay the profile's.
    assert [fitted.alpha1_ms_per_tok2 / 1e-5, fitted.alpha2_ms_per_tok / 0.3, fitted.beta_ms / 100.0] == \
        pytest.approx([2.5] * 3, rel=1e-6)
    assert fitted.a2a_GBps == start.a2a_GBps  # no SP group timed
    # Where timings do determine the coefficients, a weak prior leaves them to the timings.
    obs = _timings(TRUE, [1, 2, 4], 40)
    fitted = refine(start, obs, prior_sd=0.5)
    assert predicted_error(fitted, _timings(TRUE, [1, 2, 4], 40, seed=1)) < 1e-3
    assert fitted.alpha1_ms_per_tok2 == pytest.approx(3e-6, rel=1e-3)
    with pytest.raises(ValueError, match="prior_sd=0 and outlier_sigmas=None must be > 0"):
        refine(start, obs, prior_sd=0)


def test_refine_drops_one_off_stalls():
    obs = _timings(TRUE, [1, 2, 4], 30)
    stalled = [(lens, d, 3 * ms) if i in (4, 17) else (lens, d, ms) for i, (lens, d, ms) in enumerate(obs)]
    start = CostModel.from_dict({**TRUE.to_dict(), "alpha2_ms_per_tok": 0.3})
    robust = refine(start, stalled, outlier_sigmas=4.0)
    assert "refined on 28 timings (2 outliers dropped)" in robust.source
    assert predicted_error(robust, obs) < 1e-6
    assert predicted_error(refine(start, stalled), obs) > 0.01  # the stalls drag a plain fit


def test_profile_writes_a_loadable_cost_model_on_cpu(tmp_path, capsys):
    out = tmp_path / "cost.json"
    rc = profile_main(["--out", str(out), "--hidden", "64", "--layers", "2", "--heads", "4", "--ffn", "128",
                       "--vocab", "256", "--lengths", "32,64,128,256", "--repeats", "1", "--checkpointing",
                       "--device", "cpu"])
    assert rc == 0
    cm = CostModel.load(out)
    # tiny shapes on a shared CPU are noise-dominated: only the structure is asserted here
    assert cm.alpha1_ms_per_tok2 + cm.alpha2_ms_per_tok + cm.beta_ms > 0
    assert cm.a2a_GBps == {} and "profile on cpu" in cm.source
    assert cm.mem_bytes_per_token == pytest.approx(4 * 64 * 2 + 34 * 64 * 4 / 2)
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["out"] == str(out)


def test_profile_rejects_bad_shapes(tmp_path, capsys):
    assert profile_main(["--out", str(tmp_path / "c.json"), "--hidden", "65", "--heads", "4"]) == 2
    assert "must be a multiple of --heads" in capsys.readouterr().err
    assert profile_main(["--out", str(tmp_path / "c.json"), "--lengths", "64,128"]) == 2
    assert "at least 3 positive lengths" in capsys.readouterr().err


def _a2a(rank, world):
    return measure_a2a(1 << 16, repeats=2)


def test_all_to_all_bandwidth_is_measured_and_shared_by_every_rank():
    per_rank = run_distributed(_a2a, 2)
    assert per_rank[0] == per_rank[1]  # rank 0's figures, broadcast
    assert sorted(per_rank[0]) == [2] and per_rank[0][2] > 0


@pytest.mark.gpu
def test_profile_on_cuda_measures_time_and_memory_per_token(tmp_path):
    out = tmp_path / "cost.json"
    rc = profile_main(["--out", str(out), "--hidden", "1024", "--layers", "4", "--heads", "8", "--ffn", "2816",
                       "--vocab", "1024", "--lengths", "1024,2048,4096,8192", "--checkpointing"])
    assert rc == 0
    cm = CostModel.load(out)
    # beyond the checkpointed layer inputs, a layer's working set grows with its tokens
    assert cm.mem_bytes_per_token > 4 * 1024 * 4  # fp32 layer inputs x 4 layers, plus the working set
    assert cm.alpha1_ms_per_tok2 > 0 and cm.alpha2_ms_per_tok > 0
