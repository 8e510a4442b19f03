"""Greedy generation that stops each response as soon as its refusal verdict is known.

:func:`make_decoder` picks the decoder once per model: :class:`FixedShapeDecoder`, whose steps
replay CUDA graphs (:mod:`abliterate.fixed_decoding`), on a CUDA device where
:func:`cuda_graph_reason` allows it; :class:`ContinuousDecoder` on CPUs, MPS, and wherever graphs are
impossible or turned off. How they compare: benchmarks/README.md, section "On a GPU". Prompts run
longest first, at most ``batch_size`` at a time; results come back in the original order.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from . import greedy_head, hf_compat
from .architecture import text_config, unwrap
from .fixed_decoding import _MASKS, FixedShapeBatch
from .prompting import encode, length_order

log = logging.getLogger(__name__)


class RefusalLimitReached(Exception):
    """Generation was abandoned because ``refusals`` responses had been judged refusals (the
    ``max_refusals`` of :meth:`Decoder.generate`); the other responses were not all finished."""

    def __init__(self, refusals: int):
        super().__init__(f"stopped after {refusals} refusals")
        self.refusals = refusals


class Verdict(Protocol):
    def verdict(self, partial_text: str) -> bool | None: ...


class Decoder(Protocol):
    """Greedy decoding of prompt batches (:func:`make_decoder` picks one); see :meth:`BatchDecoder.generate`."""

    def generate(self, texts: Sequence[str], max_new_tokens: int, detector: Verdict | None = None,
                 max_refusals: int | None = None, prefill_fn: Callable | None = None,
                 progress: bool = False) -> list[list[int]]: ...


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a response: the generation config's EOS ids plus the tokenizer's EOS.

    Chat models often list several (end of turn, end of text); the tokenizer's is added because a
    model loaded without a generation config would otherwise never stop before the budget.
    """
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    found = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(found, int):
        ids.add(found)
    elif found is not None:
        ids.update(int(i) for i in found)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: real tokens count from 0, padding gets 0 (as generate does)."""
    return (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 0)


def prompt_forward_inputs(model, enc: dict) -> dict:
    """Everything one cache-less forward over an encoded left-padded batch needs, for this model."""
    inputs = dict(enc, **hf_compat.forward_kwargs(model))
    if hf_compat.accepts_position_ids(model):
        inputs["position_ids"] = left_padded_positions(enc["attention_mask"])
    return inputs


# Below this many shared tokens, a separate prefix forward costs more than it saves.
MIN_SHARED_PREFIX = 4


def shared_prefix_length(input_ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Tokens every row of a left-padded batch starts with (system prompt, template header...).

    At least one token of each row is left out of the prefix, so every row has a suffix to forward.
    """
    lengths = mask.sum(-1)
    shortest = int(lengths.min())
    if input_ids.shape[0] < 2 or shortest < 2:
        return 0
    width = input_ids.shape[1]
    # Real tokens of row i start at column width - length_i; align the rows at their first token.
    starts = (width - lengths).cpu().tolist()
    aligned = torch.stack([input_ids[i, s : s + shortest - 1] for i, s in enumerate(starts)])
    same = (aligned == aligned[:1]).all(0)
    return int(same.cumprod(0).sum())


def full_attention_only(model) -> bool:
    """True unless some layer attends through a sliding window.

    A sliding window counts cache slots, not positions, so the padding gap between a shared prefix
    and a row's own tokens would shrink what the window sees: such models skip prefix sharing.
    """
    config = text_config(model.config)
    if any("sliding" in str(t) for t in getattr(config, "layer_types", None) or ()):
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or getattr(config, "use_sliding_window", True) is False


@dataclass(frozen=True)
class PrefillPlan:
    """How a left-padded prompt batch is forwarded: a shared prefix once, then each row's tokens.

    ``ids``, ``mask`` and ``positions`` are those of the second forward (the whole batch when
    ``n_shared`` is 0); ``mask`` and ``positions`` are also what decoding continues from.
    """

    n_shared: int
    prefix: torch.Tensor | None
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor


