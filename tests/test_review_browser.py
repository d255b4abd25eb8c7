"""The review page in a real browser: headless Chromium driven through Selenium.

Opens the top radiograph of the queue, drags one point by a known number of
screen pixels, renames another from the list, undoes and redoes, saves, and
checks annotations.csv in original pixels. Skipped, with the reason, where
Debian's `chromium` and `chromium-driver` or the `selenium` package are
missing (`.ci/run` installs them).
"""

from __future__ import annotations

import csv
import shutil
import threading

import pytest
from test_review import STRAIGHT, WIDTH, make_predictions

from vertjax import vertebrae
from vertjax.review import server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Chromium and chromedriver (apt-get install chromium chromium-driver)",
)
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="needs selenium (pip install -e '.[dev]')"
)
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

DRAG = (36, 18)  # screen pixels


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _position(driver, name: str) -> tuple[float, float]:
    """A point's (x, y) in original pixels, read from the page's SVG."""
    transform = driver.find_element(By.CSS_SELECTOR, f'.pt[data-name="{name}"]').get_attribute(
        "transform"
    )
    x, y = transform.removeprefix("translate(").removesuffix(")").split()
    return float(x), float(y)


def test_drag_rename_undo_and_save_in_a_browser(tmp_path, browser):
    pred, images = make_predictions(tmp_path)
    srv = server.make_server(str(pred), images=str(images), port=0)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    wait = WebDriverWait(browser, 20)
    try:
        browser.get(srv.url)
        loaded = 'return document.body.dataset.loaded === "swapped"'
        wait.until(lambda d: d.execute_script(loaded))  # the page opens the top one itself
        top = browser.find_element(By.CSS_SELECTOR, "#queue li")
        assert top.get_attribute("data-id") == "swapped"  # T9 drawn above T8: worst first
        top.click()
        wait.until(lambda d: d.execute_script(loaded))
        assert "T9 lies above T8" in browser.find_element(By.ID, "reasons").text
        scale = browser.execute_script(
            "return document.getElementById('film').getBoundingClientRect().width / arguments[0]",
            WIDTH,
        )
        assert scale > 1  # a small film is shown enlarged

        # Drag T6 by DRAG screen pixels (grabbing its circle, not its label).
        t6 = browser.find_element(By.CSS_SELECTOR, '.pt[data-name="T6"] circle')
        ActionChains(browser).move_to_element(t6).click_and_hold().move_by_offset(
            *DRAG
        ).release().perform()
        k = vertebrae.index("T6")
        moved = (STRAIGHT[k, 0] + DRAG[0] / scale, STRAIGHT[k, 1] + DRAG[1] / scale)
        assert _position(browser, "T6") == pytest.approx(moved, abs=0.05)

        # Rename T8 (drawn where T9 belongs) to T9 from the list: the two swap names.
        browser.find_element(By.CSS_SELECTOR, '.pt[data-name="T8"] circle').click()
        Select(browser.find_element(By.ID, "rename")).select_by_visible_text("T9")
        assert _position(browser, "T9") == pytest.approx(STRAIGHT[vertebrae.index("T9")])
        assert _position(browser, "T8") == pytest.approx(STRAIGHT[vertebrae.index("T8")])

        # Undo twice, redo twice, from the keyboard.
        for keys in ("z", "z"):
            ActionChains(browser).key_down(Keys.CONTROL).send_keys(keys).key_up(
                Keys.CONTROL
            ).perform()
        assert _position(browser, "T6") == pytest.approx(tuple(STRAIGHT[k]))
        for _ in range(2):
            ActionChains(browser).key_down(Keys.CONTROL).key_down(Keys.SHIFT).send_keys("z").key_up(
                Keys.SHIFT
            ).key_up(Keys.CONTROL).perform()
        assert _position(browser, "T6") == pytest.approx(moved, abs=0.05)

        browser.find_element(By.ID, "accept").click()
        wait.until(lambda d: "Saved" in d.find_element(By.ID, "status").text)
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()

    rows = {r["vertebra"]: r for r in csv.DictReader(open(images / "annotations.csv"))}
    assert set(rows) == set(vertebrae.NAMES)
    assert {r["image"] for r in rows.values()} == {"sub/swapped.png"}
    x, y = float(rows["T6"]["x"]), float(rows["T6"]["y"])
    assert abs(x - moved[0]) <= 1 and abs(y - moved[1]) <= 1
    assert abs(x - STRAIGHT[k, 0] - DRAG[0] / scale) < 0.01  # and to the rounding of the csv
    for name in ("T8", "T9"):
        expected = STRAIGHT[vertebrae.index(name)]
        assert (float(rows[name]["x"]), float(rows[name]["y"])) == pytest.approx(expected)
