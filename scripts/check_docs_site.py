"""Checks the built documentation site in a real browser: fails on a missing page, a broken internal link or a page
that does not render.

    .venv/bin/python scripts/check_docs_site.py [--html docs/_build/html] [--out docs/_build/screenshots]

1. Every page the site must have exists (the index, one page per guide in docs/guides/, the API pages, the
   development page).
2. Every internal link of every built page (href and src, with its #fragment) points at a file that exists and,
   for a fragment, at an element with that id.
3. The site is served on 127.0.0.1 and headless Chromium loads the index, a guide and an API page: each must
   render its title and body (the DOM after scripts ran), and its screenshot (written to --out) must not be blank.

Chromium comes from the system (`apt-get install chromium`); $CHROMIUM names another binary. Exit status 1 and one
line per problem when anything fails.
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = {  # page -> what its rendered DOM must contain (the last: a table made by an executed cell)
    "index.html": ("jaxlora",),
    "guides/getting_started.html": ("Getting started", "LoRA parameters:"),
    "api/jaxlora.html": ("LoraConfig", "Parameters", "Example"),
    "guides/performance.html": ("Targets", "<table"),
}


class _Links(html.parser.HTMLParser):
    """The ids of a page and the internal links (href/src) it holds."""

    def __init__(self):
        super().__init__()
        self.ids, self.links = set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        for key in ("href", "src"):
            value = attrs.get(key)
            if value and not urllib.parse.urlsplit(value).scheme and not value.startswith(("//", "mailto:", "data:")):
                self.links.append(value)


def required_pages(html_dir: Path) -> list[Path]:
    guides = sorted((ROOT / "docs" / "guides").glob("*.md"))
    pages = ["index.html", "api/index.html", "api/jaxlora.html", "development.html", "genindex.html"]
    pages += [f"guides/{g.stem}.html" for g in guides]
    return [html_dir / p for p in pages]


def broken_links(html_dir: Path) -> list[str]:
    """'page: link' for every internal link whose file or #fragment does not exist."""
    parsed: dict[Path, _Links] = {}

    def parse(path: Path) -> _Links:
        if path not in parsed:
            parser = _Links()
            parser.feed(path.read_text(errors="replace"))
            parsed[path] = parser
        return parsed[path]

    problems = []
    for page in sorted(html_dir.rglob("*.html")):
        if {"_modules", "_sources", "_static"} & set(page.relative_to(html_dir).parts):  # theme templates, sources
            continue
        for link in parse(page).links:
            split = urllib.parse.urlsplit(link)
            target = page if not split.path else (page.parent / urllib.parse.unquote(split.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                problems.append(f"broken link in {page.relative_to(html_dir)}: {link} (no {target})")
            elif split.fragment and target.suffix == ".html" and split.fragment not in parse(target).ids:
                problems.append(f"broken anchor in {page.relative_to(html_dir)}: {link}")
    return problems


def chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "headless_shell"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise SystemExit("error: no Chromium found; install it (apt-get install chromium) or set $CHROMIUM")


def serve(html_dir: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(html_dir)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def browse(browser: str, url: str, screenshot: Path, profile: str) -> str:
    """The page's DOM after its scripts ran; writes its screenshot."""
    common = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1280,1600"]  # fmt: skip
    subprocess.run([*common, f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=120)
    done = subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120)
    return done.stdout


def blank(png: Path) -> bool:
    """True when the screenshot is one flat colour (nothing rendered)."""
    from PIL import Image

    with Image.open(png) as image:
        extrema = image.convert("L").getextrema()
    return extrema[1] - extrema[0] < 30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--html", type=Path, default=ROOT / "docs" / "_build" / "html")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "_build" / "screenshots")
    args = parser.parse_args(argv)
    problems = [f"missing page: {p.relative_to(args.html)}" for p in required_pages(args.html) if not p.is_file()]
    problems += broken_links(args.html)
    args.out.mkdir(parents=True, exist_ok=True)
    browser = chromium()
    server, base = serve(args.html)
    with tempfile.TemporaryDirectory() as profile:
        try:
            for page, texts in SCREENSHOTS.items():
                shot = args.out / (page.replace("/", "_").removesuffix(".html") + ".png")
                dom = browse(browser, base + page, shot, profile)
                missing = [text for text in (*texts, "<article") if text not in dom]
                if missing:
                    problems.append(f"{page} did not render: {missing} not in the DOM")
                if "Traceback (most recent call last)" in dom or 'class="math' in dom:  # math needs MathJax online
                    problems.append(f"{page} shows a traceback or unrendered math")
                if not shot.is_file() or blank(shot):
                    problems.append(f"{page}: the screenshot {shot} is missing or blank")
                else:
                    print(f"check_docs_site: {page} rendered; screenshot {shot}")
        finally:
            server.shutdown()
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        pages = sum(1 for _ in args.html.rglob("*.html"))
        print(f"check_docs_site: {pages} pages, every required page present, no broken internal link")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