def plan_prefill(model, enc: dict) -> PrefillPlan:
    """Split ``enc`` into a shared prefix (system prompt, template header) and each row's own tokens.

    Chat prompts share their first tokens, often a third of each prompt. Where the model takes
    position ids and a cache, that prefix is computed once and its KV cache copied to every row; the
    rows' own tokens follow, left-padded after the prefix (the mask holds the gap).
    """
    ids, mask = enc["input_ids"], enc["attention_mask"]
    shareable = hf_compat.accepts_position_ids(model) and full_attention_only(model)
    n_shared = shared_prefix_length(ids, mask) if shareable else 0
    if n_shared < MIN_SHARED_PREFIX:
        return PrefillPlan(0, None, ids, mask, left_padded_positions(mask))
    lengths = mask.sum(-1).cpu().tolist()
    rows, width = ids.shape
    start = width - lengths[0]
    prefix = ids[:1, start : start + n_shared]
    # Each row without its prefix, still left-padded: the last max(length) - n_shared columns,
    # where the prefix tokens of the longer rows are masked out like padding.
    suffix_width = max(lengths) - n_shared
    suffix = ids[:, width - suffix_width :]
    suffix_mask = torch.zeros_like(suffix)
    for i, n in enumerate(lengths):
        suffix_mask[i, suffix_width - (n - n_shared) :] = 1
    full_mask = torch.cat([mask.new_ones((rows, n_shared)), suffix_mask], dim=1)
    return PrefillPlan(n_shared, prefix, suffix, full_mask, n_shared + left_padded_positions(suffix_mask))


def run_prefill(
    model,
    plan: PrefillPlan,
    use_cache: bool = True,
    embeds: tuple[torch.Tensor | None, torch.Tensor] | None = None,
    fill_cache: Callable | None = None,
    logits_to_keep: int = 1,
) -> tuple[object, torch.Tensor, torch.Tensor]:
    """Forward a planned prefill; return ``(output, attention_mask, position_ids)``.

    ``embeds``: ``(prefix_states, states)`` fed instead of the ids, for a decoder that runs only
    some of its layers (:mod:`abliterate.leading_layers`); ``fill_cache(cache)`` is called once the
    prefix sits in every row, before the rows' own tokens are forwarded. ``logits_to_keep``: the
    last positions whose logits the rows' forward computes (a teacher-forced answer needs several;
    a model without the argument computes all of them).
    """
    common = hf_compat.forward_kwargs(model)
    kwargs = dict(common)
    if "logits_to_keep" in kwargs:
        kwargs["logits_to_keep"] = logits_to_keep
    if hf_compat.accepts_position_ids(model):
        kwargs["position_ids"] = plan.positions
    if embeds is None:
        prefix_in, rows_in = {"input_ids": plan.prefix}, {"input_ids": plan.ids}
    else:
        prefix_in, rows_in = {"inputs_embeds": embeds[0]}, {"inputs_embeds": embeds[1]}
    cache = None
    if plan.n_shared:
        shared = model(
            **prefix_in,
            attention_mask=plan.mask.new_ones((1, plan.n_shared)),
            position_ids=torch.arange(plan.n_shared, device=plan.ids.device)[None],
            **hf_compat.cache_arg(hf_compat.new_cache(model)),
            use_cache=True,
            **common,
        )
        cache = hf_compat.output_cache(shared)
        cache.batch_repeat_interleave(plan.ids.shape[0])
    elif use_cache:
        cache = hf_compat.new_cache(model)
    if fill_cache is not None and cache is not None:
        fill_cache(cache)
    if cache is not None:
        kwargs[hf_compat.CACHE] = cache  # None: a model with special cache layers builds its own
    out = model(**rows_in, attention_mask=plan.mask, use_cache=use_cache or cache is not None, **kwargs)
    return out, plan.mask, plan.positions


