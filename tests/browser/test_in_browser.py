"""In a real browser, as a learner sees it: JupyterLab runs the generation chapter and its chat box answers a
typed prompt, the built book's pages show their images, and its formulas are typeset by the MathJax it ships, with no
other host asked for anything. Headless Debian Chromium driven by Playwright; `make test-browser` runs it (after
`make book`). Screenshots go to tests/artifacts/.

Without /usr/bin/chromium or Playwright the tests skip with the reason, except under CI, where they fail.
"""

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
NOTEBOOK = "notebooks/02_generate.ipynb"
BOOK = ROOT / "book" / "_build" / "html"
ARTIFACTS = ROOT / "tests" / "artifacts"
LOCAL = re.compile(r"^https?://(127\.0\.0\.1|localhost)[:/]")

# JupyterLab settings for the test's own settings folder: no autosave (the run must not rewrite the committed
# notebook), the notebook's kernel started without asking, every cell in the DOM (windowing would leave off-screen
# cells out), and no calls to news servers.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "windowingMode": "none",
        "autoStartDefaultKernel": True,
    },
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}


def require(ok: bool, reason: str) -> None:
    """A missing prerequisite fails the run under CI (which installs it) and skips with the reason elsewhere."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    require(CHROMIUM.exists(), f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "Playwright is missing (pip install -e '.[dev]')")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:  # Playwright gives each launch a fresh, temporary user-data-dir
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, test_failed: Callable[[], bool], request: pytest.FixtureRequest) -> Iterator:
    """A page that reaches only this machine (anything else is aborted, so nothing waits on a network); when
    the test fails, the page as it was is saved as failed_<test>.png."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.route(lambda url: not LOCAL.match(url), lambda route: route.abort())
    page = context.new_page()
    try:
        yield page
    finally:
        if test_failed():
            name = re.sub(r"[^\w.-]", "_", request.node.name)
            page.screenshot(path=ARTIFACTS / f"failed_{name}.png")
        context.close()


def wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with status {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen, base: str, token: str) -> None:
    """Ask the server to shut down (it stops its kernels), then end its process group whatever state it is in."""
    try:
        urllib.request.urlopen(urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST"), timeout=5)
        server.wait(timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


@pytest.fixture
def jupyterlab(tmp_path: Path) -> Iterator[str]:
    """JupyterLab on a free localhost port with a token, rooted at the repository; yields the notebook's URL.
    The committed notebook is restored if anything wrote to it."""
    for name, values in LAB_SETTINGS.items():
        (tmp_path / "settings" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "settings" / name).write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    base, log = f"http://127.0.0.1:{port}", tmp_path / "jupyterlab.log"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "run")}
    notebook = ROOT / NOTEBOOK
    original = notebook.read_bytes()
    options = {
        "ServerApp.ip": "127.0.0.1", "ServerApp.port": port, "ServerApp.port_retries": 0, "ServerApp.allow_root": True,
        "IdentityProvider.token": token, "ServerApp.root_dir": ROOT,
        "LabApp.user_settings_dir": tmp_path / "settings", "LabApp.workspaces_dir": tmp_path / "workspaces",
    }  # fmt: skip
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", *(f"--{k}={v}" for k, v in options.items())]
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_until_up(f"{base}/api/status?token={token}", server, log)
        yield f"{base}/lab/tree/{NOTEBOOK}?token={token}"
    finally:
        stop(server, base, token)
        if notebook.read_bytes() != original:
            notebook.write_bytes(original)
            pytest.fail(f"the browser run changed {NOTEBOOK}; it was restored")


# Each code cell's prompt ("[3]:" once run) and the text of any error output.
CELL_STATE = """() => ({
    prompts: [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.innerText.trim()),
    errors: [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
        .map(o => o.innerText).filter(t => /Traceback|\\w+Error\\b/.test(t)),
})"""


def run_all_cells(page, timeout: float = 150) -> None:
    """Run > Run All Cells, then wait until every code cell has its execution count; fail at the first error."""
    page.locator("#jp-main-statusbar").get_by_text("Idle").wait_for(timeout=60_000)  # the kernel is up
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    deadline = time.monotonic() + timeout
    while True:
        state = page.evaluate(CELL_STATE)
        if state["prompts"] and all(re.fullmatch(r"\[\d+\]:", p) for p in state["prompts"]):
            return
        assert not state["errors"], "a cell failed:\n" + "\n".join(state["errors"])[-3000:]
        assert time.monotonic() < deadline, f"cells not all run after {timeout:.0f} s: {state['prompts']}"
        page.wait_for_timeout(1000)


def test_chat_box_answers_in_jupyterlab(page, jupyterlab: str) -> None:
    page.goto(jupyterlab)
    run_all_cells(page)
    page.screenshot(path=ARTIFACTS / "jupyterlab_02_generate.png")

    send = page.locator(".llmkit-chat-send-button")
    typed = "The string method"
    page.locator(".llmkit-chat-prompt textarea").fill(typed)
    send.click()
    page.wait_for_function(
        """typed => {
            const text = document.querySelector('.llmkit-chat-conversation').innerText;
            const stats = document.querySelector('.llmkit-chat-stats').innerText;
            const at = text.lastIndexOf(typed);
            return at >= 0 && text.length > at + typed.length && stats.includes('new tokens')
                && !document.querySelector('.llmkit-chat-send-button').disabled;
        }""",
        arg=typed,
        timeout=60_000,
    )
    box = page.locator(".llmkit-chat-conversation").locator("xpath=..")
    box.scroll_into_view_if_needed()
    box.screenshot(path=ARTIFACTS / "jupyterlab_chat_reply.png")
    assert not page.locator(".llmkit-chat-message").inner_text().strip()


