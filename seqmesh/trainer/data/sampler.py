"""The global batch of every step: which documents, in which order, resumable and peekable.

One sampler serves the whole job (every rank computes the same sequence): the scheduler, not the
sampler, decides which rank runs which document. Each epoch is a fresh permutation drawn from
``(seed, epoch)`` alone, so step ``s`` is a pure function of (seed, dataset size, global batch, s):
resuming only needs the position, and ``peek`` can look into the next epoch without side effects.
The last ``num_docs % global_batch`` documents of each epoch's order are left out, so every step has
exactly ``global_batch`` documents (a different few are left out each epoch).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def check_global_batch(num_docs: int, global_batch: int) -> None:
    if global_batch < 1:
        raise ValueError(f"data.global_batch={global_batch} must be >= 1")
    if num_docs < global_batch:
        raise ValueError(f"the training split has {num_docs} documents, fewer than data.global_batch="
                         f"{global_batch}; lower data.global_batch or use a larger corpus")


class GlobalBatchSampler:
    def __init__(self, num_docs: int, global_batch: int, seed: int) -> None:
        check_global_batch(num_docs, global_batch)
        self.num_docs, self.global_batch, self.seed = num_docs, global_batch, seed
        self.steps_per_epoch = num_docs // global_batch
        self.epoch, self.step = 0, 0
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_docs)
        return self._orders[epoch]

    def _batch(self, epoch: int, step: int) -> list[int]:
        start = step * self.global_batch
        return self._order(epoch)[start:start + self.global_batch].tolist()

    @property
    def steps_done(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step

    def __iter__(self) -> "GlobalBatchSampler":
        return self

    def __next__(self) -> list[int]:
        batch = self._batch(self.epoch, self.step)
        self.epoch, self.step = divmod(self.steps_done + 1, self.steps_per_epoch)
        return batch

    def peek(self, k: int) -> list[list[int]]:
        """The next ``k`` global batches, exactly as ``next`` will yield them, without advancing."""
        return [self._batch(*divmod(self.steps_done + j, self.steps_per_epoch)) for j in range(k)]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "num_docs": self.num_docs, "global_batch": self.global_batch,
                "epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "num_docs", "global_batch"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data position: the checkpoint has {key}={state[key]} but this run has "
                    f"{getattr(self, key)}; resume with the same data settings (source, limits, seed, "
                    f"max_seq_len, long_doc_policy, global_batch) or start without resume"
                )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
