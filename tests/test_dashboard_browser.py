"""The INFLUENCE tab in a real browser: headless Chromium from the system packages (driven by Selenium through the
system chromedriver, so nothing is downloaded) on TensorBoard serving saved runs. Screenshots are saved as test
artifacts in $INFLUENCE_TEST_ARTIFACTS (default: a pytest temporary folder, printed)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dashboard_helpers import CHROMEDRIVER, CHROMIUM, feature_run, image_run, tensorboard

pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver; .ci/run installs them)")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WAIT = 30  # seconds for a page element to appear


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("INFLUENCE_TEST_ARTIFACTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots in {folder}")
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium; downloads go to `browser.downloads`."""
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download a driver
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                     "--disable-gpu"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """TensorBoard on a log dir with two finished runs and one still computing."""
    logdir = tmp_path_factory.mktemp("logdir")
    result, flipped = image_run(logdir / "images")
    feature_run(logdir / "features")
    (logdir / "late" / "influence" / "partial").mkdir(parents=True)
    with tensorboard(logdir) as url:
        yield url, logdir, result, flipped


def _wait(driver, condition, timeout: float = WAIT):
    """Wait for `condition`; an element the tab replaced while it was read is looked up again."""
    return WebDriverWait(driver, timeout, ignored_exceptions=[StaleElementReferenceException]).until(condition)


def _css(driver, selector: str):
    return _wait(driver, expected_conditions.presence_of_element_located((By.CSS_SELECTOR, selector)))


def _open_tab(driver, url: str, run: str | None = None) -> None:
    """Open TensorBoard's INFLUENCE tab, enter its frame, and pick `run` (default: the newest)."""
    driver.switch_to.default_content()
    driver.get("about:blank")  # a fresh page: the same URL with a fragment would not reload
    driver.get(f"{url}/#influence")
    _wait(driver, expected_conditions.frame_to_be_available_and_switch_to_it((By.CSS_SELECTOR, "iframe")))
    _css(driver, "#helpful-table tbody tr")
    if run is not None:
        Select(driver.find_element(By.ID, "run-select")).select_by_value(run)
        _wait(driver, lambda d: d.find_element(By.ID, "main").get_attribute("data-run") == run)
        _css(driver, "#helpful-table tbody tr")


def _indices(driver, table: str) -> list[int]:
    return [int(row.get_attribute("data-index")) for row in driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")]


def _shows_query(driver, position: int) -> None:
    _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#query-detail h2").text == f"Query {position}")


def _screenshot(driver, path: Path) -> None:
    driver.switch_to.default_content()
    driver.save_screenshot(str(path))
    driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "iframe"))


def test_tensorboard_lists_the_tab_and_every_promised_tag(served):
    """Asked over HTTP as the UI asks, from the default data provider (the Rust data server when installed)."""
    url, _, _, _ = served
    listing = json.loads(urllib.request.urlopen(f"{url}/data/plugins_listing").read())
    assert listing["influence"]["enabled"] and listing["influence"]["tab_name"] == "Influence"
    assert listing["influence"]["loading_mechanism"]["type"] == "IFRAME"
    promised = {"images": {"influence/images/query_000", "influence/images/self_influence"},
                "histograms": {"influence/histograms/scores", "influence/histograms/self_influence"},
                "text": {"influence/text/summary/text_summary", "influence/text/self_influence/text_summary"},
                "scalars": {"influence/self_influence_by_rank"}}
    deadline, found = time.monotonic() + WAIT, {}
    while time.monotonic() < deadline and found != promised:
        tags = {plugin: json.loads(urllib.request.urlopen(f"{url}/data/plugin/{plugin}/tags").read())
                for plugin in promised}
        found = {plugin: {tag for tag in promised[plugin] if any(tag in str(tags[plugin].get(run, {}))
                                                               for run in tags[plugin])} for plugin in promised}
        time.sleep(0.5)
    assert found == promised


def test_a_query_then_a_training_example_as_the_result_ranks_them(served, browser, artifacts):
    url, _, result, flipped = served
    _open_tab(browser, url, "images/influence")
    _shows_query(browser, 0)
    for position in (0, 3):
        if position:
            browser.find_element(By.CSS_SELECTOR, f".query-item[data-position='{position}']").click()
            _shows_query(browser, position)
        helpful, harmful = result.top_helpful(position, 10), result.top_harmful(position, 10)
        assert _indices(browser, "helpful-table") == [int(i) for i, s in zip(*helpful) if s > 0]
        assert _indices(browser, "harmful-table") == [int(i) for i, s in zip(*harmful) if s < 0]
        marked = [int(r.get_attribute("data-index")) for r in browser.find_elements(By.CSS_SELECTOR, "tr.is-suspect")]
        assert marked and set(marked) <= set(flipped.tolist())  # the suspect marks are the flipped labels
    _screenshot(browser, artifacts / "influence_query.png")

    link = browser.find_element(By.CSS_SELECTOR, "#harmful-table a.train-link")
    index = int(link.get_attribute("data-index"))
    link.click()
    _css(browser, "#train-view")
    assert browser.find_element(By.CSS_SELECTOR, "#train-view h2").text == f"Training example #{index}"
    column = result.scores[:, index]
    helps = [int(q) for q in column.topk(min(10, len(column))).indices if column[q] > 0]
    assert [int(r.get_attribute("data-position")) for r in
            browser.find_elements(By.CSS_SELECTOR, "#helps-table tbody tr")] == helps
    _screenshot(browser, artifacts / "influence_training_example.png")


