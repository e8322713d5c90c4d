"""The demo page in a real browser: `python -m mcpf_jax.demo` started as a user starts it, on the smoke model, and
driven by a headless Chromium (Debian's chromium + chromium-driver, through selenium; .ci/run installs them).

Two photos and a broken file are dropped on the page: the scores read off its table are the Scorer's (score.py's)
for the same files, the broken file's row shows its error, the table sorts, and the CSV it offers holds the same
rows. A screenshot of the page is kept in test-artifacts/demo.png. A missing browser fails the test: it is part of
what CI installs, not an optional extra of this machine.
"""

from __future__ import annotations

import csv
import io
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from e2e_support import free_port

REPO = pathlib.Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
START_TIMEOUT_S = 120
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost, whatever the environment says


@pytest.fixture(scope="module")
def demo_model(smoke_run):
  """The model the page serves: the demo's arguments, and the Scorer of the same model (the reference scores).

  The session's trained smoke run, read only (the one place to change for another shared run).
  """
  from mcpf_jax.scoring import Scorer  # pylint: disable=g-import-not-at-top
  return ["--workdir", str(smoke_run.workdir)], lambda: Scorer.from_checkpoint(smoke_run.workdir, "best",
                                                                                 batch_size=4)


def _browser():
  chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
  assert chromium and driver, ("the browser test needs Debian's chromium and chromium-driver: apt-get install -y "
                               f"chromium chromium-driver (.ci/run installs them); found chromium={chromium}, "
                               f"chromedriver={driver}")
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--no-proxy-server",
              "--window-size=1280,1400"):
    options.add_argument(arg)
  return webdriver.Chrome(service=Service(driver), options=options)


def _wait_for_server(proc: subprocess.Popen, url: str, log: pathlib.Path) -> None:
  deadline = time.monotonic() + START_TIMEOUT_S
  while time.monotonic() < deadline:
    assert proc.poll() is None, f"the demo exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
    try:
      with NO_PROXY.open(url, timeout=2):
        return
    except OSError:
      time.sleep(0.25)
  raise AssertionError(f"the demo did not answer on {url} in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def _rows(driver) -> list[list[str]]:
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  rows = driver.find_elements(By.CSS_SELECTOR, "#scores [role=row]")
  cells = [[c.text for c in r.find_elements(By.CSS_SELECTOR, "[role=gridcell]")] for r in rows]
  return [c for c in cells if c]  # the header row has column headers, no grid cells


def test_demo_page_scores_dropped_files_as_the_scorer(demo_model, test_data, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  start = time.monotonic()
  args, make_scorer = demo_model
  clive = test_data / "clive-mini" / "ChallengeDB_release" / "Images"
  photos = [tmp_path / "first.jpg", tmp_path / "second.jpg"]
  shutil.copy(clive / "1004.JPG", photos[0])
  shutil.copy(clive / "1024.JPG", photos[1])
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"\xff\xd8\xff\xe0 a JPEG's first bytes, then nothing")
  port = free_port()
  url = f"http://127.0.0.1:{port}/"
  log = tmp_path / "demo.log"
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "mcpf_jax.demo", *args, "--port", str(port)], cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  driver = None
  try:
    # The reference scores while the page starts: the Scorer that score.py uses, on the same files.
    reference = {pathlib.Path(r.path).name: r for r in make_scorer().score([*map(str, photos), str(broken)])}
    assert reference["first.jpg"].ok and reference["second.jpg"].ok and not reference["broken.jpg"].ok
    _wait_for_server(proc, url, log)
    started = time.monotonic() - start
    driver = _browser()
    driver.get(url)
    wait = WebDriverWait(driver, 60)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#images input[type=file]"))
    upload.send_keys("\n".join(str(p) for p in [photos[0], broken, photos[1]]))
    wait.until(lambda d: len(_rows(d)) == 3 and _rows(d)[2][0] == "second.jpg")
    rows = {r[0]: r for r in _rows(driver)}

    for name in ("first.jpg", "second.jpg"):
      ref = reference[name]
      _, score, error, width, height, _ = rows[name]
      assert error == "" and (int(width), int(height)) == (ref.width, ref.height), rows[name]
      assert abs(float(score) - ref.score) <= 1e-4, (name, score, ref.score)
    assert rows["broken.jpg"][1] == ""
    assert rows["broken.jpg"][2].startswith("broken.jpg: cannot decode image"), rows["broken.jpg"]
    print(f"page vs Scorer: first {rows['first.jpg'][1]} / {reference['first.jpg'].score:.6f}, second "
          f"{rows['second.jpg'][1]} / {reference['second.jpg'].score:.6f}")

    # The CSV the page offers holds the table's rows.
    link = driver.find_element(By.CSS_SELECTOR, "#csv a[href]").get_attribute("href")
    with NO_PROXY.open(link, timeout=10) as f:
      table = list(csv.reader(io.StringIO(f.read().decode())))
    assert table[0] == ["file", "score", "error", "width", "height", "note"]
    assert [r[:3] for r in table[1:]] == [rows[n][:3] for n in ("first.jpg", "broken.jpg", "second.jpg")]

    # The level chart shows the first image's probabilities; the table sorts by score from the column's menu.
    assert driver.find_element(By.CSS_SELECTOR, "#pick input").get_attribute("value") == "first.jpg"
    assert driver.find_elements(By.CSS_SELECTOR, "#levels canvas, #levels svg")
    header = driver.find_element(By.CSS_SELECTOR, "#scores [data-testid=header-1]")
    assert header.text.strip() == "score"
    driver.execute_script("arguments[0].click()", header.find_element(By.CSS_SELECTOR, "button.cell-menu-button"))
    wait.until(lambda d: any(b.text == "Sort descending" for b in d.find_elements(By.CSS_SELECTOR, "button")))
    next(b for b in driver.find_elements(By.CSS_SELECTOR, "button") if b.text == "Sort descending").click()
    high_first = sorted(("first.jpg", "second.jpg"), key=lambda n: -reference[n].score)
    wait.until(lambda d: [r[0] for r in _rows(d)] == high_first + ["broken.jpg"])

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "demo.png"
    assert driver.save_screenshot(str(shot))
    print(f"screenshot: {shot} (demo answering after {started:.1f} s, test {time.monotonic() - start:.1f} s)")
  finally:
    if driver is not None:
      driver.quit()
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def test_without_gradio_the_demo_says_how_to_install_it(tmp_path):
  """Gradio is an optional extra: without it the command stops at once (before loading any model) and says how."""
  hide_gradio = ("import runpy, sys; sys.modules['gradio'] = None; sys.argv[0] = 'mcpf_jax.demo'; "
                 "runpy.run_module('mcpf_jax.demo', run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", hide_gradio, "--workdir", str(tmp_path)], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1, proc.stderr
  assert "needs Gradio, an optional extra of mcpf_jax: pip install -e '.[demo]'" in proc.stderr, proc.stderr
  assert "gradio==6.31.0" in proc.stderr
