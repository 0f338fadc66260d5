"""Fitting the cost model to timings: least squares on numbers, no devices, no torch.

``fit_quadratic`` and ``fit_linear`` turn ``seqmesh profile``'s per-length timings into coefficients;
``refine`` refits a whole cost model from the trainer's measured group timings (``CostFeedback``), and
``predicted_error`` scores a model against timings. The measuring itself -- a decoder layer timed on a
device, all-to-all timed over process groups -- is ``seqmesh.trainer.profile``'s: the scheduler is
pure planning and runs where there is no GPU and no torch.distributed.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.optimize import nnls

from seqmesh.scheduler.cost_model import CostModel


def fit_quadratic(lengths: Sequence[float], ms: Sequence[float]) -> tuple[float, float, float]:
    """Non-negative least squares of ``ms ~ a1 s^2 + a2 s + b`` (relative errors weigh equally)."""
    s = np.asarray(lengths, dtype=np.float64)
    y = np.asarray(ms, dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-9)
    coef, _ = nnls(np.stack([s * s, s, np.ones_like(s)], axis=1) * w[:, None], y * w)
    return float(coef[0]), float(coef[1]), float(coef[2])


def fit_linear(lengths: Sequence[float], ms: Sequence[float]) -> tuple[float, float]:
    """Non-negative least squares of ``ms ~ a s + b`` (relative errors weigh equally)."""
    s = np.asarray(lengths, dtype=np.float64)
    y = np.asarray(ms, dtype=np.float64)
    w = 1.0 / np.maximum(np.abs(y), 1e-9)
    coef, _ = nnls(np.stack([s, np.ones_like(s)], axis=1) * w[:, None], y * w)
    return float(coef[0]), float(coef[1])


Observation = tuple[Sequence[int], int, float]


def _columns(cost_model: CostModel, lengths: Sequence[int], d: int, sizes: Sequence[int]) -> list[float]:
    """One observation's row of the linear system in (alpha1, alpha2, beta, c_k for k in sizes)."""
    s = np.asarray(lengths, dtype=np.float64)
    shard = d * cost_model.tp * cost_model.pp  # compute and all-to-all are split over d ranks, TP and stages
    return [float((s * s).sum()) / shard, float(s.sum()) / shard, 1.0 / cost_model.pp] + \
        [float(s.sum()) / shard if d == k else 0.0 for k in sizes]


def _own_coefficients(cost_model: CostModel, sizes: Sequence[int]) -> np.ndarray:
    """``cost_model``'s values of the unknowns ``refine`` solves for: ``_columns @ this == group_ms`` exactly
    (TP's collectives, a per-token cost at a fixed ``tp``, sit in alpha2 as the refit puts them)."""
    alpha2 = cost_model.alpha2_ms_per_tok
    if cost_model.tp > 1 and cost_model.tp_GBps:
        alpha2 += cost_model.comm_bytes_per_token * (cost_model.tp - 1) / (cost_model.tp_GBps * 1e6)
    # an unpriced size has no prior (0: nothing pulls its fitted value)
    comm = [cost_model.comm_bytes_per_token / (cost_model.bandwidth_GBps(k) * 1e6)
            if k in cost_model.a2a_GBps or (cost_model.a2a_GBps and cost_model.extrapolate_bandwidth) else 0.0
            for k in sizes]
    return np.asarray([cost_model.alpha1_ms_per_tok2, alpha2, cost_model.beta_ms, *comm])


def _fit(a_rel: np.ndarray, prior: np.ndarray | None = None, prior_weight: float = 0.0) -> np.ndarray:
    """NNLS of ``a_rel @ x ~ 1`` (relative errors), with one pseudo-observation per coefficient pulling it towards
    ``prior`` (its relative deviation weighted by ``prior_weight`` against the observations' relative errors)."""
    a, b = a_rel, np.ones(len(a_rel))
    if prior is not None and prior_weight > 0:
        held = np.flatnonzero(prior > 0)
        rows = np.zeros((held.size, a.shape[1]))
        rows[np.arange(held.size), held] = np.sqrt(prior_weight) / prior[held]
        a, b = np.vstack([a, rows]), np.concatenate([b, np.full(held.size, np.sqrt(prior_weight))])
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)
    coef, _ = nnls(a / scale, b)
    return coef / scale


# Relative timing noise assumed where the observations are too few to measure their own.
ASSUMED_NOISE = 0.05


