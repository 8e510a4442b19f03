"""One trial's edit of all same-shaped components at once: stacked weights, batched factor maths.

Why. On a GPU, the per-component loop of :mod:`abliterate.editors` edits component after component: a trial is
dozens of rank-1 edits whose arithmetic is a bandwidth-bound read of the weights, but whose small
kernels, host syncs and Python steps cost many times that (benchmarks/README.md, "Figures from the
code"). Here the weights of one component kind — one matrix per layer, all
the same shape — are moved once into a single ``(L, out, in)`` tensor (each parameter becomes a view
of it, so no memory is duplicated), and a trial's factors for the whole group come from a handful of
batched products that read the weights once (none, pre) or a dozen times (full).

The maths is the module docstring of :mod:`abliterate.ablation`, per layer ``l``:

* ``none``: ``A_l = r_lᵀ W_l``, ``B_l = −λ_l r_l``.
* ``pre``: ``A_l = (r_l ⊘ n_l)ᵀ W_l``, ``B_l = −λ_l (n_l ⊙ r_l)``; the row norms ``n`` of the base
  weights do not change between trials, so they are computed once.
* ``full``: with ``a = Ŵᵀ r`` and the projected rows' norms ``p_i = ‖Ŵ_i − λ r_i a‖`` (from ``Ŵ a``,
  never forming the projected matrix), ``ΔW = diag(s) W + u aᵀ`` where ``s = n ⊘ (p ⊙ n) − 1`` and
  ``u = −λ n ⊙ r ⊘ p``. ``torch.svd_lowrank``'s algorithm (Halko et al. 2009, algorithm 5.1, the same
  seeded Gaussian start, the same power iterations) runs on that operator instead of a dense ``ΔW``,
  so each product reads ``W`` once and no ``(out, in)`` float32 temporary exists.

Several directions (``r`` (L, m, out) orthonormal rows, ``λ`` (L, m)): ``A_l = R_l W_l`` (or
``(R_l ⊘ n_l) W_l``), ``B_l = −R_lᵀ diag(λ_l)`` (times ``diag(n_l)`` for pre); for full, with
``C = R_lᵀ diag(λ_l)`` (out, m) and ``G = A Aᵀ`` (m, m), ``p_i² = n_i²/d_i² − 2 C_i·(Ŵ Aᵀ)_i + C_i G C_iᵀ``
and ``ΔW = diag(s) W + U A`` with ``U = −diag(n ⊘ p) C``, at rank ``rank + m − 1``. m = 1 runs the
single-direction code above.

Products with a bfloat16 weight: the float32 operand is split into ``hi + lo`` (both bfloat16; their
sum keeps 16 of float32's 24 mantissa bits, relative error ≤ 2⁻¹⁷), multiplied against the weight in
one ``bmm`` with ``out_dtype=torch.float32`` (float32 accumulation) and the two halves summed. The
weight is read once in its own dtype and never cast. Where ``bmm`` has no ``out_dtype`` (CPUs) and
for float16 weights (whose range would flush the ``lo`` half to subnormals), the weight is cast to
float32 per product, as the per-component path does.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import devices
from .architecture import Component
from .errors import AbliterateError

log = logging.getLogger(__name__)

STACKABLE_LAYOUTS = ("linear", "conv1d")


# -- products in float32 against a low-precision weight --------------------------------------------
def _low_precision_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bfloat16 × bfloat16 -> float32 with float32 accumulation (CUDA's ``bmm`` with ``out_dtype``)."""
    return torch.bmm(a, b, out_dtype=torch.float32)


