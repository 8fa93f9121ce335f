"""The report in a real browser: headless Chromium loads it offline with every image and no error.

A copy of the page gets a probe script at the top of ``<head>``: it records every
error event (a failed image load included) and ``console.error`` call, and once the
page has loaded writes, into the DOM, how many images there are and which did not
render (``naturalWidth == 0``). ``--dump-dom`` prints that DOM. Skipped, saying so,
where no Chromium is installed (``.ci/run`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from labeled_output import write_labeled_output
from skray.report.page import write_report

BROWSER = next(
    (
        shutil.which(name)
        for name in ("chromium", "chromium-browser", "google-chrome")
        if shutil.which(name)
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no chromium on PATH (apt-get install chromium)"
)

PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(e.message || ("failed to load " +
  (e.target && e.target.tagName))), true);
const consoleError = console.error;
console.error = (...args) => { window.__errors.push(args.join(" ")); consoleError(...args); };
window.addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt);
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images: images.length, broken, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Headless Chromium with no network, no profile left behind."""
    command = [
        BROWSER,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={cwd / 'profile'}",
        "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>",
        "--virtual-time-budget=10000",
        *args,
    ]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120, check=True)


def probe(page: Path, tmp_path: Path) -> dict:
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    dom = chromium("--dump-dom", probed.as_uri(), cwd=tmp_path).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.DOTALL)
    assert found, dom[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.timeout(240)
def test_report_renders_offline_with_every_image_and_no_error(tmp_path: Path) -> None:
    out = write_labeled_output(str(tmp_path / "data"))
    page = Path(write_report(out.uri))
    result = probe(page, tmp_path)
    assert result["images"] > 20, result  # 3 charts and the gallery thumbnails
    assert result["broken"] == [] and result["errors"] == [], result
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri(), cwd=tmp_path)
    assert shot.stat().st_size > 50_000  # a page with charts and photos, not a blank one


@pytest.mark.timeout(120)
def test_the_probe_sees_a_broken_image(tmp_path: Path) -> None:
    """The check itself: a page with one image that cannot load is reported, not passed."""
    page = tmp_path / "broken.html"
    page.write_text(
        '<!doctype html><html><head></head><body><img alt="gone" src="gone.png"></body></html>'
    )
    result = probe(page, tmp_path)
    assert result["broken"] == ["gone"] and result["errors"], result
