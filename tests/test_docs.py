"""The documentation cannot lie: README.md and docs/ (issue 34).

- every ```python block runs (Sybil), one test per page, in one namespace per page, from a scratch folder
  holding docs/shirt.png; trainings in a quick mode (NIN_DOCS_QUICK=1, the default here; 0 runs them in full),
  as NIN_NOTEBOOK_QUICK does for the notebook;
- every `nin ...` command of a ```bash block is parsed by nin.cli.build_parser(); the short ones run, and a
  ```text block that shows their output must be what they print;
- a block that is only illustrative carries `<!-- skip: next "illustrative: why" -->`: skipped by name;
- README.md is at most 200 lines; `mkdocs build --strict` passes; the built site opens in headless Chromium
  with navigation and search, and no request leaves the machine.

Under CI=true nothing here may skip (tests/conftest.py).
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import unittest
from pathlib import Path

import pytest

from .browser import chrome
from .fakedata import has_real_fmnist

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
IDS = [str(p.relative_to(ROOT)) for p in PAGES]
CI = os.environ.get("CI") == "true"
QUICK = os.environ.get("NIN_DOCS_QUICK", "1") == "1"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def need(module: str):
    try:
        return __import__(module)
    except ImportError:
        message = f"{module} is not installed (pip install -e '.[docs]')"
        if CI:
            pytest.fail(message)
        pytest.skip(message)


def blocks(path: Path, *langs: str):
    """(first line number, text) of each fenced block of these languages."""
    text = path.read_text(encoding="utf-8")
    for m in FENCE.finditer(text):
        if m.group(1) in langs:
            yield text.count("\n", 0, m.start()) + 2, m.group(2)


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move sections into docs/"
    assert "under 2 minutes" not in "\n".join(lines)  # the claim its own measurement did not back


# --- the nin commands shown -------------------------------------------------------------------
def nin_commands(path: Path):
    """(line, argv) of every nin command in the page's bash blocks: `nin ...`, `python -m nin ...`,
    `torchrun ... -m nin ...`, after `$ `, `VAR=... ` or a pipe; continuation lines joined."""
    for start, body in blocks(path, "bash", "sh", "console", "shell"):
        lines, n = [], start
        for raw in body.replace("\\\n", " \\\n").split("\n"):
            lines.append((n, raw))
            n += 1
        joined, first = "", None
        for n, raw in lines:
            first = first or n
            if raw.rstrip().endswith("\\"):
                joined += raw.rstrip()[:-1] + " "
                continue
            line, joined = joined + raw, ""
            words = shlex.split(line, comments=True)
            if words[:1] == ["$"]:
                words = words[1:]
            for part in " ".join(shlex.quote(w) for w in words).split(" | "):
                w = shlex.split(part)
                while w and re.match(r"^[A-Z_]+=", w[0]):
                    w = w[1:]
                if w[:1] == ["nin"]:
                    yield first, w[1:]
                elif "-m" in w and w[w.index("-m") + 1:w.index("-m") + 2] == ["nin"]:
                    yield first, w[w.index("-m") + 2:]
            first = None


def test_every_page_shows_nin_commands_and_they_are_found():
    found = {p.name: list(nin_commands(p)) for p in PAGES}
    assert len(found["README.md"]) >= 8, found["README.md"]
    for guide in ("training.md", "own-images.md", "using-a-model.md", "serving.md", "distributed.md"):
        assert found[guide], guide
    # the continuation and torchrun forms are understood
    assert ["train", "--resume", "/shared/runs/best"] in [argv for _, argv in found["distributed.md"]]


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_nin_commands_parse(page):
    from nin.cli import build_parser

    for line, argv in nin_commands(page):
        parser = build_parser()
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(argv)
        except SystemExit as e:
            assert e.code == 0, f"{page.name}:{line}: `nin {shlex.join(argv)}` does not parse: {err.getvalue()}"


SHORT = {"nin models": ["models"], "nin summary nin_d2l": ["summary", "nin_d2l"],
         "nin predict docs/shirt.png": ["predict", "docs/shirt.png"]}


@functools.lru_cache(maxsize=None)
def run_nin(command: str) -> str:
    from nin.cli import main

    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out):
            code = main(SHORT[command])
    finally:
        os.chdir(cwd)
    assert code == 0, (command, out.getvalue())
    return out.getvalue()


@pytest.mark.parametrize("command", sorted(SHORT))
def test_short_commands_run_and_print_what_the_pages_show(command):
    printed = run_nin(command)
    assert printed.strip()
    shown = 0
    for page in PAGES:
        for line, body in blocks(page, "text"):
            if body.startswith(f"$ {command}\n"):
                got = body[len(command) + 3:]
                # a page may show the first lines only
                assert printed.startswith(got) or printed.rstrip() == got.rstrip(), \
                    f"{page.name}:{line} shows other output than `{command}` prints:\n{printed}"
                shown += 1
    assert shown, f"no page shows the output of `{command}`"


# --- the python blocks ------------------------------------------------------------------------
def _sybil():
    need("sybil")
    from sybil import Sybil
    from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

    return Sybil(parsers=[PythonCodeBlockParser(), SkipParser()])


PY_PAGES = [p for p in PAGES if any(True for _ in blocks(p, "python"))]


def test_skip_markers_say_why():
    for page in PAGES:
        for m in re.finditer(r"<!--\s*skip:\s*(\w+)(.*?)-->", page.read_text(encoding="utf-8")):
            assert m.group(1) != "next" or "illustrative" in m.group(2), \
                f"{page.name}: a skip marker needs a reason: <!-- skip: next \"illustrative: why\" -->"


@pytest.fixture
def quick_mode(monkeypatch, tmp_path):
    """Run a page's examples from a scratch folder; with NIN_DOCS_QUICK=1, trainings and evaluations
    shrink (the examples themselves stay what a user copies)."""
    import matplotlib

    matplotlib.use("Agg")
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "shirt.png", tmp_path / "docs" / "shirt.png")
    monkeypatch.chdir(tmp_path)
    if QUICK:
        import nin.api
        import nin.evaluation

        train, evaluate = nin.api.train, nin.evaluation.evaluate

        def quick_train(recipe="fast", **kw):
            kw.update(limit_train=512, epochs=1, warmup_epochs=0)
            return train(recipe, **kw)

        def quick_evaluate(model, split, **kw):
            kw.setdefault("limit", 1000)
            return evaluate(model, split, **kw)

        monkeypatch.setattr(nin.api, "train", quick_train)
        monkeypatch.setattr(nin.evaluation, "evaluate", quick_evaluate)
    return tmp_path


@pytest.mark.parametrize("page", PY_PAGES, ids=[str(p.relative_to(ROOT)) for p in PY_PAGES])
# the fine-tuning example's warning is the one its comment promises (asserted in test_pretrained.py)
@pytest.mark.filterwarnings("ignore:.*the class-map layer starts fresh:UserWarning")
def test_python_examples_run(page, quick_mode):
    if not has_real_fmnist():
        pytest.skip("real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    document = _sybil().parse(page)
    ran, skipped = 0, []
    for example in document:
        try:
            example.evaluate()
        except unittest.SkipTest as e:  # an illustrative block, named in the report
            skipped.append(f"{page.name}:{example.line}: {e}")
            continue
        except Exception as e:
            raise AssertionError(f"{page.name}, the block at line {example.line} failed: {e!r}") from e
        ran += 1
    assert ran, page
    if skipped:
        print("illustrative blocks, not run:", *skipped, sep="\n  ")


# --- the site ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory):
    need("mkdocs")
    need("material")
    need("mkdocstrings")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    return out


def test_site_builds_with_every_page_and_the_generated_references(site):
    for page in PAGES[1:]:
        name = page.stem.lower()
        if name == "index":
            assert (site / "index.html").exists()
        else:
            assert (site / name / "index.html").exists(), name
    cli = (site / "cli" / "index.html").read_text(encoding="utf-8")
    from nin.cli import build_parser

    for command in ("summary", "models", "train", "eval", "predict", "cam", "export", "data", "serve"):
        assert f"nin {command} --help" in cli, command
    assert "--min-steps-per-epoch" in cli and "--class-map" in cli
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    import nin

    for name in nin.__all__:  # every public name, at the module that defines it
        assert f'id="{nin._LAZY[name]}.{name}"' in api, name
    assert build_parser() is not None




@pytest.fixture
def served_site(site):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_site_in_a_browser_has_navigation_and_search_and_stays_offline(served_site, tmp_path):
    import json

    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chrome(performance_log=True)
    try:
        wait = WebDriverWait(browser, 20)
        browser.get(served_site + "/")
        nav = [a.get_attribute("textContent").strip()
               for a in browser.find_elements(By.CSS_SELECTOR, "nav.md-nav--primary a.md-nav__link")]
        for title in ("Installing", "Training", "Your own images", "Serving", "Guarantees", "Command line",
                      "Python API"):
            assert any(title in t for t in nav), (title, nav)
        # a guide: its code blocks, and the search finds a flag
        browser.get(served_site + "/training/")
        assert "Training" in browser.title
        assert len(browser.find_elements(By.CSS_SELECTOR, "div.highlight pre")) >= 5
        assert browser.find_elements(By.CSS_SELECTOR, "nav.md-nav--primary a[href*='api/']")
        shot = tmp_path / "training.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
        if os.environ.get("NIN_DOCS_SCREENSHOT"):  # how docs/site-training.png was made
            browser.save_screenshot(os.environ["NIN_DOCS_SCREENSHOT"])
        box = browser.find_element(By.CSS_SELECTOR, "input.md-search__input")
        if not box.is_displayed():  # a narrow window: the header's search button opens it
            next(e for e in browser.find_elements(By.CSS_SELECTOR, "label[for='__search']") if e.is_displayed()).click()
        wait.until(lambda b: box.is_displayed())
        box.click()
        box.send_keys("api-key")
        # the results list is redrawn as the index answers: read it until it names the serving guide
        results = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda b: (lambda text: text if "Serving" in text else False)(
                b.find_element(By.CSS_SELECTOR, ".md-search-result").text))
        assert "api-key" in results.lower() or "api key" in results.lower(), results
        box.send_keys(Keys.ESCAPE)
        # no request left the machine
        urls = set()
        for entry in browser.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                urls.add(message["params"]["request"]["url"])
        outside = sorted(u for u in urls if not u.startswith((served_site, "data:", "blob:")))
        assert not outside, outside
        assert any(u.endswith("search_index.json") for u in urls) or any("search" in u for u in urls), urls
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
    finally:
        browser.quit()
