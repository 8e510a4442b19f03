"""A trial's LoRA edit of the stacked groups, recorded once as a CUDA graph and replayed every trial.

Why. The batched edit (:mod:`abliterate.batched_ablation`) reads the weights once, at memory
bandwidth, but for a small model its kernels are not what takes the time: on an H200 a Qwen3-0.6B
trial's two ``bmm`` per group read 294 MB in 0.07 ms while some forty PyTorch calls around them took
about 0.5 ms on the host. A graph replays all of them with one launch.

What a graph fixes. It replays the same kernels on the same addresses with the same shapes, so:

* every layer of every recorded group is computed every trial, with λ = 0 where the trial's kernels
  give 0 (B is then exactly zero, which is what the eager path writes for a layer it does not edit).
  A trial that edits a few layers still reads every recorded weight once: at most the bandwidth
  bound, paid to save the launches.
* a trial's inputs are copied into static tensors: the (n_layers, hidden) unit directions (one copy
  on the device) and the per-layer weights of all groups (one copy from pinned host memory).
* the stacked weights and the LoRA factors must keep their addresses: the graph holds them, and the
  Ablator's check that the model still computes with the stack (``WeightGroup.check_views``, every
  trial) is what catches a model moved after recording.

Not recorded (they keep the eager batched path, with one log line saying why): row_norm ``full``
(``torch.linalg.eigh`` checks its result on the host, which a graph cannot), direct edits (their
backup-and-restore is the CPU's route; on a GPU the default is LoRA), and groups on a second device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from . import devices
from .batched_ablation import WeightGroup

log = logging.getLogger(__name__)

# (group, directions (L, hidden) float32, λ (L,) float32) -> B (L, out, k), A (L, k, in)
Factors = Callable[[WeightGroup, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def graph_reason(groups: Sequence[WeightGroup], row_norm: str, enabled: bool) -> str | None:
    """Why the groups' edit is not recorded as a graph, or None when it can be."""
    if not enabled:
        return "turned off (evaluation.cuda_graphs)"
    if not groups:
        return "no stacked LoRA groups"
    if row_norm == "full":
        return "row_norm full (its small eigendecompositions check their result on the host)"
    if len({g.stored.device for g in groups}) > 1:
        return "the stacked groups span several devices"
    if groups[0].stored.device.type != "cuda":
        return f"not on CUDA ({groups[0].stored.device.type})"
    return None


class EditGraph:
    """The LoRA factors of every layer of ``groups`` from static inputs, as one replayable graph, and
    a second graph that zeroes their B factors (the reset).

    Off CUDA nothing is recorded and :meth:`replay` runs the same steps eagerly, so the CPU tests check
    what a graph computes (every layer, λ = 0 outside the kernels) against the eager batched path."""

    def __init__(self, groups: Sequence[WeightGroup], factors: Factors, n_layers: int, hidden: int) -> None:
        self.groups = list(groups)
        self.device = self.groups[0].stored.device
        sizes = [len(g.components) for g in self.groups]
        self.weights = torch.zeros(sum(sizes), dtype=torch.float32, device=self.device)
        self.directions = torch.zeros(n_layers, hidden, dtype=torch.float32, device=self.device)
        self._lams = self.weights.split(sizes)
        self._copied: torch.Tensor | None = None  # the table self.directions holds a copy of
        # a layer index that is a tensor must exist before recording: creating it copies from the host
        self._index = [g.layer_index(0, len(g.components)) for g in self.groups]
        self._factors = factors
        self._lora_b = [b for g in self.groups for b in g.lora_b]  # what the reset zeroes
        self.outputs: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = []
        self._edit = self._zero = None
        if self.device.type != "cuda":
            return
        self._edit = torch.cuda.CUDAGraph()
        self._zero = torch.cuda.CUDAGraph()
        start = time.perf_counter()
        self._record()
        log.info("edit graph: the LoRA factors of %d stacked groups (%d layers) recorded as one CUDA graph in %.2f s",
                 len(self.groups), sum(sizes), time.perf_counter() - start)

    def _step(self) -> list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
        outputs = []
        for group, lam, index in zip(self.groups, self._lams, self._index):
            b, a = self._factors(group, self.directions[index], lam)
            bs, as_ = b.unbind(0), a.unbind(0)
            torch._foreach_copy_(group.lora_b, bs)
            torch._foreach_copy_(group.lora_a, as_)
            outputs.append((bs, as_))
        return outputs

    def _record(self) -> None:
        # one eager run on a side stream first: cuBLAS handles and workspaces are created outside the
        # recording (λ = 0, so it writes zero B factors, as after a reset)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._step()
        current.wait_stream(side)
        with torch.cuda.graph(self._edit):
            self.outputs = self._step()
        with torch.cuda.graph(self._zero):
            torch._foreach_zero_(self._lora_b)

    def replay(self, weights: list[float], directions: torch.Tensor) -> None:
        """Write this trial's factors: ``weights`` per layer of every group in order, ``directions``
        (n_layers, hidden) float32 unit directions on the graph's device."""
        self.weights.copy_(devices.host_to(weights, self.device), non_blocking=True)
        if directions is not self._copied:  # per-layer tables are one tensor, never changed: copied once
            self.directions.copy_(directions)
            self._copied = directions
        if self._edit is None:
            self.outputs = self._step()
        else:
            self._edit.replay()

    def zero(self) -> None:
        """Every recorded group back to B = 0 (the base model), in one launch."""
        if self._zero is None:
            torch._foreach_zero_(self._lora_b)
        else:
            self._zero.replay()
