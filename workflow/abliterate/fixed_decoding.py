"""Greedy decode steps at fixed shapes, replayed as a CUDA graph: those of
:class:`~abliterate.generation.FixedShapeDecoder`, chosen on a CUDA device where the model allows it.

On a GPU, decoding a small model one token at a time is bound by Python and kernel launches, not by
the GPU: a step of a small model costs far more time than its arithmetic and weight reads
(benchmarks/README.md, section "On a GPU"). A CUDA graph records one step's kernels once and
replays them with a single launch. This module stays only if it beats transformers' own static
cache (``generate(cache_implementation="static")``) in the step ``static06`` of
benchmarks/gpu_run.sh, which has not been run yet.

A graph replays fixed kernels on fixed addresses, so everything a step touches has a fixed shape and
place: the KV cache is allocated for the whole response up front and written at a slot index; the
attention mask is a fixed-width boolean tensor whose next column the step switches on; the step's
inputs (each row's last token, its position, the slot) are buffers that the step itself advances.
Rows that finish stay in the batch and are ignored: removing them would change the shapes, and at
these sizes an idle row costs next to nothing. Without a graph (on the CPU, in tests) the same step
runs eagerly, so its arithmetic is checked where no GPU is.

A graph is captured per batch and dropped with it: trials replace or edit weights between
generations, and a graph kept longer could read a tensor the model no longer uses.
"""

from __future__ import annotations

import torch

from . import hf_compat

# attention implementations whose mask argument this module knows how to build
_MASKS = ("sdpa", "eager")


class FixedShapeBatch:
    """Greedy decoding of one prefilled batch, one token per :meth:`step`, at fixed shapes.

    ``cache``: the prefill's KV cache (plain layers with ``keys``/``values``); ``mask``: its
    ``(rows, width)`` attention mask; ``positions``: each row's last position, ``(rows, 1)``;
    ``first``: the token each row continues with (chosen from the prefill's logits). ``steps``: how
    many steps at most will follow. ``graph``: record the step once as a CUDA graph and replay it.
    :attr:`tokens` holds each row's newest token after every step.
    """

    def __init__(self, model, cache, mask, positions, first, steps: int, graph: bool):
        implementation = hf_compat.attention_implementation(model)
        if implementation not in _MASKS:
            raise ValueError(f"fixed-shape decoding needs sdpa or eager attention, not {implementation}")
        self.model = model
        rows, width = mask.shape
        total = width + max(steps, 1)
        self.slot = torch.full((1,), width, dtype=torch.long, device=mask.device)
        self.cache = hf_compat.fixed_cache(model, cache, width, total, self.slot)
        self.attend = torch.zeros((rows, total), dtype=torch.bool, device=mask.device)
        self.attend[:, :width] = mask.bool()
        self.positions = positions.clone()
        self.tokens = first.clone()
        self.kwargs = hf_compat.forward_kwargs(model)
        self.input_device = hf_compat.input_device(model)
        self.float_mask = None if implementation == "sdpa" else self.cache.layers[0].keys.dtype
        self.graph = self._capture() if graph else None

    def _advance(self) -> None:
        """One step, in place: everything it reads and writes lives in this object's buffers."""
        self.attend.index_fill_(1, self.slot, True)
        self.positions.add_(1)
        mask = self.attend[:, None, None, :]
        if self.float_mask is not None:
            # eager attention adds its mask to the scores
            mask = torch.zeros((), dtype=self.float_mask, device=mask.device).masked_fill(
                ~mask, torch.finfo(self.float_mask).min
            )
        out = self.model(
            input_ids=self.tokens[:, None].to(self.input_device),
            attention_mask=mask,
            position_ids=self.positions,
            **hf_compat.cache_arg(self.cache),
            use_cache=True,
            **self.kwargs,
        )
        self.tokens.copy_(out.logits[:, -1].argmax(-1))
        self.slot.add_(1)

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Record :meth:`_advance` as a graph; the state a warm-up step changed is put back."""
        saved = [t.clone() for t in (self.attend, self.positions, self.tokens, self.slot)]
        stream = torch.cuda.Stream(device=self.tokens.device)
        stream.wait_stream(torch.cuda.current_stream(self.tokens.device))
        # a first eager run on a side stream lets libraries allocate workspaces outside the capture
        with torch.cuda.stream(stream):
            self._advance()
        torch.cuda.current_stream(self.tokens.device).wait_stream(stream)
        for buffer, value in zip((self.attend, self.positions, self.tokens, self.slot), saved):
            buffer.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._advance()
        return graph

    def step(self) -> torch.Tensor:
        """Decode one more token for every row; return :attr:`tokens`."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._advance()
        return self.tokens
