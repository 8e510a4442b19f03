"""Refusal directions: the normalised difference of mean residuals, harmful minus harmless, per layer.

Several directions per layer (``directions.n_directions``, Heretic #140/#196): row 0 of each set is
the mean-difference direction itself, bit for bit. The further rows come from how harmful prompts
differ from harmless ones beyond that mean: the harmful residuals minus the harmless mean, with the
first direction (and, when ``orthogonalize``, the harmless mean's direction) projected out, give a
(n_harmful, hidden) matrix whose top right singular vectors are the next directions, Gram–Schmidt'ed
(float64) against the earlier rows so each set is orthonormal to float32 rounding. The singular
vectors, not the mean, because the mean of that matrix is exactly the first direction, now removed:
what is left is the harmful prompts' main spread away from the harmless mean, which a single mean
direction cannot ablate. Winsorising applies (the same clamped residuals feed both). A layer without
a first direction, or whose spread has fewer independent directions than asked, gets zero rows
(ablating a zero direction is a no-op).
"""

from __future__ import annotations

import logging
import os

import torch

from .errors import ConfigError, NumericalError
from .io import atomic_path

log = logging.getLogger(__name__)

# A layer whose mean difference is this small relative to the means themselves carries no direction.
# Layer 0 (the embedding output) is the usual case: every chat-formatted prompt ends in the same
# template token, so both means are the same embedding vector.
RELATIVE_ZERO = 1e-9