@pytest.fixture
def book() -> Iterator[str]:
    """The built book served on a free localhost port, as `python -m http.server` would."""
    require((BOOK / "index.html").is_file(), f"no built book at {BOOK} (run make book first)")
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), partial(SimpleHTTPRequestHandler, directory=BOOK))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(
    "path, lands_on", [("index.html", "intro.html"), ("notebooks/02_generate.html", "notebooks/02_generate.html")]
)
def test_book_page_shows_its_images(page, book: str, path: str, lands_on: str) -> None:
    page.goto(f"{book}/{path}")
    page.wait_for_url(f"{book}/{lands_on}")  # index.html redirects to the introduction
    page.wait_for_load_state("load")
    images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.currentSrc, i.complete, i.naturalWidth])")
    page.screenshot(path=ARTIFACTS / f"book_{Path(lands_on).stem}.png", full_page=True)
    assert images, f"{lands_on} shows no images"
    broken = [src for src, complete, width in images if not (complete and width > 0)]
    assert not broken, f"{lands_on}: images that did not load: {broken}"


# Sphinx wraps each formula in an element of class "math" (\(...\) inline, \[...\] displayed) that MathJax fills with
# an <mjx-container>. Reported: the formulas, how many MathJax typeset, its TeX errors, text outside code that still
# looks like TeX, and MathJax's web fonts with their loading state.
MATH_STATE = r"""() => {
    const root = document.querySelector('main') ?? document.body;
    const math = [...root.querySelectorAll('.math')];
    const tex = /\\[[(]|\$\$|\\begin\{/;
    const raw = [];
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        const code = node.parentElement.closest('pre, code, script, style, mjx-container');
        if (!code && tex.test(node.data)) raw.push(node.data.trim().slice(0, 80));
    }
    return {
        math: math.length,
        displayed: math.filter(m => m.tagName === 'DIV').length,
        typeset: math.filter(m => m.querySelector('mjx-container')).length,
        errors: [...root.querySelectorAll('mjx-merror')].map(e => e.getAttribute('data-mjx-error') || e.textContent),
        raw,
        fonts: [...document.fonts].filter(f => f.family.startsWith('MJX')).map(f => [f.family, f.status]),
    };
}"""


def test_book_formulas_typeset_offline(page, book: str) -> None:
    """The numerics chapter's formulas are typeset by the book's own MathJax with its own fonts, and the page asks
    no other host for anything (the page fixture aborts such requests; here any attempt fails the test)."""
    requests, fonts = [], {}

    def font_status(response) -> None:
        if ".woff" in response.url:
            fonts[response.url] = response.status

    page.on("request", lambda request: requests.append(request.url))
    page.on("response", font_status)
    page.goto(f"{book}/notebooks/03_numerics.html")
    page.wait_for_load_state("load")
    page.wait_for_function("() => window.MathJax?.startup?.promise", timeout=30_000)
    page.evaluate("() => MathJax.startup.promise.then(() => document.fonts.ready).then(() => true)")
    state = page.evaluate(MATH_STATE)
    page.screenshot(path=ARTIFACTS / "book_03_numerics.png", full_page=True)

    remote = [url for url in requests if not LOCAL.match(url) and not url.startswith(("data:", "blob:"))]
    assert not remote, f"the page asked other hosts for: {remote}"
    assert any("/_static/mathjax/" in url for url in requests), "MathJax was not loaded from the book's _static/"
    assert state["displayed"] > 0, f"no displayed formula on the page: {state}"
    assert state["typeset"] == state["math"], f"MathJax typeset {state['typeset']} of {state['math']} formulas"
    assert not state["errors"], f"TeX errors: {state['errors']}"
    assert not state["raw"], f"TeX shown as text: {state['raw']}"
    assert fonts and all(status == 200 for status in fonts.values()), f"MathJax font requests: {fonts}"
    assert any(status == "loaded" for _, status in state["fonts"]), f"no MathJax font loaded: {state['fonts']}"
    assert all(status != "error" for _, status in state["fonts"]), f"MathJax fonts: {state['fonts']}"


def test_book_pages_ask_no_other_host(page, book: str) -> None:
    """No page of the book fetches anything from another host (a CDN's script, font or style) as it is read."""
    pages = sorted(p.relative_to(BOOK).as_posix() for p in BOOK.rglob("*.html"))
    pages = [path for path in pages if not path.startswith("_static/")]  # theme templates, not pages
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    remote = {}
    for path in pages:
        requests.clear()
        page.goto(f"{book}/{path}", wait_until="networkidle")
        asked = [url for url in requests if not LOCAL.match(url) and not url.startswith(("data:", "blob:"))]
        if asked:
            remote[path] = asked
    assert len(pages) > 10, f"only {pages} in the built book"
    assert not remote, f"pages that asked other hosts: {remote}"
