"""ZeRO over parameters kept in two places: the device's own and the host's (parameter offload's placement).

Why: under ``offload.params`` the layers that fit stay on the device for the whole run. If their
master weights, gradients and optimizer states also lived on the host (a mirror refreshed every
step), host memory would bound the model and every step would hand their gradients over the link
and update them on the host. Here they live on the device only, so the largest model is bounded by
device *plus* host memory, and only the streamed layers pay for the link and the host.

Each place is a ``ZeroOptimizer`` of its own flat buffer: the *device* part (the root -- embeddings,
final norm, head -- and the resident decoder layers) on the GPU, reduced over the run's HDP group;
the *host* part (the streamed layers) in host memory, reduced over a group that reads host memory
(gloo). Both shard over the same HDP ranks. One inner optimizer steps the pieces of both (``FP8AdamW``
runs each piece where it lives: the Triton kernel for device pieces, the host or staged update for
host ones), so the lr schedule, checkpoints and resharding see a single optimizer whose groups are
the device part's followed by the host part's. Every element keeps the key (``index_offset``) it has in one
flat space of the whole model, so stochastic rounding draws the same bits wherever it lives, and the
placement steps every parameter bit for bit as ``ZeroOptimizer`` over the whole model does (the clip
norm's two fp64 sums agree with one sum far inside an fp32 ulp: ``zero.sum_of_squares``).

The global gradient norm is the square root of the two parts' sums (each already summed over HDP);
the clip's factor reaches both through the inner optimizer (each piece scaled as its update reads it)
or, for an optimizer without that, by scaling each part's shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from seqmesh.parallel.shard_spec import FlatShard
from seqmesh.parallel.zero import MakeOptimizer, ZeroOptimizer, clip_coefficient


class _Pieces:
    """A ``make_optimizer`` that keeps the pieces a ``ZeroOptimizer`` hands it (the shared optimizer comes later)."""

    def __init__(self) -> None:
        self.groups: list[dict[str, Any]] = []

    def __call__(self, groups: list[dict[str, Any]]) -> None:
        self.groups = groups


class PlacedZero:
    """ZeRO-1/2 over ``param_groups`` with the parameters ``on_device`` keeps in a flat space on ``device`` and the
    rest in one on the host; see the module docstring.

    Each group is cut into runs of consecutive parameters of one place (a group's options stay with its runs),
    and every element keeps the key it has in ``ZeroOptimizer(param_groups)``'s single flat space (each
    parameter starts on a block there and here), so the update of each element -- stochastic rounding
    included -- is the one that single flat space gives it.

    Args:
        make_optimizer: builds the one inner optimizer from the pieces of both parts.
        stage: the ZeRO stage of both parts (1 or 2).
        device: where the device part's flat buffers live (its parameters may still be on the host: they are
            copied there one at a time).
        device_group / host_group: the HDP groups each part reduces and gathers over.
        host_allocate: makes the host part's flat buffers (memory-mapped files under ``offload.params=nvme``).
        align: as ``ZeroOptimizer``'s (FP8AdamW's block).
        states_on_host: device parameters whose optimizer states live on the host (``FP8AdamW.keep_states_on_host``:
            parameter offload's middle placement); their runs become inner tensors of their own
            (``host_state_tensors``).
    """

    def __init__(self, param_groups: Sequence[dict[str, Any]], on_device: Callable[[nn.Parameter], bool],
                 make_optimizer: MakeOptimizer, *, stage: int, device: torch.device,
                 device_group: dist.ProcessGroup | None = None, host_group: dist.ProcessGroup | None = None,
                 host_allocate: Callable[[int, torch.dtype], Tensor] | None = None, align: int = 128,
                 states_on_host: Callable[[nn.Parameter], bool] | None = None) -> None:
        if stage not in (1, 2):
            raise ValueError(f"PlacedZero shards flat buffers: ZeRO stage 1 or 2, got {stage!r}")
        self.stage = stage
        host_states = states_on_host or (lambda p: False)
        runs: dict[bool, tuple[list[dict[str, Any]], list[int], list[int]]] = {True: ([], [], []),
                                                                               False: ([], [], [])}
        states_away: list[bool] = []  # per device run: its states on the host
        for group, key, origin, (there, away) in _runs(param_groups, lambda p: (on_device(p), host_states(p)), align):
            for into, item in zip(runs[there], (group, key, origin)):
                into.append(item)
            if there:
                states_away.append(away)
            elif away:
                raise ValueError("PlacedZero: states_on_host names a parameter the host keeps anyway; it is for "
                                 "parameters on the device")
        collected: list[dict[str, Any]] = []

        def part(there: bool, group: dist.ProcessGroup | None, where: torch.device,
                 allocate: Callable[[int, torch.dtype], Tensor] | None) -> ZeroOptimizer | None:
            groups, keys, _ = runs[there]
            if not groups:
                return None
            pieces = _Pieces()
            zero = ZeroOptimizer(groups, pieces, stage=stage, group=group, allocate=allocate, device=where,
                                 group_keys=keys, align=align)
            collected.extend(pieces.groups)
            return zero

        self.device_part = part(True, device_group, torch.device(device), None)
        self.host_part = part(False, host_group, torch.device("cpu"), host_allocate)
        # which of ``param_groups`` each inner group was cut from: a checkpoint stores the groups' settings per
        # param group, the same for every layout (``trainer/reshard.py``)
        self.group_origins = runs[True][2] + runs[False][2]
        self.parts = tuple(p for p in (self.device_part, self.host_part) if p is not None)
        if not self.parts:
            raise ValueError("PlacedZero: no trainable parameters in either place")
        self.optimizer = make_optimizer(collected)
        # the device part's inner tensors whose states live on the host (its groups come first in ``collected``)
        self.host_state_tensors = [g["params"][0] for g, away in zip(collected, states_away) if away]
        if self.host_state_tensors:
            keep = getattr(self.optimizer, "keep_states_on_host", None)
            if keep is None:
                raise ValueError("optimizer states on the host beside device weights need FP8AdamW "
                                 "(optim.state_dtype fp8, int8 or bf16), whose update stages them; this optimizer is "
                                 f"{type(self.optimizer).__name__}")
            keep(self.host_state_tensors)
        for zero in self.parts:
            zero.optimizer = self.optimizer
        self.params = [p for zero in self.parts for p in zero.params]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def shards_state(self) -> bool:
        return True

    @property
    def shards_params(self) -> bool:
        return False

    def synchronize(self) -> None:
        """Wait for an update left running behind ``step`` (parameter offload's streamed layers,
        ``FP8AdamW.overlap_updates``): call it before reading their parameters directly. Checkpoints
        (``flat_shards``, ``state_dict``) and the offload's own fetches wait by themselves."""
        wait = getattr(self.optimizer, "synchronize", None)
        if wait is not None:
            wait()

    def flat_shards(self) -> list[FlatShard]:
        """The inner optimizer's tensors in ``state_dict`` order (the device part's groups, then the host's)."""
        self.synchronize()
        return sorted((s for part in self.parts for s in part.flat_shards()), key=lambda s: s.group)

    def register_step_hooks(self, before_reduce: Callable[[], None],
                            after_step: Callable[[], None]) -> Callable[[], None]:
        """Hooks of the host part (the offload's: gradients to the host before the reduction, copies freed after)."""
        if self.host_part is None:
            raise ValueError("PlacedZero: no host part to hook (every parameter is on the device)")
        return self.host_part.register_step_hooks(before_reduce, after_step)

    def overlap_next_backward(self) -> None:
        for part in self.parts:
            part.overlap_next_backward()

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        for part in self.parts:
            part.reduce_gradients()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """As ``ZeroOptimizer.clip_grad_norm_`` over both parts (the norm on the first part's device)."""
        where = self.parts[0].flat.device
        sq = sum((part.squared_norm().to(where) for part in self.parts),
                 torch.zeros((), dtype=torch.float64, device=where))
        norm = sq.clamp(min=0).sqrt().float()
        if not math.isinf(max_norm):
            coef = clip_coefficient(norm, max_norm)
            if hasattr(self.optimizer, "scale_grads_in_step"):
                # one factor for every piece the inner optimizer steps, scaled as its update reads it
                factor = None if coef.item() == 1.0 else coef.to(self.parts[0].flat.dtype).cpu()
                self.optimizer.scale_grads_in_step(factor)
            else:
                for part in self.parts:
                    part.shard_grad.mul_(coef.to(part.shard_grad.device, part.shard_grad.dtype))
        return norm

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        for part in self.parts:
            part.finish_step()

    def zero_grad(self) -> None:
        for part in self.parts:
            part.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        self.synchronize()
        return {"zero": [part._layout() for part in self.parts], "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, here = state.get("zero"), [part._layout() for part in self.parts]
        if saved != here:
            raise ValueError(f"the checkpoint's optimizer was saved with the flat layouts {saved}; this run's (device "
                             f"part, host part) are {here}: resume with the same offload placement "
                             "(offload.resident_layers) and HDP size, or through the run directory (train() loads it "
                             "with seqmesh.trainer.reshard.load_resharded, at any layout)")
        self.optimizer.load_state_dict(state["optimizer"])


def _runs(param_groups: Sequence[dict[str, Any]], place: Callable[[nn.Parameter], Any],
          align: int) -> list[tuple[dict[str, Any], int, int, Any]]:
    """Each group cut into runs of consecutive trainable parameters of one ``place``: (run, the key of its first
    element in the single flat space of ``param_groups``, the index of its group, its place)."""
    out: list[tuple[dict[str, Any], int, int, Any]] = []
    key = 0
    for index, group in enumerate(param_groups):
        run: list[nn.Parameter] = []
        start = key
        for p in (p for p in group["params"] if p.requires_grad):
            if run and place(p) != place(run[0]):
                out.append(({**group, "params": run}, start, index, place(run[0])))
                run, start = [], key
            run.append(p)
            key += -(-p.numel() // align) * align
        if run:
            out.append(({**group, "params": run}, start, index, place(run[0])))
    return out