@functools.cache
def split_products_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether products against a ``dtype`` weight on ``device_type`` can use the hi/lo split."""
    if dtype != torch.bfloat16 or device_type != "cuda":
        return False
    try:
        probe = torch.ones(1, 2, 2, dtype=dtype, device=device_type)
        _low_precision_bmm(probe, probe)
    except (RuntimeError, TypeError) as err:
        log.info("bmm has no float32 out_dtype for bfloat16 here (%s); bfloat16 weights are cast per product",
                 str(err).splitlines()[0][:120])
        return False
    return True


def _split(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    hi = x.to(dtype)
    return hi, (x - hi.float()).to(dtype)


def left_product(x: torch.Tensor, w: torch.Tensor, split: bool) -> torch.Tensor:
    """``x @ w`` in float32 for float32 ``x`` (L, m, out) and a weight stack ``w`` (L, out, in)."""
    if w.dtype == torch.float32:
        return torch.bmm(x, w)
    if not split:
        return torch.bmm(x, w.float())
    m = x.shape[1]
    hi, lo = _split(x, w.dtype)
    both = _low_precision_bmm(torch.cat([hi, lo], dim=1), w)
    return both[:, :m] + both[:, m:]


def right_product(w: torch.Tensor, x: torch.Tensor, split: bool) -> torch.Tensor:
    """``w @ x`` in float32 for a weight stack ``w`` (L, out, in) and float32 ``x`` (L, in, m): the left
    product of the transposes (views; ``bmm`` takes transposed operands without copying them)."""
    return left_product(x.mT, w.mT, split).mT


# -- factors -----------------------------------------------------------------------------------------
def orthonormal_basis(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning each ``x[l]`` (L, m, q), float32: shifted CholeskyQR2 in float64.

    Batched Householder QR (``torch.linalg.qr``) runs one cuSOLVER call per matrix and dominated the
    batched full mode on a GPU; here every step is one batched kernel (Gram product, Cholesky of a
    q×q matrix, triangular solve). Two passes give orthogonality to float64 rounding for the
    condition numbers the power iterations produce; float64 squares the condition number safely.
    The shift keeps the Cholesky defined for a zero or rank-deficient ``x`` (a layer with λ = 0
    inside a kernel's support), whose basis then comes out zero, as its ΔW is.
    """
    y = x.double()
    eye = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)
    for _ in range(2):
        gram = y.mT @ y
        shift = 1e-15 * gram.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None] + 1e-300
        # _ex: no error check, so no host sync per call on CUDA (torch.linalg.cholesky syncs to check
        # `info`); the shift keeps the matrix positive definite, so there is no error to report
        upper, _ = torch.linalg.cholesky_ex(gram + shift * eye, upper=True)
        y = torch.linalg.solve_triangular(upper, y, upper=True, left=False)
    return y.float()


