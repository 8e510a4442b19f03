"""`snakemake --report` on a finished tiny run: one HTML file with the Pareto plot, the direction plots,
the trials table and the summary, checked in the file and rendered in headless Chromium."""

from __future__ import annotations

import base64
import html as html_lib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import workflow_runner as wr
from tiny_tokenizer import tiny_model_dir

pytestmark = pytest.mark.slow
RUN = "tiny"
PARETO = f"results/{RUN}/plots/pareto.png"
DIRECTIONS = f"results/{RUN}/plots/directions.png"
TRIALS = f"results/{RUN}/trials.csv"
SUMMARY = f"results/{RUN}/summary.json"

# The report app keeps its view in React state only (no URL hash or query routing), so a test page can
# only reach the Pareto plot the way a reader does: click "Study" in the menu, then the row's eye button.
# The script records the outcome on <body data-nav=...> for --dump-dom.
NAVIGATE = """
<script id="test-navigate">
(function () {
  var step = 0, ticks = 0;
  function finish(msg) { document.body.setAttribute("data-nav", msg); }
  function tick() {
    ticks += 1;
    if (ticks > 200) { finish("stuck at step " + step); return; }
    if (step === 0) {
      var study = Array.from(document.querySelectorAll("nav a")).find(function (a) {
        return a.textContent.trim() === "Study"; });
      if (study) { study.click(); step = 1; }
    } else if (step === 1) {
      var row = Array.from(document.querySelectorAll("nav tr")).find(function (tr) {
        return tr.textContent.indexOf("Pareto front") >= 0; });
      if (row) { row.querySelector("a[type=button]").click(); step = 2; }
    } else {
      var want = Object.keys(results).filter(function (p) { return /pareto\\.png$/.test(p); })
        .map(function (p) { return results[p].data_uri; })[0];
      var img = Array.from(document.images).find(function (i) { return i.getAttribute("src") === want; });
      if (img && img.complete && img.naturalWidth > 0) {
        finish("shown " + img.naturalWidth + "x" + img.naturalHeight + " at " +
               Math.round(img.getBoundingClientRect().left) + "," + Math.round(img.getBoundingClientRect().top));
        return;
      }
    }
    setTimeout(tick, 50);
  }
  setTimeout(tick, 50);
})();
</script>
"""


def _chromium() -> str:
    """Path of Debian's chromium; installs it only where asked to (CI=true or ABLITERATE_INSTALL_CHROMIUM=1, as root)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    asked = os.environ.get("CI") == "true" or os.environ.get("ABLITERATE_INSTALL_CHROMIUM") == "1"
    if not asked:
        pytest.skip("chromium is not installed: run .ci/install-chromium.sh as root, or set "
                    "ABLITERATE_INSTALL_CHROMIUM=1 to let this test install it")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and cannot be: .ci/install-chromium.sh needs root and apt-get")
    proc = subprocess.run(["bash", str(wr.REPO / ".ci/install-chromium.sh")], check=False, capture_output=True, text=True,
                          timeout=900)
    found = shutil.which("chromium")
    if proc.returncode != 0 or not found:
        pytest.skip(f"installing chromium failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}")
    return found


@pytest.fixture(scope="module")
def chromium() -> str:
    return _chromium()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A finished tiny run and its report, built once for this module."""
    workdir = tmp_path_factory.mktemp("report-run")
    wr.write_config(workdir, wr.tiny_config(tiny_model_dir(workdir / "model"), run=RUN))
    wr.run(workdir, "--resources", "gpu=1")
    wr.run(workdir, "--report", "results/report.html", timeout=300)
    return workdir


def _js_var(html: str, name: str):
    """The JSON the report template assigns to `var <name> = ...;` in its <script> block."""
    match = re.search(rf'<script id="[\w-]+">\s*var {name} = (.*?);\s*</script>', html, re.DOTALL)
    assert match, f"no `var {name}` in the report"
    return json.loads(match.group(1))


