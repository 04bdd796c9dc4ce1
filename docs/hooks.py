"""MkDocs hook: a file included whole from outside ``docs/`` keeps links that work where it lives.

``docs/paper-claims.md`` is ``--8<-- "benchmarks/RESULTS.md"``. That file links its figures as
``../docs/figures/...``, right on GitHub beside it, but from ``docs/`` they are ``figures/...``; the snippet
extension inserts the text only after MkDocs has read the page's links, so the hook inserts it first, mended.
"""

from pathlib import Path

OUTSIDE = ("benchmarks/RESULTS.md",)  # files included whole by a page; their links to docs/ start "../docs/"


def on_page_markdown(markdown: str, config, **_) -> str:
    root = Path(config.config_file_path).parent
    for name in OUTSIDE:
        line = f'--8<-- "{name}"'
        if line in markdown:
            text = (root / name).read_text(encoding="utf-8").replace("](../docs/", "](")
            markdown = markdown.replace(line, text)
    return markdown
