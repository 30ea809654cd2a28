"""`llmkit serve`'s chat page in headless Chromium: a typed question gets a reply that streams in piece by piece,
and the page asks no host but the server for anything. Uses the browser fixtures of test_in_browser.py."""

from pathlib import Path

from test_in_browser import ARTIFACTS, LOCAL, browser, page  # noqa: F401 (fixtures)

from llmkit.serve import ServerProcess

# Every change to the conversation records the reply's length, so the test sees whether it grew in steps.
WATCH_REPLY = """() => {
    window.replyLengths = [];
    new MutationObserver(() => {
        const reply = document.querySelector('.assistant');
        if (reply) window.replyLengths.push(reply.textContent.length);
    }).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
}"""


def test_chat_page_streams_a_reply(page, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    with ServerProcess(["--max-batch-size", 2], log=tmp_path / "server.log") as server:
        page.goto(f"{server.url}/")
        page.evaluate(WATCH_REPLY)
        page.locator("#prompt").fill("What does len do?")
        page.locator("#send").click()
        page.wait_for_function(
            "() => document.getElementById('status').textContent.includes('new tokens')"
            " && !document.getElementById('send').disabled",
            timeout=60_000,
        )
        page.screenshot(path=ARTIFACTS / "serve_chat_page.png")
        reply = page.locator(".assistant").inner_text()
        lengths = page.evaluate("() => window.replyLengths")
        assert page.locator(".user").inner_text().endswith("What does len do?")
        assert reply.strip() and not page.locator(".error").count()
        assert len({n for n in lengths if n}) >= 3, f"the reply came in {len(set(lengths))} piece(s): {lengths}"
        assert server.health()["active"] == 0
    remote = [url for url in requests if not LOCAL.match(url)]
    assert not remote, f"the page asked other hosts for: {remote}"