def test_self_influence_ranking_exports_the_checked_suspects(served, browser, artifacts):
    url, _, result, flipped = served
    _open_tab(browser, url, "images/influence")
    _css(browser, ".view-tab[data-view='self']").click()
    _css(browser, "#self-table tbody tr")
    assert _indices(browser, "self-table") == result.top_self_influence(min(50, result.num_train)).indices.tolist()
    checked = [int(box.get_attribute("data-index")) for box in browser.find_elements(By.CSS_SELECTOR, "input.pick")
               if box.is_selected()]
    assert sorted(checked) == flipped.tolist()  # suspect labels are checked: here, exactly the flipped ones
    browser.find_element(By.CSS_SELECTOR, f"input.pick[data-index='{checked[-1]}']").click()  # uncheck one
    _screenshot(browser, artifacts / "influence_self_influence.png")
    browser.find_element(By.ID, "export-link").click()
    target = browser.downloads / "suspected_mislabels_images_influence.csv"  # named by the server
    _wait(browser, lambda _: target.is_file() and target.stat().st_size > 0)
    with open(target) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["train_index"]) for r in rows] == checked[:-1]
    assert all(r["suspect_label"] == "true" for r in rows)


def test_several_runs_and_a_run_that_finishes_while_the_tab_is_open(served, browser, artifacts):
    url, logdir, _, _ = served
    _open_tab(browser, url)
    runs = Select(browser.find_element(By.ID, "run-select"))
    assert [o.text.split(" ")[0] for o in runs.options] == ["features/influence", "images/influence",
                                                            "late/influence"]
    assert "(computing)" in runs.options[2].text
    assert runs.first_selected_option.get_attribute("value") == "features/influence"  # the newest result
    assert "features" in browser.find_element(By.CSS_SELECTOR, "#helpful-table tbody tr").text  # described
    _screenshot(browser, artifacts / "influence_described_run.png")
    runs.select_by_value("late/influence")
    _wait(browser, lambda d: "still computing" in d.find_element(By.ID, "main").text)

    late = logdir / "late" / "influence"
    for part in ("result", "report"):
        shutil.copytree(logdir / "images" / "influence" / part, late / part)
    shutil.rmtree(late / "partial")
    browser.find_element(By.ID, "refresh").click()
    _css(browser, "#helpful-table tbody tr")
    selected = Select(browser.find_element(By.ID, "run-select")).first_selected_option.text
    assert selected == "late/influence (6 queries × 60 training examples)"
    _screenshot(browser, artifacts / "influence_late_run.png")


def test_images_and_text_tabs_as_a_user_sees_them(served, browser, artifacts):
    url, _, _, _ = served
    browser.switch_to.default_content()
    for tab in ("images", "text"):
        browser.get(f"{url}/#{tab}")
        _wait(browser, lambda d: "influence/" in d.find_element(By.TAG_NAME, "body").text)
        time.sleep(1)  # let the cards load their content
        browser.save_screenshot(str(artifacts / f"tensorboard_{tab}.png"))


@pytest.mark.slow
def test_the_example_run_shows_its_flipped_labels_within_two_clicks(tmp_path, browser, artifacts):
    """The README's first command, then `tensorboard --logdir`: the INFLUENCE tab (click 1) shows query 0 with
    its harmful examples marked; the self-influence view (click 2) has the flipped labels checked. Screenshots
    go to docs/ too when INFLUENCE_DOCS_SCREENSHOTS=1."""
    sys.path.insert(0, str(ROOT / "examples"))
    from mislabeled_digits import noisy_digits

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "examples" / "mislabeled_digits.py"), "--root", str(tmp_path)],
                   check=True, env=env, capture_output=True, timeout=900)
    flipped = set(noisy_digits(0)[2].tolist())
    with tensorboard(tmp_path) as url:
        _open_tab(browser, url)
        marked = [int(r.get_attribute("data-index")) for r in
                  browser.find_elements(By.CSS_SELECTOR, "#harmful-table tr.is-suspect")]
        assert len(marked) >= 3 and set(marked) <= flipped
        _screenshot(browser, artifacts / "example_influence_tab.png")
        browser.find_element(By.CSS_SELECTOR, ".view-tab[data-view='self']").click()
        _css(browser, "#self-table tbody tr")
        checked = [int(b.get_attribute("data-index")) for b in browser.find_elements(By.CSS_SELECTOR, "input.pick")
                   if b.is_selected()]
        assert len(set(checked) & flipped) >= 0.9 * len(checked) >= 40
        _screenshot(browser, artifacts / "example_self_influence.png")
        browser.switch_to.default_content()
        browser.get(f"{url}/#images")
        _wait(browser, lambda d: "influence/images" in d.find_element(By.TAG_NAME, "body").text)
        time.sleep(2)
        browser.save_screenshot(str(artifacts / "example_images_tab.png"))
    if os.environ.get("INFLUENCE_DOCS_SCREENSHOTS"):
        for name in ("example_influence_tab", "example_self_influence", "example_images_tab"):
            shutil.copy(artifacts / f"{name}.png", ROOT / "docs" / f"{name}.png")
        _side_by_side(tmp_path / "version_0" / "influence" / "report", ROOT / "docs" / "mislabeled_digits_report.png")


def _side_by_side(report: Path, target: Path) -> None:
    """The README's picture of the static report: query 0's grid beside the self-influence grid."""
    from PIL import Image

    left, right = (Image.open(report / name) for name in ("query_000.png", "self_influence.png"))
    canvas = Image.new("RGB", (left.width + right.width + 24, max(left.height, right.height)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 24, 0))
    canvas.save(target)
