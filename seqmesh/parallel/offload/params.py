"""Parameter offload: decoder-layer weights live in host memory and are streamed to the device around use.

ZeRO-Offload / ZeRO-Infinity and Fuyou's idea, as a transform on the plain model
(``attach_param_offload``) over the host part of a ``PlacedZero``: the *streamed* layers were built
on the host, so that part's flat parameter buffer (their master weights) and gradient buffer are
host memory, page-locked here on CUDA; the optimizer steps them on the CPU or staged through the
device (``FP8AdamW``: the same math and state format as on the device). Everything else -- the root
(embeddings, final norm, head) and the *resident* layers the plan keeps (``offload_plan.plan_offload``)
-- is the device part's: ordinary device parameters with their gradients and states on the device,
which this transform never touches.

Each streamed layer runs as an ``OnDemandLayer`` (``parallel/on_demand_layer.py``, the path ZeRO-3's
gathered layers take too) with this class as its ``WeightSource``: forward fetches the layer's weights from
the host, runs it without autograd and frees them; backward fetches them again, recomputes the layer with
autograd (activation checkpointing is implied; a checkpoint wrapper is looked through so the layer is not
recomputed twice), and its weight gradients go to the host. Forward prefetches the next ``prefetch``
streamed layers (the first ones when the model's forward begins), backward the previous ones; the last
``prefetch`` layers of a forward with autograd stay loaded for backward, which needs them first.

Streams. On CUDA host-to-device copies run on one side stream and device-to-host gradient copies
on another; a single worker thread waits for each copy, so the compute stream never waits for the
host. A step's first gradients of a layer under ZeRO-1 go straight into its page-locked slots of the
host buffer, which is never zero-filled (the offload owes its zeros, ``_zero_grads``); later
micro-batches' go to pinned staging buffers of a ``HostPool`` and the worker adds them in. In the
step's last backward each layer's sum of squares (the clip norm) is taken as it lands: by the device
from the very values a copy lands, otherwise by the worker after the addition, behind the backward of
the layers after it. On a CPU device the same code runs with synchronous copies and the
work done inline (what tests run).

Why the gradients are bitwise those of the device-resident model (same kernels, same order):
forward and the recomputation in backward run the layer's own forward on the same inputs with
the same weights (copies are exact), so every gradient the layer produces is bit for bit the one
the resident model's backward produces (which, under activation checkpointing, is also a
recomputation). Each weight is used once per layer, so autograd sums nothing inside a layer. The
host then accumulates the per-micro-batch gradients in micro-batch order, one addition each, in
the parameter's dtype: exactly what autograd's ``AccumulateGrad`` does into ``p.grad`` (a ZeRO-1
view of zeros: ``0 + g1 + g2 ...``, its first term copied as ``0 + g1`` is computed on the device;
ZeRO-2: ``g1 + g2 ...``). A single worker thread applies them
in submission order, so the order never depends on timing.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from seqmesh.parallel.offload.pool import HostPool
from seqmesh.parallel.on_demand_layer import run_on_demand
from seqmesh.parallel.zero import squares_of
from seqmesh.scheduler.offload_plan import staging_bytes_for

_ATTR = "_seqmesh_param_offload"


@dataclass
class _Unit:
    """A streamed decoder layer's parameters, moved as one."""

    index: int  # position among the streamed layers
    params: list[nn.Parameter]
    host: list[Tensor]  # the master values (views of ZeRO's flat buffer): ``p.data`` while not in use
    numel: int = 0
    device: Tensor | None = None  # one buffer for all of the unit's parameters; storage released when idle
    views: list[Tensor] = field(default_factory=list)
    ready: Any = None  # CUDA event of the copy in flight, None once waited for (or on CPU)
    loaded: bool = False  # the device buffer holds the current master values
    in_use: bool = False  # ``p.data`` points at the device buffer
    grads: list[Tensor | None] | None = None  # host gradient slots of the step, taken from ``p.grad``
    zeroed: bool = False  # ZeRO-1: the slots hold (or are owed, ``stale``) the zeros of a new step
    stale: bool = False  # zeroed in name only: the next landing or ``flush`` writes them