def _base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _run_chromium(exe: str, workdir: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    # --virtual-time-budget lets the app's React rendering and the navigation timers run before the
    # DOM is dumped or the screenshot taken; the other flags keep a headless run offline and quiet.
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={workdir / 'chromium-profile'}", "--window-size=1400,1000",
           "--hide-scrollbars", "--virtual-time-budget=15000", *args, url]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _best_match(shot: np.ndarray, plot: np.ndarray, tolerance: int = 12) -> tuple[float, tuple[int, int]]:
    """Share of the plot's inked (non-white) pixels found unchanged in the screenshot at the best offset,
    i.e. the plot shown 1:1. White is left out: a blank panel would match it too.

    Candidate offsets come from the plot's rarest inked colour, so the search stays small."""
    h, w, _ = plot.shape
    inked = (plot < 240).any(axis=2)
    colours, counts = np.unique(plot[inked], axis=0, return_counts=True)
    anchor = colours[np.argmin(counts)]
    ay, ax = np.argwhere((plot == anchor).all(axis=2))[0]
    ys, xs = np.nonzero((np.abs(shot - anchor) <= tolerance).all(axis=2))
    best = (0.0, (-1, -1))
    for y, x in list(zip(ys - ay, xs - ax))[:5000]:
        if y < 0 or x < 0 or y + h > shot.shape[0] or x + w > shot.shape[1]:
            continue
        share = float((np.abs(shot[y:y + h, x:x + w] - plot) <= tolerance).all(axis=2)[inked].mean())
        best = max(best, (share, (int(x), int(y))))
    return best


def test_report_holds_every_result_with_its_caption(report):
    html = (report / "results/report.html").read_text()
    results = _js_var(html, "results")
    categories = _js_var(html, "categories")
    assert set(results) == {PARETO, DIRECTIONS, TRIALS, SUMMARY}
    assert {c: sorted(p for sub in subs.values() for p in sub) for c, subs in categories.items()} == {
        "Study": sorted([PARETO, TRIALS]), "Directions": [DIRECTIONS], "Summary": [SUMMARY]}

    # Both plots are embedded byte for byte as images the app shows in its main panel.
    for path in (PARETO, DIRECTIONS):
        assert results[path]["mime_type"] == "image/png"
        uri = results[path]["data_uri"]
        assert uri.startswith("data:image/png;") and uri.endswith(f";base64,{_base64(report / path)}")
    assert "Pareto front" in results[PARETO]["caption"]
    assert "min_kl_under_target" in results[PARETO]["caption"]

    # The trials CSV is downloadable and shown as an HTML table (one row per trial) in its caption.
    trials = (report / TRIALS).read_text().splitlines()
    caption = results[TRIALS]["caption"]
    assert "<table" in caption and "<th" in caption and ">refusals<" in caption
    body = caption.split("<tbody", 1)[1].split("</tbody>", 1)[0]
    assert body.count("<tr") == len(trials) - 1 >= 1

    # The summary JSON is shown in full in its caption.
    summary = json.loads((report / SUMMARY).read_text())
    text = html_lib.unescape(re.sub(r"<[^>]+>", "", results[SUMMARY]["caption"]))
    assert '"selected_trial"' in text and summary["selected_trial"]["reason"] in text

    # The landing page describes this run and links to the results.
    description = _js_var(html, "workflow_desc")
    assert str(report / "model") in description and "showResultInfo" in description


def test_report_renders_the_pareto_plot_in_chromium(chromium, report, tmp_path):
    page = tmp_path / "report-navigate.html"
    head, tail = (report / "results/report.html").read_text().rsplit("</body>", 1)  # the last: JS sources hold some
    page.write_text(head + NAVIGATE + "</body>" + tail)
    url = page.as_uri()

    dom = _run_chromium(chromium, tmp_path, url, "--dump-dom").stdout
    nav = re.search(r'<body[^>]*data-nav="([^"]*)"', dom)
    assert nav and nav.group(1).startswith("shown 768x"), nav.group(1) if nav else dom[-2000:]
    assert re.search(rf'<img src="data:image/png;[^"]*;base64,{re.escape(_base64(report / PARETO))}"', dom)

    shot = tmp_path / "pareto-screenshot.png"
    _run_chromium(chromium, tmp_path, url, f"--screenshot={shot}")
    pixels, plot = _rgb(shot), _rgb(report / PARETO)
    assert pixels.shape[:2] == (1000, 1400)
    share, (x, y) = _best_match(pixels, plot)
    # The plot appears 1:1 in the main panel, right of the menu (which covers the left quarter).
    assert share > 0.98, (share, x, y)
    assert x > 1400 // 5
    # ...and is a figure, not a blank panel: mostly white with dark axes/text and coloured markers.
    region = pixels[y:y + plot.shape[0], x:x + plot.shape[1]]
    assert (region > 240).all(axis=2).mean() > 0.5
    assert (region < 80).all(axis=2).mean() > 0.005