def refine(cost_model: CostModel, observations: Sequence[Observation], *, prior_sd: float | None = None,
           outlier_sigmas: float | None = None) -> CostModel:
    """Refit alpha1, alpha2, beta and per-size all-to-all bandwidth from measured group timings.

    Each observation is (lengths of one group's micro-batch, group size d, measured ms at nominal
    speed), e.g. from the trainer's per-group timers. The issue-4 formula is linear in alpha1,
    alpha2, beta and c_d = comm_bytes_per_token / (a2a_GBps[d] * 1e6), so one non-negative
    least-squares solve fits them all (relative errors weigh equally); sizes never observed keep
    their bandwidth.

    ``prior_sd`` anchors the fit to ``cost_model``'s *shape*: a Gaussian prior on each coefficient
    around its value in ``cost_model`` times the one factor that fits the observations best (the
    profile's proportions, the machine's level), with this relative standard deviation, against
    the timings' relative noise (measured from the residuals of the plain fit when there are more
    timings than unknowns, else ``ASSUMED_NOISE``). Why: a few steps of one plan family pin some
    combinations of the coefficients and leave others free (under static SP=2, alpha2 and c_2 are
    one column; short single-rank groups barely see alpha1), and a plain fit then sets the free
    ones to whatever the noise says -- which the planner reads back when it prices the plans it
    did not run. Where the timings determine a coefficient they outweigh the prior; where they do
    not, the rescaled profile stays. With the prior, one timing is enough to refit.

    ``outlier_sigmas``: when the timings alone determine a fit, those whose relative residual lies
    more than this many robust standard deviations (1.4826 x MAD, at least 1%) from the median
    residual are dropped -- a group that paid a one-off cost (a communicator's first use, allocator
    growth) must not drag the coefficients every later plan is priced with.

    Under a TP x PP layout an observation is one device's time (one TP rank of one stage), as
    ``group_ms`` predicts it, and the coefficients stay those of the whole model. TP's own
    collectives grow with the tokens exactly like ``alpha2``'s term at this ``tp``, so the fit
    folds them into ``alpha2`` and the result prices them no more (``tp_GBps = 0``).
    """
    if (prior_sd is not None and prior_sd <= 0) or (outlier_sigmas is not None and outlier_sigmas <= 0):
        raise ValueError(f"refine: prior_sd={prior_sd} and outlier_sigmas={outlier_sigmas} must be > 0 (or None)")
    sizes = sorted({int(d) for _, d, _ in observations if int(d) > 1})
    unknowns = 3 + len(sizes)
    needed = 1 if prior_sd else unknowns
    if len(observations) < needed:
        why = "" if prior_sd else " (3 + one per SP size seen)"
        raise ValueError(f"refine needs at least {needed} observations{why}, got {len(observations)}")
    for lengths, d, ms in observations:
        if d < 1 or ms <= 0 or len(lengths) == 0:
            raise ValueError(f"refine: bad observation (d={d}, ms={ms}, {len(lengths)} sequences)")
    a = np.asarray([_columns(cost_model, lengths, int(d), sizes) for lengths, d, _ in observations])
    a_rel = a / np.asarray([float(ms) for _, _, ms in observations])[:, None]
    noise, dropped = ASSUMED_NOISE, 0
    if len(observations) >= unknowns:
        coef = _fit(a_rel)
        res = a_rel @ coef - 1.0
        if outlier_sigmas is not None:
            dev = np.abs(res - np.median(res))
            keep = dev <= outlier_sigmas * max(1.4826 * float(np.median(dev)), 0.01)
            if not keep.all() and keep.sum() >= unknowns:
                dropped, a_rel = int((~keep).sum()), a_rel[keep]
                coef = _fit(a_rel)
                res = a_rel @ coef - 1.0
        if len(a_rel) > unknowns:
            noise = max(float(np.sqrt(res @ res / (len(a_rel) - unknowns))), 1e-3)
    if prior_sd:
        own = _own_coefficients(cost_model, sizes)
        pred = a_rel @ own
        prior = own * (pred.sum() / (pred @ pred)) if pred.any() else None
        coef = _fit(a_rel, prior, (noise / prior_sd) ** 2)
    bw = dict(cost_model.a2a_GBps)
    if cost_model.comm_bytes_per_token > 0:
        # c_k = 0 (all of the size's time explained by compute) is an all-to-all too fast to see: keeping the
        # old bandwidth would add back a communication time the fit just removed.
        bw.update({k: cost_model.comm_bytes_per_token / (max(float(c), 1e-12) * 1e6) for k, c in zip(sizes, coef[3:])})
    d = cost_model.to_dict()
    note = f"refined on {len(a_rel)} timings" + (f" ({dropped} outliers dropped)" if dropped else "")
    d.update(alpha1_ms_per_tok2=float(coef[0]), alpha2_ms_per_tok=float(coef[1]), beta_ms=float(coef[2]),
             a2a_GBps={str(k): v for k, v in bw.items()}, tp_GBps=0.0,
             source=(cost_model.source + "; " if cost_model.source else "") + note)
    # Under a cluster file the groups' links come from the file, not from a2a_GBps: the refit
    # bandwidths are kept in the table but the file's link terms keep pricing the groups.
    return CostModel.from_dict(d).with_links(cost_model.links)


def predicted_error(cost_model: CostModel, observations: Sequence[Observation]) -> float:
    """Mean absolute relative error of the model on observations (the GPU benchmark's figure)."""
    errs = [abs(cost_model.group_ms(lengths, d) - ms) / ms for lengths, d, ms in observations]
    return float(np.mean(errs)) if errs else math.nan
