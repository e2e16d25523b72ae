"""Maths rendered to MathML at build time, so pages need no JavaScript and no network.

Sphinx's default (MathJax) loads its script from a CDN: offline, or where the CDN is blocked,
readers see raw ``\\(h = x W_0\\)``. Docutils ships a LaTeX-to-MathML converter, and browsers render
MathML Core natively (Chromium since 109, Firefox, Safari), so this renderer converts each
formula once, while the site is built. A formula it cannot convert is a build warning (an error
under ``-W``) rather than raw markup on the page.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from docutils.utils.math import latex2mathml
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)


def _convert(self: Any, node: nodes.Element, latex: str, *, block: bool) -> str:
    try:
        return latex2mathml.tex2mathml(latex, as_block=block)
    except Exception as error:  # docutils raises SyntaxError and others for unsupported TeX
        logger.warning("cannot render math %r as MathML: %s", latex, error, location=node)
        return f"<code>{self.encode(latex)}</code>"


def visit_math(self: Any, node: nodes.Element) -> None:
    self.body.append(
        f'<span class="math notranslate">{_convert(self, node, node.astext(), block=False)}</span>'
    )
    raise nodes.SkipNode


def visit_displaymath(self: Any, node: nodes.Element) -> None:
    latex = node.astext()
    parts = [p for p in latex.split("\n\n") if p.strip()] if not node.get("nowrap") else [latex]
    self.body.append(self.starttag(node, "div", CLASS="math notranslate"))
    for part in parts:
        self.body.append(_convert(self, node, part, block=True))
    self.body.append("</div>\n")
    raise nodes.SkipNode


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_html_math_renderer(
        "mathml", inline_renderers=(visit_math, None), block_renderers=(visit_displaymath, None)
    )
    return {"parallel_read_safe": True, "parallel_write_safe": True}
