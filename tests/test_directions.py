"""Direction math on synthetic residuals, winsorising, plots, and residual shapes on tiny models."""

from __future__ import annotations

import logging

import pytest
import tiny_models
import torch
from abliterate import errors, prompting
from abliterate.directions import (
    compute_directions,
    plot_directions,
    winsorize,
    winsorize_thresholds,
)
from abliterate.residuals import collect_residuals
from test_generation import PROMPTS
from tiny_tokenizer import char_tokenizer

torch.set_num_threads(1)

N, LAYERS, HIDDEN = 200, 4, 32


def synthetic(seed=0):
    """Harmful = harmless + 3·r on layers 1.., with a large shared mean; layer 0 identical in both."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(HIDDEN, generator=gen)
    r /= r.norm()
    shared = 5.0 * torch.randn(LAYERS, HIDDEN, generator=gen)
    harmless = shared + torch.randn(N, LAYERS, HIDDEN, generator=gen)
    harmful = shared + torch.randn(N, LAYERS, HIDDEN, generator=gen) + 3.0 * r
    harmful[:, 0] = harmless[:, 0] = shared[0]
    return harmful, harmless, r


def test_recovers_planted_direction():
    harmful, harmless, r = synthetic()
    out = compute_directions(harmful, harmless)
    d = out["directions"]
    assert d.shape == (LAYERS, HIDDEN) and d.dtype == torch.float32
    assert (
        out["harmful_mean"].dtype == torch.float64 and out["harmless_mean"].dtype == torch.float64
    )
    torch.testing.assert_close(d[1:].norm(dim=-1), torch.ones(LAYERS - 1))
    assert (d[1:] @ r > 0.97).all()
    assert out["norms"][1:].sub(3.0).abs().max() < 0.5
    assert out["cosine_adjacent"].shape == (LAYERS - 1,)
    assert (out["cosine_adjacent"][1:] > 0.9).all()


def test_zero_layer_is_marked_not_nan(caplog):
    caplog.set_level(logging.INFO, logger="abliterate.directions")
    harmful, harmless, _ = synthetic()
    out = compute_directions(harmful, harmless)
    assert out["valid"].tolist() == [False, True, True, True]
    assert torch.isfinite(out["directions"]).all() and (out["directions"][0] == 0).all()
    assert out["cosine_adjacent"][0] == 0
    # row 0 (the embedding output) coinciding is expected: no warning, and rows are not called layers
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "embedding output" in caplog.text
    caplog.clear()
    harmful[:, 2] = harmless[:, 2] = 0.0
    compute_directions(harmful, harmless)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "no refusal direction after layer(s) [1]: harmful and harmless means coincide"
    ]
    bad = harmful.clone()
    bad[0, 1, 0] = float("nan")
    with pytest.raises(errors.NumericalError):
        compute_directions(bad, harmless)


def test_orthogonalised_direction_is_perpendicular_to_harmless_mean():
    harmful, harmless, r = synthetic()
    out = compute_directions(harmful, harmless, orthogonalize=True)
    h = out["harmless_mean"] / out["harmless_mean"].norm(dim=-1, keepdim=True)
    cos = (out["directions"][1:].double() * h[1:]).sum(-1)
    assert cos.abs().max() < 1e-6
    torch.testing.assert_close(out["directions"][1:].norm(dim=-1), torch.ones(LAYERS - 1))
    assert (out["directions"][1:] @ r > 0.8).all()


def test_winsorize_bounds():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(101, 3, 8, generator=gen)
    x[7, 2, 5] = 1e4  # a massive activation
    x[9, 1, 0] = -1e4
    t = winsorize_thresholds(x, 0.9)
    assert t.shape == (3, 8)
    torch.testing.assert_close(t[2, 5], x[:, 2, 5].abs().quantile(0.9))
    w = winsorize(x, 0.9)
    assert (w.abs() <= t + 1e-7).all() and w.abs().max() < 10
    assert torch.equal(w[x.abs() <= t], x[x.abs() <= t])  # values inside the bounds are untouched
    assert torch.equal(winsorize(x, 1.0), x)
    with pytest.raises(ValueError):
        winsorize(x, 0.0)


def test_winsorize_removes_outlier_from_direction():
    harmful, harmless, r = synthetic()
    harmful[0, 2, 3] += 5e4  # one prompt with a huge value
    plain = compute_directions(harmful, harmless)["directions"][2]
    robust = compute_directions(harmful, harmless, winsorize_quantile=0.99)["directions"][2]
    assert plain @ r < 0.5
    assert robust @ r > 0.95


def test_plot_directions(tmp_path):
    harmful, harmless, _ = synthetic()
    path = tmp_path / "plots" / "directions.png"
    plot_directions(compute_directions(harmful, harmless), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["directions.png"]


@pytest.mark.parametrize("factory", ["llama", "multimodal"])
def test_residual_shapes(factory):
    tokenizer = char_tokenizer()
    texts = prompting.chat_texts(tokenizer, PROMPTS[:5], None)
    model = tiny_models.FACTORIES[factory]()
    res = collect_residuals(model, tokenizer, texts, batch_size=2, progress=False)
    layers = tiny_models.LAYERS + 1
    assert res.shape == (5, layers, tiny_models.HIDDEN)
    assert res.dtype == torch.float32 and res.device.type == "cpu"
    # batching and padding do not change a prompt's residuals
    alone = collect_residuals(model, tokenizer, texts[3:4], batch_size=1, progress=False)
    torch.testing.assert_close(res[3], alone[0], atol=1e-4, rtol=1e-4)
    # the last prompt token is the same template token for all, so layer 0 coincides
    torch.testing.assert_close(res[:, 0], res[:1, 0].expand(5, -1))