def _top_singular(small: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k leading singular triplets of wide ``small`` (L, q, n): U (L, q, k), S (L, k), V (L, n, k).

    From the eigenvectors of the q×q Gram matrix in float64 (one batched ``eigh`` instead of one SVD
    call per matrix); only the leading values are used, so squaring them loses nothing that matters.
    """
    b = small.double()
    values, vectors = torch.linalg.eigh(b @ b.mT)  # ascending
    values, u = values.flip(-1)[:, :k], vectors.flip(-1)[..., :k]
    sing = values.clamp_min(0).sqrt()
    v = (b.mT @ u) / torch.where(sing > 0, sing, torch.ones_like(sing))[:, None, :]
    return u.float(), sing.float(), v.float()


def _randomized_svd(apply, apply_t, rows: int, cols: int, batch: int, q: int, k: int, niter: int, seed: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-k truncated ``torch.svd_lowrank`` (no mean) of a batched operator M (rows, cols) known through
    ``apply(X) = M X`` and ``apply_t(Y) = Mᵀ Y``: U (L, rows, k), S (L, k), V (L, cols, k).

    torch's steps (Halko et al. 2009, algorithm 5.1): the transposition of a wide matrix, the
    Gaussian start drawn after ``torch.manual_seed(seed)`` as the per-matrix path draws it, ``niter``
    power iterations; with the orthonormalisation and the small SVD done batched (see above).
    """
    wide = rows < cols
    if wide:  # torch works on the tall Mᵀ
        apply, apply_t = apply_t, apply
    n = min(rows, cols)
    with devices.fork_rng(device):
        torch.manual_seed(seed)
        start = torch.randn(n, q, dtype=torch.float32, device=device)
    basis = orthonormal_basis(apply(start.expand(batch, n, q)))
    for _ in range(niter):
        basis = orthonormal_basis(apply_t(basis))
        basis = orthonormal_basis(apply(basis))
    u, s, v = _top_singular(apply_t(basis).mT, k)  # of Qᵀ M_tall, (L, q, n)
    u = basis @ u
    return (v, s, u) if wide else (u, s, v)


def batched_factors(
    w: torch.Tensor,
    r: torch.Tensor,
    lam: torch.Tensor,
    row_norm: str,
    norms: torch.Tensor | None = None,
    rank: int = 3,
    seed: int = 0,
    oversampling: int = 8,
    niter: int = 4,
    split: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors B (L, out, k), A (L, k, in), float32, with ``ΔW_l = B_l A_l`` for each layer's (out, in)
    weight ``w[l]`` — what :func:`abliterate.ablation.delta_factors` gives per matrix.

    ``r``: (L, out) float32 unit directions; ``lam``: (L,) float32 weights; ``norms``: (L, out) float32
    row norms of ``w`` (needed by pre and full); ``split``: use the hi/lo product for bfloat16 weights.
    Several directions: ``r`` (L, m, out) orthonormal rows and ``lam`` (L, m) (module docstring).
    """
    if r.ndim == 3:
        if r.shape[1] > 1:
            return _multi_factors(w, r, lam, row_norm, norms, rank, seed, oversampling, niter, split)
        r, lam = r[:, 0], lam[:, 0]
    if row_norm == "none":
        a = left_product(r[:, None, :], w, split)
        return (r * -lam[:, None])[..., None], a
    n = norms
    div = torch.where(n > 0, n, torch.ones_like(n))
    a = left_product((r / div)[:, None, :], w, split)  # (L, 1, in) = (Ŵᵀ r)ᵀ
    if row_norm == "pre":
        return (n * r * -lam[:, None])[..., None], a
    if row_norm != "full":
        raise ValueError(f"unknown row_norm {row_norm!r}")
    lam_ = lam[:, None]
    w_hat_a = right_product(w, a.mT, split)[..., 0] / div  # (L, out) = Ŵ a
    sq = (n / div) ** 2 - 2 * lam_ * r * w_hat_a + (lam_ * r) ** 2 * (a[:, 0] ** 2).sum(-1, keepdim=True)
    p = sq.clamp_min(0).sqrt()  # rounding can leave -1e-8 on a fully ablated row
    p_div = torch.where(p > 0, p, torch.ones_like(p))
    s = n / (p_div * div) - 1
    u = -lam_ * n * r / p_div

    def apply(x):  # ΔW x, x (L, in, m)
        return s[..., None] * right_product(w, x, split) + u[..., None] * (a @ x)

    def apply_t(y):  # ΔWᵀ y, y (L, out, m)
        return left_product((s[..., None] * y).mT, w, split).mT + a.mT * (u[:, None, :] @ y)

    rows, cols = w.shape[1:]
    k = min(rank, rows, cols)
    q = min(k + oversampling, rows, cols)
    left, sing, right = _randomized_svd(apply, apply_t, rows, cols, w.shape[0], q, k, niter, seed, w.device)
    root = sing.sqrt()
    return left * root[:, None, :], root[..., None] * right.mT


def _multi_factors(w, r, lam, row_norm, norms, rank, seed, oversampling, niter, split):
    """:func:`batched_factors` for m > 1 directions per layer."""
    c = (r * lam[..., None]).mT  # (L, out, m) = Rᵀ diag(λ)
    if row_norm == "none":
        return -c, left_product(r, w, split)
    n = norms
    div = torch.where(n > 0, n, torch.ones_like(n))
    a = left_product(r / div[:, None, :], w, split)  # (L, m, in) = R Ŵ
    if row_norm == "pre":
        return -n[..., None] * c, a
    if row_norm != "full":
        raise ValueError(f"unknown row_norm {row_norm!r}")
    w_hat_a = right_product(w, a.mT, split) / div[..., None]  # (L, out, m) = Ŵ Aᵀ
    gram = a @ a.mT  # (L, m, m)
    sq = (n / div) ** 2 - 2 * (c * w_hat_a).sum(-1) + ((c @ gram) * c).sum(-1)
    p = sq.clamp_min(0).sqrt()  # rounding can leave -1e-8 on a fully ablated row
    p_div = torch.where(p > 0, p, torch.ones_like(p))
    s = n / (p_div * div) - 1
    u = -(n / p_div)[..., None] * c  # (L, out, m)

    def apply(x):  # ΔW x, x (L, in, q)
        return s[..., None] * right_product(w, x, split) + u @ (a @ x)

    def apply_t(y):  # ΔWᵀ y, y (L, out, q)
        return left_product((s[..., None] * y).mT, w, split).mT + a.mT @ (u.mT @ y)

    rows, cols = w.shape[1:]
    k = min(rank + r.shape[1] - 1, rows, cols)
    q = min(k + oversampling, rows, cols)
    left, sing, right = _randomized_svd(apply, apply_t, rows, cols, w.shape[0], q, k, niter, seed, w.device)
    root = sing.sqrt()
    return left * root[:, None, :], root[..., None] * right.mT


# -- stacking --------------------------------------------------------------------------------------
def _out_in(stored: torch.Tensor, layout: str) -> torch.Tensor:
    """The (L, out, in) view of a stack of stored weights (Conv1D stores (in, out))."""
    return stored.transpose(1, 2) if layout == "conv1d" else stored


@dataclass
class WeightGroup:
    """Components of one kind, one per layer, whose weights now live in one stacked tensor."""

    components: list[Component]
    stored: torch.Tensor  # (L, *stored shape): parameter i is stored[i]
    layout: str
    lora: bool
    norms: torch.Tensor | None = None  # (L, out) float32 row norms of the base weights
    backup: torch.Tensor | None = None
    dirty: tuple[int, int] | None = None  # rows [lo, hi) edited in place since the last restore
    lora_b: list[torch.Tensor] = field(default_factory=list)
    lora_a: list[torch.Tensor] = field(default_factory=list)

    @property
    def weights(self) -> torch.Tensor:
        return _out_in(self.stored, self.layout)

    @property
    def layers(self) -> list[int]:
        return [c.layer for c in self.components]

    def layer_index(self, lo: int, hi: int) -> slice | torch.Tensor:
        """Index of rows lo..hi-1's layers into a per-layer table: a slice when they are consecutive
        (the usual one matrix per layer), so no index tensor crosses to the device every trial."""
        layers = self.layers[lo:hi]
        if layers == list(range(layers[0], layers[0] + len(layers))):
            return slice(layers[0], layers[-1] + 1)
        return torch.tensor(layers, device=self.stored.device)

    def check_views(self) -> None:
        """The model still computes with the stack: a ``model.to(...)`` or a reload after stacking would
        leave it editing a tensor nobody reads, and every trial would score the unedited model."""
        for i in (0, len(self.components) - 1):
            if self.components[i].weight.data_ptr() != self.stored[i].data_ptr():
                raise AbliterateError(
                    f"{self.components[i].name}: the model's weights were moved or replaced after the editor "
                    "stacked them; build a new editor for the moved model"
                )

    def restore(self) -> None:
        """Direct edits undone bit for bit from the stacked backup, in one copy."""
        if self.dirty is not None:
            lo, hi = self.dirty
            self.stored[lo:hi].copy_(self.backup[lo:hi], non_blocking=True)
            self.dirty = None

    def edit(self, lo: int, b: torch.Tensor, a: torch.Tensor, backup_device: torch.device | None) -> None:
        """``W_l += B_l A_l`` for rows lo.. of the stack, in the weight's dtype (one cast of the factors)."""
        if self.backup is None:
            self.backup = self.stored.to(backup_device or self.stored.device, copy=True)
            if self.backup.device.type == "cpu" and self.stored.device.type == "cuda":
                self.backup = self.backup.pin_memory()  # restores are then asynchronous copies
        hi = lo + b.shape[0]
        self.restore()
        dtype = self.stored.dtype
        self.weights[lo:hi].baddbmm_(b.to(dtype), a.to(dtype))
        self.dirty = (lo, hi)


def stackable(c: Component) -> bool:
    return c.layout in STACKABLE_LAYOUTS and not c.quantized and c.weight.device.type != "meta"


def group_key(c: Component, lora: bool) -> tuple:
    w = c.weight
    return (c.kind, c.layout, lora, tuple(w.shape), w.dtype, w.device)


# Stacking holds the old matrices and the new stack at once, until the old ones are freed one by one.
STACK_HEADROOM = 0.8  # of the free memory a stack may take: the rest stays for whatever runs next


def _allocate_stack(kind: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """An empty stack, or None (with a warning) when the device cannot hold it next to the model."""
    need = math.prod(shape) * dtype.itemsize
    free = devices.free_bytes(device)
    if free is not None and need > STACK_HEADROOM * free:
        log.warning("%s weights not stacked: the stack needs %.2f GiB while stacking and %s has %.2f GiB free; "
                    "they are edited one by one (slower trials, same result)", kind, need / 2**30, device, free / 2**30)
        return None
    try:
        return torch.empty(shape, dtype=dtype, device=device)
    except torch.OutOfMemoryError:
        log.warning("%s weights not stacked: out of memory allocating %.2f GiB on %s; they are edited one by one",
                    kind, need / 2**30, device)
        return None


def stack_groups(components: Sequence[Component], lora: set[Component]) -> list[WeightGroup]:
    """Stack the weights of each set of ≥ 2 same-kind, same-shape components (one per layer).

    Each parameter's ``.data`` becomes a view of the stack, so the model, PEFT's base layers and
    :class:`Component` all keep working on the same memory; the old storages are freed as they go.
    """
    buckets: dict[tuple, list[Component]] = {}
    for c in components:
        if stackable(c):
            buckets.setdefault(group_key(c, c in lora), []).append(c)
    groups = []
    for key, members in buckets.items():
        members = sorted(members, key=lambda c: c.layer)
        params = [c.weight for c in members]
        layers = [c.layer for c in members]
        if len(members) < 2 or len({id(p) for p in params}) < len(params) or len(set(layers)) < len(layers):
            continue  # tied or repeated weights: the per-component path handles them
        stored = _allocate_stack(key[0], (len(members), *params[0].shape), params[0].dtype, params[0].device)
        if stored is None:
            continue
        for i, p in enumerate(params):
            stored[i].copy_(p.detach())
            p.data = stored[i]
        groups.append(WeightGroup(members, stored, members[0].layout, key[2]))
        log.info("stacked %d %s weights (%s, %s, %.0f MB) into one tensor for batched edits", len(members),
                 key[0], "×".join(map(str, members[0].weight.shape)), str(stored.dtype).removeprefix("torch."),
                 stored.numel() * stored.element_size() / 2**20)
    return groups


def row_norms(group: WeightGroup) -> torch.Tensor:
    """(L, out) float32 row norms of the stacked weights, computed layer by layer (no float32 copy)."""
    return torch.stack([torch.linalg.vector_norm(w, dim=1, dtype=torch.float32) for w in group.weights])