def prefill(model, enc: dict, use_cache: bool = True, logits_to_keep: int = 1) -> tuple[object, torch.Tensor, torch.Tensor]:
    """Forward a left-padded prompt batch (see :func:`plan_prefill`); return
    ``(output, attention_mask, position_ids)``.

    The returned mask and positions cover the shared prefix and are what decoding continues from;
    ``output.logits`` holds the last ``logits_to_keep`` positions' logits of each row.
    """
    return run_prefill(model, plan_prefill(model, enc), use_cache, logits_to_keep=logits_to_keep)


class _IncrementalText:
    """Decoded text of each live row, extended by a short window of tokens per step.

    Decoding the two windows ``ids[prefix:read]`` and ``ids[prefix:]`` and keeping the difference
    (as vLLM does) is exact for tokenizers that merge spaces or bytes across tokens: text is only
    taken once it no longer ends in an incomplete UTF-8 character. Cost per step is constant in the
    response length instead of growing with it.
    """

    def __init__(self, tokenizer, n: int):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # the Rust decoder in one call per step; the Python wrapper loops over rows
            self.decode = lambda seqs: backend.decode_batch(seqs, skip_special_tokens=True)
        else:
            self.decode = lambda seqs: tokenizer.batch_decode(seqs, skip_special_tokens=True)
        self.text = [""] * n
        self.prefix = [0] * n
        self.read = [0] * n

    def update(self, rows: list[int], generated: list[list[int]]) -> list[int]:
        """Extend the text of ``rows``; return those whose text changed."""
        if not rows:
            return []
        old = self.decode([generated[r][self.prefix[r] : self.read[r]] for r in rows])
        new = self.decode([generated[r][self.prefix[r] :] for r in rows])
        changed = []
        for r, a, b in zip(rows, old, new):
            if len(b) > len(a) and not b.endswith("\ufffd"):
                self.text[r] += b[len(a) :]
                self.prefix[r] = self.read[r]
                self.read[r] = len(generated[r])
                changed.append(r)
        return changed