def _release_storage(t: Tensor) -> None:
    t.untyped_storage().resize_(0)


# Buffers at least this large are page-locked in place. glibc serves allocations above its mmap threshold
# (at most 32 MiB) with mappings of their own, so such a buffer shares no page with another allocation;
# registering a page twice fails (cudaErrorHostMemoryAlreadyRegistered), and that error would surface
# at the next kernel launch. Smaller buffers stay pageable: their copies are synchronous, and small.
PIN_MIN_BYTES = 64 << 20


def _pin(t: Tensor) -> Callable[[], None] | None:
    """Page-lock ``t``'s bytes in place (CUDA copies from it then run asynchronously); returns the undo, or
    None where ``t`` stays pageable (small, or pinned already)."""
    nbytes = t.numel() * t.element_size()
    if nbytes < PIN_MIN_BYTES or t.is_pinned():
        return None
    ptr = t.data_ptr()
    if int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)) != 0:
        raise RuntimeError(f"offload.params: could not page-lock {nbytes / 2**30:.2f} GiB of host memory for the "
                           "master weights; raise the locked-memory limit (ulimit -l) or free RAM")
    return lambda: torch.cuda.cudart().cudaHostUnregister(ptr)


class ParamOffload:
    """Host-resident master weights of ``layers`` streamed to ``device``; see the module docstring.

    Args:
        model: the model, all but ``layers`` on ``device`` (buffers too).
        layers: the streamed decoder layers as registered (checkpoint wrappers included), in forward order.
        zero: the ``ZeroOptimizer`` (``PlacedZero.host_part``) whose flat buffers hold their masters and
            gradients, and nothing else.
        device: where compute runs.
        prefetch: how many streamed layers ahead forward and backward fetch.
        staging_bytes: pinned host bytes for gradients in flight to the host (CUDA only; at least
            ``staging_bytes_for`` the largest streamed layer).
        pin_masters: page-lock ZeRO's host buffers in place (False for memory-mapped files, ``mapped.py``).
        leading: the modules that run before ``layers`` in forward (the device's decoder layers): the first
            streamed layers are fetched as the last ``prefetch`` of them begin, not when the model's forward
            does, so that the update left running behind the last step has their forward to finish in.
    """

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], zero: Any, device: torch.device, *,
                 prefetch: int = 2, staging_bytes: int = 1 << 30, pin_masters: bool = True,
                 leading: Sequence[nn.Module] = ()) -> None:
        if prefetch < 0:
            raise ValueError(f"offload.prefetch={prefetch} must be >= 0 (layers fetched ahead of use)")
        flat = getattr(zero, "flat", None)
        if flat is None or getattr(zero, "stage", None) not in (1, 2):
            raise ValueError("offload.params keeps the master weights in ZeRO's flat buffer: set "
                             "parallel.zero_stage=1 or 2 (on one rank this shards nothing)")
        if flat.device.type != "cpu":
            raise ValueError(f"offload.params needs the streamed layers built on the host (their ZeRO buffer is on "
                             f"{flat.device}); build them on the CPU and let the offload move them to the device")
        streamed = [p for layer in layers for p in layer.parameters() if p.requires_grad]
        if {id(p) for p in streamed} != {id(p) for p in zero.params}:
            raise ValueError("parameter offload: the host ZeRO buffer must hold exactly the streamed layers' "
                             "parameters (build it with PlacedZero over the plan's placement)")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.prefetch = prefetch
        self._unpin: list[Callable[[], None]] = []
        if self.cuda and pin_masters:
            buffers = {t.data_ptr(): t for t in (flat, getattr(zero, "flat_grad", None), zero.shard_grad)
                       if t is not None}  # one rank's ZeRO-1 shares one buffer for both gradients
            for t in buffers.values():
                undo = _pin(t)
                if undo is not None:
                    self._unpin.append(undo)
        if self.cuda:
            self.h2d = torch.cuda.Stream(self.device)
            self.d2h = torch.cuda.Stream(self.device)
        self._worker = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="seqmesh-grad-d2h") if self.cuda else None
        self._pending: list[cf.Future] = []
        self.streamed = [self._unit(i, [p for p in layer.parameters() if p.requires_grad])
                         for i, layer in enumerate(layers)]
        for unit in self.streamed:  # ZeRO-1: the first landing copies; ``flush`` zeroes a layer that sent nothing
            unit.zeroed = unit.stale = zero.stage == 1
        if self.cuda:  # room for two layers' gradients in flight, whatever the layer size
            largest = max((u.numel * u.device.element_size() for u in self.streamed), default=0)
            self.staging = HostPool(max(staging_bytes, staging_bytes_for(largest)), pin=True)
        self._wrapped = list(layers)
        run_on_demand(layers, self.streamed, self)
        self._in_forward = False
        self._fetch_at_leading = bool(leading and prefetch)
        self._hooks = [model.register_forward_pre_hook(self._begin_forward)]
        if self._fetch_at_leading:
            self._hooks.append(leading[max(0, len(leading) - prefetch)].register_forward_pre_hook(self._first_fetches))
        # one rank's ZeRO-1 accumulates into the very buffer it steps: in the last backward each layer's squares (the
        # clip norm) are summed as it lands, behind the backward of the layers after it
        self._zero = zero
        self._early_norm = zero.stage == 1 and getattr(zero, "world", 1) == 1
        self._last_backward = False
        self._squares: dict[int, Tensor] = {}
        # the update of these layers runs behind the next forward's resident layers (one rank: ZeRO gathers nothing
        # after it); every reader of their masters or states waits for it first
        self._overlap = getattr(zero.optimizer, "overlap_updates", None) if getattr(zero, "world", 1) == 1 else None
        self.update_wait_s = 0.0  # host time fetches spent waiting for that update (benchmarks read it)
        self._wait_update: Callable[[], None] = lambda: None
        self._wait_written: Callable[[Sequence[Tensor]], None] = lambda _: None
        self._behind = [shard.tensor for shard in zero.flat_shards()]
        if self._overlap is not None:
            self._overlap(self._behind)
            self._wait_update = zero.optimizer.synchronize
            self._wait_written = zero.optimizer.wait_for
        self._state_hooks = [model.register_state_dict_pre_hook(lambda *_: self._wait_update()),
                             model.register_load_state_dict_pre_hook(lambda *_: self._wait_update())]
        self._unhook_zero = zero.register_step_hooks(
            before_reduce=self.flush, after_step=self.flush, before_last_backward=self._arm_norm,
            zeroes_grads=self._zero_grads if zero.stage == 1 else None)
        self._finalizer = weakref.finalize(self, ParamOffload._close, self._worker, self._unpin,
                                           getattr(self, "staging", None))

    def _arm_norm(self) -> None:
        self._last_backward = self._early_norm
        self._squares = {}

    def _begin_forward(self, *_: Any) -> None:
        """Before the model's forward: the first streamed layers on their way (their copies overlap the embedding
        and the resident layers), or, with resident layers in front, once the last of those begin."""
        self._in_forward = True
        if not self._fetch_at_leading:
            self._first_fetches()

    def _first_fetches(self, *_: Any) -> None:
        if not self._in_forward:  # a resident layer recomputed in backward: its streamed layers are behind it
            return
        self._in_forward = False
        for unit in self.streamed[:self.prefetch]:
            self.fetch(unit)

    def _unit(self, index: int, params: list[nn.Parameter]) -> _Unit:
        unit = _Unit(index, params, [p.data for p in params], numel=sum(p.numel() for p in params))
        dtype = params[0].dtype if params else torch.float32
        unit.device = torch.empty(unit.numel, dtype=dtype, device=self.device)
        offset = 0
        for p in params:
            unit.views.append(unit.device[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        _release_storage(unit.device)
        return unit

    # ------------------------------------------------------------------ moving weights

    @torch.no_grad()
    def fetch(self, unit: _Unit) -> None:
        """Start copying ``unit``'s master values to the device (a no-op when they are there or on the way)."""
        if unit.loaded:
            return
        began = time.perf_counter()
        self._wait_written(unit.host)  # the last step's update of these masters, if it runs behind this forward
        self.update_wait_s += time.perf_counter() - began
        unit.device.untyped_storage().resize_(unit.numel * unit.device.element_size())
        if self.cuda:
            # The buffer was (re)allocated on the compute stream: the copy waits for its earlier users.
            self.h2d.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.h2d):
                for view, host in zip(unit.views, unit.host):
                    view.copy_(host, non_blocking=True)
                unit.ready = torch.cuda.Event()
                unit.ready.record(self.h2d)
        else:
            for view, host in zip(unit.views, unit.host):
                view.copy_(host)
        unit.loaded = True

    def bring(self, unit: _Unit, backward: bool) -> None:
        """Make ``unit``'s parameters the device copies (fetching them if needed) for compute on this stream; in
        backward, fetch the layers before it now (their copies run beside its recomputation)."""
        self.fetch(unit)
        if unit.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(unit.ready)
            unit.ready = None
        if not unit.in_use:
            if unit.grads is None:  # first use in this step: the host gradient slots (ZeRO-1 views, or None)
                unit.grads = [p.grad for p in unit.params]
            for p, view in zip(unit.params, unit.views):
                p.grad = None  # the layer's gradients go to ``grads``, on the host
                p.data = view
            unit.in_use = True
        if backward:
            self._prefetch(unit, backward=True)

    def release(self, unit: _Unit, keep: bool = False) -> None:
        """Point ``unit``'s parameters back at the masters and free its device buffer (``keep``: leave the device
        copy loaded for a use that comes next, backward's first layers after forward's last)."""
        if unit.in_use:
            for p, host in zip(unit.params, unit.host):
                p.data = host
            unit.in_use = False
        if unit.loaded and not keep:
            _release_storage(unit.device)
            unit.loaded = False
            unit.ready = None

    def queued(self, unit: _Unit, backward: bool) -> None:
        """Forward fetches the next layers once this one's kernels are queued: a fetch may wait for the update
        behind the step to write them, and the device computes this layer meanwhile."""
        if not backward:
            self._prefetch(unit, backward=False)

    def keep_after_forward(self, unit: _Unit) -> bool:
        """Backward starts with the last layers: with autograd on, forward leaves the last ``prefetch`` loaded."""
        return torch.is_grad_enabled() and self.prefetch > 0 and \
            unit in self.streamed[max(0, len(self.streamed) - self.prefetch):]

    def _prefetch(self, unit: _Unit, backward: bool) -> None:
        """Fetch the next ``prefetch`` streamed layers in the direction the pass runs."""
        at = self.streamed.index(unit)
        ahead = self.streamed[max(0, at - self.prefetch):at] if backward else \
            self.streamed[at + 1:at + 1 + self.prefetch]
        for other in (reversed(ahead) if backward else ahead):
            self.fetch(other)

    # ------------------------------------------------------------------ gradients to the host

    @torch.no_grad()
    def take_grads(self, unit: _Unit, grads: Sequence[Tensor | None]) -> None:
        """Add a streamed layer's weight gradients of one micro-batch into its host slots, in order.

        Into ZeRO-1 slots that hold the zeros of a new step (``unit.zeroed``) the gradients are copied instead,
        straight from the device into the page-locked slots: no staging, no host addition and no zero fill of
        the host buffer each step (``_zero_grads``). The copy is of ``0 + g``, what ``AccumulateGrad`` adds into
        zeros (a negative zero comes out positive), so the bits are the same."""
        if unit.grads is None:
            unit.grads = [p.grad for p in unit.params]
            for p in unit.params:
                p.grad = None
        slots = unit.grads
        final = self._last_backward  # this step's last gradients for the unit: its squares can be summed
        self._wait_update()  # (done by now: forward waited for every layer's masters) it reads the last gradients
        if unit.zeroed and all(s is not None for s in slots):
            unit.zeroed = unit.stale = False
            sent = [(i, g) for i, g in enumerate(grads) if g is not None]
            gs = [g for _, g in sent]
            if gs:
                torch._foreach_add_(gs, 0.0)
            targets = [slots[i] for i, _ in sent]
            unsent = [slots[i] for i in sorted(set(range(len(slots))) - {i for i, _ in sent})]
            squares = None
            if final:  # the slots will hold exactly these values: their squares summed here, on the device
                squares = torch.empty((), dtype=torch.float64, pin_memory=self.cuda)
                gs, targets = gs + [squares_of(gs, self.device).reshape(())], targets + [squares]

            def landed() -> None:  # a parameter without a gradient this micro-batch keeps zeros
                for t in unsent:
                    t.zero_()
            self._copy_to(targets, gs, landed)
        else:
            sent = [(i, g) for i, g in enumerate(grads) if g is not None and g.numel()]
            squares = None

            def land(host: list[Tensor]) -> None:
                for (i, _), h in zip(sent, host):
                    _accumulate(slots, i, h)

            if sent:
                self._to_host([g for _, g in sent], land)
        if final:
            self._sum_squares(unit, squares)

    def _sum_squares(self, unit: _Unit, landed: Tensor | None) -> None:
        """Once ``unit``'s final gradients have landed, their sum of squares (``landed``, copied with them from the
        device; otherwise summed on the worker thread, in order); after the last streamed layer's, hand ZeRO the
        host shard's total. Layer by layer, each sum overlaps the backward of the layers still to come instead of
        waiting, whole, at the end of backward."""
        squares, slots = self._squares, self._slots(unit)
        self._on_worker(lambda: squares.__setitem__(
            unit.index, landed.clone() if landed is not None else squares_of(slots)))
        if unit is not self.streamed[0]:
            return
        self._last_backward, self._squares = False, {}
        rest = {u.index: self._slots(u) for u in self.streamed}  # a layer that sent nothing in it still counts

        def total() -> Tensor:
            for index, its in rest.items():
                if index not in squares:
                    squares[index] = squares_of(its)
            return sum((squares[i] for i in sorted(squares)), torch.zeros((), dtype=torch.float64))
        self._zero.provide_squared_norm(self._on_worker(total))

    def _slots(self, unit: _Unit) -> list[Tensor]:
        return [s for s in (unit.grads if unit.grads is not None else [p.grad for p in unit.params])
                if s is not None]

    def _on_worker(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Run ``fn`` after every gradient handed to the worker so far (inline on a CPU device); returns what
        waits for its result."""
        if not self.cuda:
            out = fn()
            return lambda: out
        future = self._worker.submit(fn)
        self._pending.append(future)
        return future.result

    def _copy_to(self, slots: Sequence[Tensor], tensors: Sequence[Tensor], then: Callable[[], None]) -> None:
        """Copy device ``tensors`` into host ``slots`` on the gradient stream; the worker waits for the copy, then
        runs ``then`` (in submission order)."""
        if not self.cuda:
            for slot, t in zip(slots, tensors):
                slot.copy_(t)
            then()
            return
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h):
            for slot, t in zip(slots, tensors):
                slot.copy_(t, non_blocking=True)
                t.record_stream(self.d2h)
            done = torch.cuda.Event()
            done.record(self.d2h)

        def run() -> None:
            done.synchronize()
            then()
        self._pending.append(self._worker.submit(run))

    def _to_host(self, tensors: Sequence[Tensor], land: Callable[[list[Tensor]], None]) -> None:
        """Copy device ``tensors`` into one pinned staging buffer on the gradient stream; the worker thread waits
        for the copy, calls ``land`` with the host copies and frees the buffer (in submission order)."""
        if not self.cuda:
            land(list(tensors))
            return
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        buf = self.staging.acquire(nbytes)
        while buf is None and self._pending:  # staging is full: wait for the oldest copies
            self._pending.pop(0).result()
            buf = self.staging.acquire(nbytes)
        if buf is None:
            raise RuntimeError(f"offload.params: the gradients of one layer ({nbytes / 2**20:.1f} MiB) exceed the "
                               f"pinned staging buffers ({self.staging.limit_bytes / 2**20:.0f} MiB)")
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        host, offset = [], 0
        with torch.cuda.stream(self.d2h):
            for t in tensors:
                n = t.numel() * t.element_size()
                h = buf[offset:offset + n].view(t.dtype).view(t.shape)
                h.copy_(t, non_blocking=True)
                t.record_stream(self.d2h)
                host.append(h)
                offset += n
            done = torch.cuda.Event()
            done.record(self.d2h)

        def run() -> None:
            done.synchronize()
            land(host)
            self.staging.release(buf)

        self._pending.append(self._worker.submit(run))

    def _zero_grads(self) -> None:
        """ZeRO-1's ``zero_grad``: every host slot holds zeros from now on, written by the next landing (a copy) or
        by ``flush`` (layers that sent nothing)."""
        for unit in self.streamed:
            unit.zeroed = unit.stale = True

    def drain(self) -> None:
        """Wait for every gradient copy in flight (re-raising a failure of one)."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    @torch.no_grad()
    def flush(self) -> None:
        """The streamed layers' gradients landed on the host and every device copy freed. ZeRO's
        ``reduce_gradients`` calls this first, so the reduction sees every gradient on the host; its ``step``
        calls it last, since the update makes every device copy stale."""
        self.drain()
        self._last_backward, self._squares = False, {}  # a norm not handed over by now is summed by ZeRO
        for unit in self.streamed:
            self.release(unit)
            if unit.stale:  # sent nothing since zero_grad: its zeros made real before anyone reads them
                self._wait_update()  # (the update behind may still read last step's gradients there)
                for slot in self._slots(unit):
                    slot.zero_()
                unit.stale = False
            if unit.grads is not None:
                for p, g in zip(unit.params, unit.grads):
                    p.grad = g
                unit.grads = None

    def close(self) -> None:
        """Stop streaming: parameters back on their masters, hooks and threads gone (idempotent)."""
        self.flush()
        if self._overlap is not None:
            self._overlap(self._behind, False)  # waits, then steps them inside ``step`` again
            self._overlap = None
        for hook in self._hooks:
            hook.remove()
        for hook in self._state_hooks:
            hook.remove()
        self._unhook_zero()
        for layer in self._wrapped:
            del layer.forward  # the class's forward again
        self._wrapped = []
        self._finalizer()

    @staticmethod
    def _close(worker: cf.ThreadPoolExecutor | None, unpin: list[Callable[[], None]],
               staging: HostPool | None) -> None:
        if worker is not None:
            worker.shutdown(wait=True)
        if staging is not None:
            staging.close()
        for undo in unpin:
            undo()
        unpin.clear()


def _accumulate(slots: list[Tensor | None], i: int, g: Tensor) -> None:
    """``AccumulateGrad``'s arithmetic on the host: the first gradient is taken (copied), later ones added."""
    if slots[i] is None:
        slots[i] = g.to("cpu", copy=True)
    else:
        slots[i].add_(g)


def attach_param_offload(model: nn.Module, layers: Sequence[nn.Module], zero: Any, device: torch.device | str, *,
                         prefetch: int = 2, pin_masters: bool = True, leading: Sequence[nn.Module] = ()
                         ) -> ParamOffload:
    """Stream ``layers``' weights from the host (apply after ``zero``, the host ZeRO-1/2 part of a ``PlacedZero``
    over exactly these layers, built its buffers on the host; ``leading``: the resident layers before them)."""
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError("parameter offload is already attached to this model")
    off = ParamOffload(model, layers, zero, torch.device(device), prefetch=prefetch, pin_masters=pin_masters,
                       leading=leading)
    setattr(model, _ATTR, off)
    return off


def get_param_offload(model: nn.Module) -> ParamOffload | None:
    return getattr(model, _ATTR, None)


def detach_param_offload(model: nn.Module) -> None:
    """Remove the model's parameter offload (parameters stay on their host masters)."""
    off = getattr(model, _ATTR, None)
    if off is not None:
        off.close()
        delattr(model, _ATTR)
