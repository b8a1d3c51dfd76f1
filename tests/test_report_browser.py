"""index.html of the comparison report, opened from file:// in Debian's headless chromium.

Checks what a person would see: both embedded images decode (naturalWidth > 0) and the policies
table has one row per policy. Skipped where chromium or chromedriver is missing, unless
CI_REQUIRE_BROWSER=1 (set by .ci/run, which installs them), where a missing browser is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stages.report import PolicyPoint, build_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REQUIRED = os.environ.get("CI_REQUIRE_BROWSER") == "1"


def _browser_or_skip() -> None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing and not REQUIRED:
        pytest.skip(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver to run this test "
                    "(CI installs them and sets CI_REQUIRE_BROWSER=1)")
    assert not missing, f"CI_REQUIRE_BROWSER=1 but {', '.join(missing)} missing: .ci/run should have installed them"


def _points() -> list[PolicyPoint]:
    curve = {"train/loss": [(1, 0.7), (2, 0.5)]}
    return [
        PolicyPoint("sft", "sft", {}, {"kl_to_sft": 0.0, "rm_score_mean": 0.1}, [0.0, 1.0], ["a", "b"], {}),
        PolicyPoint("dpo beta=0.1", "dpo", {"beta": 0.1}, {"kl_to_sft": 1.0, "rm_score_mean": 0.4}, [0.5, 1.0],
                    ["<script>document.body.innerHTML = ''</script>", "c"], curve),
        PolicyPoint("ppo kl=0.05", "ppo", {"kl_coef": 0.05}, {"kl_to_sft": 2.0, "rm_score_mean": 0.6}, [1.0, 0.0],
                    ["d", "e"], curve),
    ]


def test_index_html_renders_in_headless_chromium(tmp_path):
    _browser_or_skip()
    if REQUIRED:
        from selenium import webdriver
    else:
        webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed: pip install -e .[test]")
    from selenium.webdriver.chrome.service import Service

    judge = {"name": "held_out_rm", "kind": "held_out_rm", "independent": True, "pair_accuracy": 0.8, "pairs": 150}
    report = build_report(_points(), ["prompt 0", "prompt 1"], tmp_path, title="browser check", judge=judge)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1024"):
        options.add_argument(argument)
    # an explicit driver path: selenium-manager (which would download a driver) is not used
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(15)
        driver.get(report.index_html.resolve().as_uri())
        for image in ("frontier", "curves"):
            width = driver.execute_script(
                "const img = document.getElementById(arguments[0]); return img.complete ? img.naturalWidth : -1;",
                image)
            assert width > 0, f"<img id={image}> did not render (naturalWidth {width})"
        rows = driver.execute_script("return document.querySelectorAll('#policies tbody tr').length;")
        assert rows == 3
        # the escaped completion is shown as text, not run
        assert "<script>" in driver.find_element("id", "samples").text
        assert driver.find_element("id", "verdict").text.startswith("Verdict:")  # the page opens with the verdict
    finally:
        driver.quit()