def refill_threshold(batch_size: int) -> int:
    """Free rows that make it worth prefilling waiting prompts into a running batch.

    A prefill is one forward with its own fixed cost (a few dozen kernel launches per layer);
    admitting prompts a quarter batch at a time keeps the batch nearly full at a few such calls.
    """
    return max(1, batch_size // 4)


class _Responses:
    """Each prompt's generated ids, and which rows a step's tokens finish.

    A row finishes on an EOS id, at ``max_new_tokens``, or when the ``detector`` has a verdict on
    its text so far; ``on_finish(n)`` is told how many finished. Raises
    :class:`RefusalLimitReached` once ``max_refusals`` rows have been stopped by the detector.
    """

    def __init__(self, tokenizer, n: int, max_new_tokens: int, detector, eos: set[int], on_finish,
                 max_refusals: int | None):
        self.generated: list[list[int]] = [[] for _ in range(n)]
        self.decoder = _IncrementalText(tokenizer, n) if detector is not None else None
        self.max_new_tokens, self.detector, self.eos = max_new_tokens, detector, eos
        self.on_finish, self.max_refusals = on_finish, max_refusals
        self.refused = 0

    def record(self, rows: Sequence[int], tokens: Sequence[int]) -> set[int]:
        """Append each row's newest token (``tokens[j]`` belongs to ``rows[j]``); return the rows
        that are finished now."""
        finished = set()
        for row, tok in zip(rows, tokens):
            self.generated[row].append(tok)
            if tok in self.eos or len(self.generated[row]) >= self.max_new_tokens:
                finished.add(row)
        if self.decoder is not None:
            pending = [r for r in rows if r not in finished]
            for r in self.decoder.update(pending, self.generated):
                if self.detector.verdict(self.decoder.text[r]) is not None:
                    finished.add(r)
                    self.refused += 1
            if self.max_refusals is not None and self.refused >= self.max_refusals:
                raise RefusalLimitReached(self.refused)
        if finished:
            self.on_finish(len(finished))
        return finished


class BatchDecoder:
    """A :class:`Decoder` with at most ``batch_size`` rows live at once; a subclass's ``_run(texts,
    order, responses, prefill_fn)`` decodes the prompts in ``order``, recording tokens in ``responses``."""

    def __init__(self, model, tokenizer, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.inference_mode()
    def generate(self, texts: Sequence[str], max_new_tokens: int, detector: Verdict | None = None,
                 max_refusals: int | None = None, prefill_fn: Callable | None = None,
                 progress: bool = False) -> list[list[int]]:
        """Greedy continuation token ids of each text (EOS included when produced), in input order.

        ``max_refusals``: give up, raising :class:`RefusalLimitReached`, as soon as that many
        responses have been stopped by the ``detector`` (a caller that only needs to know whether
        the count reaches it saves the rest of the generation). ``prefill_fn`` replaces
        :func:`prefill` (same arguments and result). Prompts run longest first.
        """
        if max_new_tokens < 1 or not texts:
            return [[] for _ in texts]
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if max_refusals is not None:
            if detector is None:
                raise ValueError("max_refusals needs a detector to judge refusals")
            if max_refusals <= 0:
                raise RefusalLimitReached(0)
        eos = eos_token_ids(self.model, self.tokenizer)
        order = length_order(self.tokenizer, texts)
        start = time.perf_counter()
        with tqdm(total=len(texts), desc="generate", unit="prompt", disable=not progress) as bar:
            responses = _Responses(self.tokenizer, len(texts), max_new_tokens, detector, eos, bar.update, max_refusals)
            results = self._run(texts, order, responses, prefill_fn or prefill)
        seconds = time.perf_counter() - start
        n_tokens = sum(len(r) for r in results)
        log.debug("generated %d tokens for %d prompts in %.2f s (%.1f tokens/s)",
                  n_tokens, len(texts), seconds, n_tokens / max(seconds, 1e-9))
        return results


class ContinuousDecoder(BatchDecoder):
    """Continuous batching, a hand-written loop over the KV cache rather than ``model.generate``: a
    row leaves the batch the moment it is finished (EOS, token budget, or a refusal marker seen by
    the detector), its rows of the input, attention mask, positions and KV cache are dropped, and
    waiting prompts are prefilled and join the running batch, so it stays full and later steps
    compute only live sequences. When the cache cannot take new rows, a batch runs to its end before
    the next one starts. Without early stops the tokens are those of ``model.generate(do_sample=False)``.
    On a CPU the steps may take each token from an output layer screened in bfloat16
    (:mod:`abliterate.greedy_head`): the same tokens, up to float32 rounding.
    """

    def _run(self, texts, order, responses, prefill_fn):
        model, tokenizer, batch_size = self.model, self.tokenizer, self.batch_size
        device = hf_compat.input_device(model)
        kwargs = hf_compat.forward_kwargs(model)
        use_pos = hf_compat.accepts_position_ids(model)
        head = greedy_head.screened_head(model)
        decoder = model.get_decoder() if head is not None else None
        queue = list(order)
        alive: list[int] = []  # batch row -> index into texts
        cache = mask = pos = next_tok = None
        appendable = False
        n_prefills = 0
        while True:
            # next_tok holds each live row's newest token, not yet recorded
            if alive:
                finished = responses.record(alive, next_tok.cpu().tolist())
                if finished:
                    keep = [j for j, r in enumerate(alive) if r not in finished]
                    alive = [alive[j] for j in keep]
                    if alive:
                        index = torch.tensor(keep, device=device)
                        # moves the index to each layer's device itself
                        hf_compat.select_rows(cache, index)
                        next_tok = next_tok[index.to(next_tok.device)]
                        mask, pos = mask[index], pos[index]
                if alive:
                    pos = pos + 1
                    mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
                    step = dict(input_ids=next_tok[:, None].to(device), attention_mask=mask,
                                **hf_compat.cache_arg(cache), use_cache=True)
                    if use_pos:
                        step["position_ids"] = pos
                    if head is not None:
                        next_tok, cache = greedy_head.greedy_step(decoder, head, **step)
                    else:
                        out = model(**step, **kwargs)
                        cache = hf_compat.output_cache(out)
                        next_tok = out.logits[:, -1].argmax(-1)
                        del out
            free = batch_size - len(alive)
            refill = appendable and free >= min(refill_threshold(batch_size), len(queue))
            if queue and (not alive or refill):
                rows, queue = queue[:free], queue[free:]
                out, new_mask, new_pos = prefill_fn(model, encode(tokenizer, [texts[i] for i in rows], device))
                n_prefills += 1
                new_tok = out.logits[:, -1].argmax(-1)
                if alive:
                    mask = hf_compat.append_rows(cache, hf_compat.output_cache(out), mask, new_mask)
                    pos = torch.cat([pos, new_pos[:, -1:]])
                    next_tok = torch.cat([next_tok, new_tok.to(next_tok.device)])
                else:
                    cache, mask, pos, next_tok = hf_compat.output_cache(out), new_mask, new_pos[:, -1:], new_tok
                    appendable = hf_compat.can_append_rows(cache)
                alive += rows
                del out
            if not alive:
                break
        log.debug("%d prompts in %d prefills of at most %d rows", len(texts), n_prefills, batch_size)
        return responses.generated


class FixedShapeDecoder(BatchDecoder):
    """A batch at a time, each decoded at fixed shapes (:class:`~abliterate.fixed_decoding.FixedShapeBatch`),
    as a CUDA graph when ``graph`` (default: on a CUDA device). A batch runs until all its rows are
    finished; no rows join it on the way. After a failed capture (other than out of memory) the
    rest of that call runs its steps eagerly, the same tokens; later calls, and decoders made later
    for the model (:func:`cuda_graph_reason`), decode with continuous batching instead.
    """

    def __init__(self, model, tokenizer, batch_size: int, graph: bool | None = None):
        super().__init__(model, tokenizer, batch_size)
        self.graph = hf_compat.input_device(model).type == "cuda" if graph is None else graph
        self.fallback: ContinuousDecoder | None = None  # set by a failed capture

    def _run(self, texts, order, responses, prefill_fn):
        if self.fallback is not None:  # fixed shapes without the graph gain nothing over continuous batching
            return self.fallback._run(texts, order, responses, prefill_fn)
        device = hf_compat.input_device(self.model)
        for start in range(0, len(order), self.batch_size):
            rows = list(order[start : start + self.batch_size])
            out, mask, pos = prefill_fn(self.model, encode(self.tokenizer, [texts[i] for i in rows], device))
            first = out.logits[:, -1].argmax(-1)
            # a row records the prefill's token, then at most max_new_tokens - 1 decoded ones
            batch = self._batch(hf_compat.output_cache(out), mask, pos[:, -1:], first, responses.max_new_tokens - 1)
            del out
            live = list(range(len(rows)))
            tokens = first
            while True:
                values = tokens.cpu().tolist()
                finished = responses.record([rows[j] for j in live], [values[j] for j in live])
                live = [j for j in live if rows[j] not in finished]
                if not live:
                    break
                tokens = batch.step()
            del batch
        return responses.generated

    def _batch(self, *state) -> FixedShapeBatch:
        try:
            return FixedShapeBatch(self.model, *state, self.graph)
        except RuntimeError as error:
            if not self.graph or isinstance(error, torch.cuda.OutOfMemoryError):
                raise  # out of memory: the batch is too large (the batch-size probe counts on seeing it)
            # e.g. a kernel that syncs with the host
            log.warning("CUDA graph capture failed (%s); decoding without graphs for this model", error)
            _GRAPH_FAILED.add(self.model)
            self.graph = False
            self.fallback = ContinuousDecoder(self.model, self.tokenizer, self.batch_size)
            return FixedShapeBatch(self.model, *state, self.graph)


# Models whose graph capture failed once; also decisions already logged (one line per model).
_GRAPH_FAILED: weakref.WeakSet = weakref.WeakSet()
_GRAPH_LOGGED: weakref.WeakSet = weakref.WeakSet()


def cuda_graph_reason(model) -> str | None:
    """Why this model's decoding cannot replay CUDA graphs (None: it can)."""
    if model in _GRAPH_FAILED:
        return "an earlier capture failed"
    if getattr(model, "is_loaded_in_8bit", False):
        # tests/test_quantized.py on an H200: 4-bit layers replay the eager tokens; the capture of
        # 8-bit ones fails (cudaErrorStreamCaptureInvalidated), so they are not even tried
        return "bitsandbytes 8-bit layers cannot be captured in a CUDA graph"
    if len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1:
        return "the model is split over several devices"
    if not hf_compat.accepts_position_ids(model) or not full_attention_only(model):
        return "the model takes no position ids or has sliding-window layers"
    implementation = hf_compat.attention_implementation(model)
    if implementation not in _MASKS:
        return f"attention implementation {implementation} is not sdpa or eager"
    if hf_compat.new_cache(model) is None:
        return "its KV cache has special layers"
    if hf_compat.input_device(model).type != "cuda":
        return "not on a CUDA device"
    return None


def make_decoder(model, tokenizer, batch_size: int, cuda_graphs: bool = True) -> Decoder:
    """The decoder for ``model``, chosen once: fixed shapes replayed as CUDA graphs where
    :func:`cuda_graph_reason` finds nothing against them and ``cuda_graphs``
    (``evaluation.cuda_graphs``) is on, otherwise continuous batching."""
    # a PeftModel's forward hides position_ids and logits_to_keep: call the model under it (its
    # layers carry the adapter)
    model = unwrap(model)
    reason = cuda_graph_reason(model) if cuda_graphs else "turned off (evaluation.cuda_graphs)"
    if model not in _GRAPH_LOGGED and (reason is None or hf_compat.input_device(model).type == "cuda"):
        _GRAPH_LOGGED.add(model)
        if reason is None:
            log.info("decoding with CUDA graphs at fixed shapes")
        else:
            log.info("decoding without CUDA graphs: %s", reason)
    if reason is None:
        return FixedShapeDecoder(model, tokenizer, batch_size)
    return ContinuousDecoder(model, tokenizer, batch_size)


def first_batch(model, tokenizer, texts: Sequence[str], batch_size: int) -> dict:
    """The encoded batch :func:`generate_ids` prefills first (the ``batch_size`` longest prompts)."""
    rows = length_order(tokenizer, texts)[:batch_size]
    return encode(tokenizer, [texts[i] for i in rows], hf_compat.input_device(model))


def generate_ids(
    model,
    tokenizer,
    texts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    detector: Verdict | None = None,
    progress: bool = False,
    prefill_fn: Callable | None = None,
    max_refusals: int | None = None,
    cuda_graphs: bool = True,
) -> list[list[int]]:
    """Greedy continuation token ids of each text (EOS included when produced), in input order,
    from the decoder :func:`make_decoder` chooses: see :meth:`BatchDecoder.generate`."""
    decoder = make_decoder(model, tokenizer, batch_size, cuda_graphs)
    return decoder.generate(texts, max_new_tokens, detector, max_refusals, prefill_fn, progress)


def generate(
    model,
    tokenizer,
    texts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    detector: Verdict | None = None,
    progress: bool = False,
    prefill_fn: Callable | None = None,
    max_refusals: int | None = None,
    cuda_graphs: bool = True,
) -> list[str]:
    """Greedy responses to chat-formatted ``texts`` (special tokens removed), in input order.

    With a ``detector``, a response ends as soon as ``detector.verdict`` of its text so far is not
    None, so refusals cost only the tokens up to their marker. ``max_refusals``: see
    :func:`generate_ids`.
    """
    ids = generate_ids(
        model, tokenizer, texts, max_new_tokens, batch_size, detector, progress, prefill_fn,
        max_refusals, cuda_graphs,
    )
    return tokenizer.batch_decode(ids, skip_special_tokens=True) if ids else []
