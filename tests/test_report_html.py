"""The saved report.html renders in a real browser (headless Chromium), offline.

A copy of the page gets a small probe script that, once the page has loaded, writes into
``document.title`` whether every ``<img>`` decoded (``complete && naturalWidth > 0``), how much
text the page shows, the summary's group rows and column headings, and whether anything is wider
than the window; Chromium's ``--dump-dom`` prints the DOM, and the test reads the title back. A
screenshot of the untouched page must not be blank. All host names resolve to nothing, so the page
passes only if it needs no network.

Skipped when Chromium is not installed (CI installs Debian's ``chromium`` package).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import mcdrop  # noqa: E402


def _chromium() -> str | None:
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM = _chromium()
if CHROMIUM is None and os.environ.get("MCDROP_REQUIRE_CHROMIUM") == "1":
    raise RuntimeError("MCDROP_REQUIRE_CHROMIUM=1 but no chromium binary was found (.ci/run installs it)")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs headless Chromium (/usr/bin/chromium; CI installs Debian's chromium package)",
)

PROBE = """
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return i.complete && i.naturalWidth > 0;
  });
  document.title = "PROBE:" + JSON.stringify({
    imgs: imgs,
    text: document.body.innerText.length,
    tables: document.querySelectorAll("table").length,
    groups: Array.prototype.map.call(document.querySelectorAll("tr.group th"), function (t) {
      return t.textContent;
    }),
    headings: Array.prototype.map.call(document.querySelectorAll("table.summary thead th"), function (t) {
      return t.textContent;
    }),
    overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth
  });
});
</script>
"""


def _run_chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[mcdrop.UncertaintyReport, Path]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 3)).eval()
    mc = mcdrop.MCDropout(net, n_samples=6, seed=0, keep_samples=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(90, 5, generator=gen)
    pred = mc.predict(x)
    labels = torch.where(
        torch.rand(90, generator=gen) < 0.7, pred.predicted, torch.randint(0, 3, (90,), generator=gen)
    )
    ood = mc.predict(torch.randn(40, 5, generator=gen) * 5)
    far = mc.predict(torch.randn(30, 5, generator=gen) * 20)
    x_val = torch.randn(60, 5, generator=gen)
    val = mc.predict(x_val)
    val_labels = torch.where(
        torch.rand(60, generator=gen) < 0.7, val.predicted, torch.randint(0, 3, (60,), generator=gen)
    )
    rep = mcdrop.report(
        pred,
        labels,
        ood={"wide": ood, "far": far},
        baseline=mc.predict_deterministic(x),
        calibration=(val, val_labels),
        model=mc,
        title="browser check",
        metadata={"data": "inputs/test.npz"},
    )
    out = rep.save(tmp_path_factory.mktemp("html") / "report")
    return rep, out


def test_every_image_loads_offline(saved, tmp_path):
    rep, out = saved
    page = (out / "report.html").read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = _run_chromium(
        tmp_path / "profile",
        "--virtual-time-budget=10000",
        "--window-size=1280,1000",
        "--dump-dom",
        probe.as_uri(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r"<title>PROBE:(.*?)</title>", done.stdout, re.S)
    assert match, f"the probe did not run; DOM starts with {done.stdout[:500]!r}"
    result = json.loads(html.unescape(match.group(1)))
    assert len(result["imgs"]) == len(rep.figure_names) == 5
    assert all(result["imgs"]), (
        f"images that did not load: {[i for i, ok in enumerate(result['imgs']) if not ok]}"
    )
    assert result["text"] > 2000  # the summary, definitions and tables are there as text
    assert result["tables"] >= 4  # summary, reliability, stochastic sites, per-input
    # the summary is grouped, one block per OOD set, and shows the three predictions side by side
    assert result["groups"] == [
        "classification",
        "calibration",
        "selective prediction",
        "uncertainty",
        "OOD: wide",
        "OOD: far",
        "counts",
    ]
    headings = result["headings"]
    assert headings[0] == "metric" and headings[1].startswith("deterministic (dropout off)")
    assert headings[2].startswith("MC dropout (N = 6)") and headings[3].startswith("MC + temperature (T = ")
    assert result["overflow"] <= 0  # nothing wider than a 1280-pixel window


def test_screenshot_is_not_blank(saved, tmp_path):
    _, out = saved
    shot = tmp_path / "shot.png"
    done = _run_chromium(
        tmp_path / "profile",
        "--hide-scrollbars",
        "--window-size=1200,1600",
        f"--screenshot={shot}",
        (out / "report.html").as_uri(),
    )
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = plt.imread(shot)[..., :3]
    assert image.shape[0] >= 1000 and image.shape[1] >= 1000
    rgb = (image.reshape(-1, 3) * 255).astype(np.uint32)
    colours = np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2])
    assert colours.size > 50  # text, tables and plots, not one flat colour
    assert 0.05 < float(image.std())
