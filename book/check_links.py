"""Check a built book's internal links and images: every relative href and src must name a file of the build,
and every #fragment an id in that file. Sphinx's -W catches broken references in the sources; this catches
what reaches the HTML any other way (raw HTML in notebook outputs, links written by hand in Markdown cells)."""

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class Page(HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.ids.add(value)
            if value and (name == "src" or (name == "href" and tag in ("a", "link"))):
                self.links.append(value)


def broken_links(root: Path) -> list[str]:
    paths = [p for p in sorted(root.rglob("*.html")) if p.relative_to(root).parts[0] != "_static"]  # theme templates
    pages = {path: Page(path.read_text(encoding="utf-8")) for path in paths}
    broken = []
    for path, page in pages.items():
        for link in page.links:
            url = urlsplit(link)
            if url.scheme or url.netloc:  # http(s), mailto, data: not ours to check offline
                continue
            target = (path.parent / unquote(url.path)).resolve() if url.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{path.relative_to(root)}: {link} (no such file)")
            elif url.fragment and target in pages and unquote(url.fragment) not in pages[target].ids:
                broken.append(f"{path.relative_to(root)}: {link} (no id {url.fragment!r} there)")
    return broken


def main(root: str = "book/_build/html") -> int:
    broken = broken_links(Path(root))
    for line in broken:
        print(line, file=sys.stderr)
    print(f"{root}: {len(broken)} broken internal links or images")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