def winsorize_thresholds(residuals: torch.Tensor, quantile: float) -> torch.Tensor:
    """Per layer and hidden dimension, the ``quantile`` of ``|x|`` across prompts: (layers, hidden).

    Computed from sorted values with linear interpolation (as ``torch.quantile``, which refuses
    inputs of more than 2**24 elements), one layer at a time to bound memory.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"winsorize quantile must be in (0, 1], got {quantile}")
    n = residuals.shape[0]
    pos = quantile * (n - 1)
    lo, frac = int(pos), pos - int(pos)
    hi = min(lo + 1, n - 1)
    out = torch.empty(residuals.shape[1:], dtype=residuals.dtype)
    for layer in range(residuals.shape[1]):
        s = residuals[:, layer].abs().sort(dim=0).values
        out[layer] = s[lo] + (s[hi] - s[lo]) * frac
    return out


def winsorize(residuals: torch.Tensor, quantile: float,
              thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """Clamp (n, layers, hidden) residuals symmetrically to ``[-t, t]``, ``t`` per layer and dimension.

    ``t`` is the ``quantile`` of ``|x|`` across prompts (axis 0) for that layer and hidden dimension,
    unless ``thresholds`` (layers, hidden) are given. A few "massive activation" dimensions reach
    hundreds of times the typical scale on a handful of prompts; clamping keeps them from dominating
    the mean difference. Returns a new tensor.
    """
    t = winsorize_thresholds(residuals, quantile) if thresholds is None else thresholds
    return torch.maximum(torch.minimum(residuals, t), -t)


def _unit(v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    norms = v.norm(dim=-1, keepdim=True)
    return torch.where(valid[:, None], v / torch.where(norms > 0, norms, 1.0), 0.0)


def _log_missing(valid: torch.Tensor, orthogonalize: bool) -> None:
    """Row 0 (the embedding output) is expected to carry no direction: the residual is taken at
    the prompt's last token, which the chat template makes the same token for every prompt. Only
    missing directions after a layer are a warning (they are a sign of a broken model or dtype)."""
    missing = (~valid).nonzero().flatten().cpu().tolist()
    if 0 in missing:
        log.info("no refusal direction at the embedding output (row 0): every prompt ends in the same "
                 "template token there, as expected")
    layers = [row - 1 for row in missing if row > 0]
    if layers:
        log.warning("no refusal direction after layer(s) %s: harmful and harmless means coincide%s", layers,
                    " after orthogonalisation" if orthogonalize else "")


def compute_directions(harmful_res: torch.Tensor, harmless_res: torch.Tensor, orthogonalize: bool = False,
                       winsorize_quantile: float | None = None, n_directions: int = 1) -> dict[str, torch.Tensor]:
    """Refusal direction per layer from (n, layers, hidden) residuals of the two prompt sets.

    Returns a dict of CPU tensors:

    - ``directions`` (layers, hidden) float32 unit vectors, normalise(mean harmful − mean harmless);
    - ``harmful_mean``, ``harmless_mean`` (layers, hidden) float64;
    - ``norms`` (layers,) float64, the norm of the difference before normalisation (of the
      orthogonalised difference when ``orthogonalize``);
    - ``cosine_adjacent`` (layers − 1,) float64, cosine of each direction with the next layer's;
    - ``valid`` (layers,) bool;
    - ``direction_sets`` (layers, n_directions, hidden) float32, orthonormal rows per layer, row 0
      equal to ``directions`` (see the module docstring).

    A layer whose difference is zero (or negligible, see ``RELATIVE_ZERO``) has no direction: it is
    marked ``valid = False`` with an all-zero direction (ablating it is a no-op) and cosine 0 to its
    neighbours, and a warning names it, rather than a silent NaN. Layer 0 is normally such a layer.

    ``orthogonalize`` removes from each direction its component along that layer's normalised
    harmless mean and renormalises, so ablation does not shrink the residual's typical component.
    ``winsorize_quantile`` clamps both sets with one threshold per layer and dimension taken from
    the two sets together, so the same outlier dimension is treated alike in both.
    """
    if harmful_res.ndim != 3 or harmless_res.shape[1:] != harmful_res.shape[1:]:
        raise ValueError(f"residuals must be (n, layers, hidden) with equal layers and hidden, got "
                         f"{tuple(harmful_res.shape)} and {tuple(harmless_res.shape)}")
    if harmful_res.shape[0] == 0 or harmless_res.shape[0] == 0:
        raise ValueError("each prompt set needs at least one residual")
    if int(n_directions) != n_directions or n_directions < 1:
        raise ConfigError(f"directions.n_directions must be an integer >= 1, got {n_directions!r}")
    harmful_res, harmless_res = harmful_res.cpu(), harmless_res.cpu()
    if winsorize_quantile is not None:
        t = winsorize_thresholds(torch.cat([harmful_res, harmless_res]), winsorize_quantile)
        harmful_res = winsorize(harmful_res, winsorize_quantile, t)
        harmless_res = winsorize(harmless_res, winsorize_quantile, t)
    harmful_mean = harmful_res.sum(dim=0, dtype=torch.float64) / harmful_res.shape[0]
    harmless_mean = harmless_res.sum(dim=0, dtype=torch.float64) / harmless_res.shape[0]
    diff = harmful_mean - harmless_mean
    scale = torch.maximum(harmful_mean.norm(dim=-1), harmless_mean.norm(dim=-1))

    h = None
    if orthogonalize:
        has_mean = harmless_mean.norm(dim=-1) > 0
        h = _unit(harmless_mean, has_mean)
        diff = diff - (diff * h).sum(dim=-1, keepdim=True) * h

    norms = diff.norm(dim=-1)
    if not torch.isfinite(norms).all():
        raise NumericalError("residuals contain NaN or infinite values (check the model's dtype)")
    valid = (norms > RELATIVE_ZERO * scale) & (norms > 0)
    _log_missing(valid, orthogonalize)
    directions = _unit(diff, valid)
    cosine = (directions[:-1] * directions[1:]).sum(dim=-1)
    first = directions.float()
    sets = direction_sets(harmful_res, harmless_mean, first, valid, int(n_directions), h)
    return {"directions": first, "harmful_mean": harmful_mean, "harmless_mean": harmless_mean,
            "norms": norms, "cosine_adjacent": cosine, "valid": valid, "direction_sets": sets}


# A further direction whose part orthogonal to the earlier rows is below this (relative to the spread's
# largest singular value) is rounding, not a direction.
RELATIVE_RANK = 1e-6


def direction_sets(harmful_res: torch.Tensor, harmless_mean: torch.Tensor, first: torch.Tensor, valid: torch.Tensor,
                   k: int, harmless_dir: torch.Tensor | None = None) -> torch.Tensor:
    """(layers, k, hidden) float32 orthonormal direction sets, row 0 ``first`` (see the module docstring).

    ``harmful_res`` (n, layers, hidden) as clamped for the mean; ``harmless_dir`` (layers, hidden): the
    unit harmless means, projected out too when the directions were orthogonalised. One layer at a
    time, so the float64 copy is one layer's residuals.
    """
    layers, hidden = first.shape
    sets = torch.zeros(layers, k, hidden, dtype=torch.float32)
    sets[:, 0] = first
    if k == 1:
        return sets
    for layer in valid.nonzero().flatten().cpu().tolist():
        known = [first[layer].double()]
        if harmless_dir is not None and harmless_dir[layer].norm() > 0:
            known.append(harmless_dir[layer])
        x = harmful_res[:, layer].double() - harmless_mean[layer]
        for v in known:
            x = x - (x @ v)[:, None] * v
        _, sing, vh = torch.linalg.svd(x, full_matrices=False)
        if sing.numel() == 0 or not sing[0] > 0:
            continue
        rows = [known[0]]
        for i in range(min(k - 1, vh.shape[0])):
            if sing[i] <= RELATIVE_RANK * sing[0]:
                break
            v = vh[i]
            for u in rows:  # Gram–Schmidt against the earlier rows
                v = v - (v @ u) * u
            norm = v.norm()
            if not norm > RELATIVE_RANK:
                break
            rows.append(v / norm)
            sets[layer, len(rows) - 1] = rows[-1].float()
        if len(rows) < k:
            log.info("layer row %d: %d of %d directions (the harmful spread has no more)", layer, len(rows), k)
    return sets


def read(path, n_directions: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The directions rule's file: the (layers, hidden) table and, when ``n_directions`` > 1, the
    (layers, ≥ n_directions, hidden) sets (None otherwise). A file without enough directions is a
    ConfigError naming what to rerun, not a KeyError."""
    from .io import load_safetensors

    tensors, _ = load_safetensors(path)
    if n_directions <= 1:
        return tensors["directions"], None
    sets = tensors.get("direction_sets")
    have = 1 if sets is None else sets.shape[1]
    if have < n_directions:
        raise ConfigError(
            f"{path} holds {have} refusal direction(s) per layer but study.space.n_directions asks for up to "
            f"{n_directions}: set directions.n_directions >= {n_directions} and rerun the directions rule "
            "(snakemake --forcerun directions; a file from before direction sets existed holds one)"
        )
    return tensors["directions"], sets


def plot_directions(result: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """PNG with the difference norm per layer and the cosine similarity of directions across layers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    d = result["directions"].double()
    norms = result["norms"].cpu().numpy()
    cos = (d @ d.T).numpy()
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_norm, ax_cos = fig.subplots(1, 2, width_ratios=[1.2, 1])
    ax_norm.plot(range(len(norms)), norms, marker="o", markersize=3)
    ax_norm.set_xlabel("layer (0 = embeddings)")
    for axis in (ax_norm.xaxis, ax_cos.xaxis, ax_cos.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax_norm.set_ylabel("‖mean harmful − mean harmless‖")
    ax_norm.set_title("Refusal direction strength")
    ax_norm.grid(alpha=0.3)
    image = ax_cos.imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r", origin="lower")
    ax_cos.set_xlabel("layer")
    ax_cos.set_ylabel("layer")
    ax_cos.set_title("Cosine similarity of directions")
    fig.colorbar(image, ax=ax_cos, shrink=0.85)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
