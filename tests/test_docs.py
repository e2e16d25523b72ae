"""The documentation site (``docs/``, built by ``bash scripts/docs.sh``).

Fast: the sources agree with the code (an API page per public module, every tutorial in the
table of contents and linked from the README, tutorials are MyST markdown notebooks).
Slow (``-m slow``): the site builds from the sources with warnings as errors and every tutorial
executed, its reference holds every public name, no page shows raw markup, and headless Chromium
renders the index, a tutorial with its figure and an API page (``scripts/docs-screenshots.sh``).
"""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import subprocess
import time
import zlib

import numpy as np
import pytest

import jlora

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
README = (ROOT / "README.md").read_text()


def public_modules() -> list[str]:
    """``jlora`` and every public submodule: those ``import jlora`` loads lazily, ``jlora.ops``,
    and ``jlora.serving``."""
    names = ["jlora", "jlora.ops", *(f"jlora.{m}" for m in jlora._SUBMODULES), "jlora.serving"]
    found = []
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        found.append(name)
    return found


def _toctree_entries(page: pathlib.Path) -> list[str]:
    entries = []
    for block in re.findall(r"```\{toctree\}\n(.*?)```", page.read_text(), flags=re.S):
        entries += [line.strip() for line in block.splitlines() if line.strip()]
    return [e for e in entries if not e.startswith(":")]


def test_every_public_module_has_an_api_page():
    listed = _toctree_entries(DOCS / "api" / "index.md")
    extension = (DOCS / "_ext" / "jlora_api.py").read_text()
    for module in public_modules():
        short = module.rpartition(".")[2]
        page = DOCS / "api" / f"{short}.rst"
        assert page.is_file(), f"{module} has no API page; add {page.relative_to(ROOT)}"
        assert f".. jlora-api:: {module}\n" in page.read_text()
        assert short in listed, f"docs/api/index.md's toctree misses {short}"
        assert f'"{module}"' in extension, f"docs/_ext/jlora_api.py MODULES misses {module}"


def test_every_tutorial_is_in_the_index_and_the_readme():
    assert len(TUTORIALS) >= 5
    entries = _toctree_entries(DOCS / "index.md")
    for page in ("design", "scaling", "experiments"):
        assert page in entries
    for tutorial in TUTORIALS:
        assert f"tutorials/{tutorial.stem}" in entries, f"docs/index.md misses {tutorial.name}"
        assert f"docs/tutorials/{tutorial.name}" in README, f"README.md misses {tutorial.name}"
    assert "bash scripts/docs.sh" in README


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda p: p.stem)
def test_tutorials_are_myst_markdown_notebooks(tutorial):
    text = tutorial.read_text()
    header = text.split("---\n")[1]
    assert "format_name: myst" in header and "kernelspec:" in header and "name: python3" in header
    assert text.count("```{code-cell} ipython3") >= 3
    assert re.search(r"^# \S", text, flags=re.M), "a tutorial needs a title"


# -- the built site (slow) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    """The site built from the sources by ``scripts/docs.sh`` (creating ``.venv-docs`` if need
    be), into a fresh directory, with warnings as errors and every tutorial executed.
    ``JLORA_DOCS_SITE=docs/_build/html`` checks a site already built instead."""
    if os.environ.get("JLORA_DOCS_SITE"):
        return pathlib.Path(os.environ["JLORA_DOCS_SITE"]).resolve()
    out = tmp_path_factory.mktemp("docs") / "html"
    # The notebooks' kernels inherit the environment: none of this suite's JAX settings (its
    # 8 fake devices, strict promotion); the sharded tutorial sets its own devices.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["JLORA_DOCS_OUT"] = str(out)
    start = time.perf_counter()
    result = subprocess.run(
        ["bash", "scripts/docs.sh", "-E"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    print(f"docs built in {time.perf_counter() - start:.0f} s")
    return out


def _inventory(site: pathlib.Path) -> set[str]:
    """The Python object names in the site's ``objects.inv``."""
    data = (site / "objects.inv").read_bytes()
    body = zlib.decompress(data.split(b"\n", 4)[4]).decode()
    names = set()
    for line in body.splitlines():
        match = re.match(r"(\S+) py:\w+ ", line)
        if match:
            names.add(match.group(1))
    return names


def _prose(html: str) -> str:
    """The text of a page outside code: what must not show markup."""
    html = re.sub(r"<(script|style|pre|code)\b.*?</\1>", "", html, flags=re.S)
    return re.sub(r"<[^>]+>", " ", html)


@pytest.mark.slow
def test_reference_covers_every_public_name(site):
    documented = _inventory(site)
    missing = [
        f"{module}.{name}"
        for module in public_modules()
        for name in importlib.import_module(module).__all__
        if f"{module}.{name}" not in documented
    ]
    assert not missing, f"the API reference misses {missing}"


@pytest.mark.slow
def test_every_tutorial_executed_with_its_outputs_and_figures(site):
    for tutorial in TUTORIALS:
        html = (site / "tutorials" / f"{tutorial.stem}.html").read_text()
        cells = html.count('class="cell docutils container"')
        outputs = html.count('class="cell_output docutils container"')
        assert cells == tutorial.read_text().count("```{code-cell}"), tutorial.name
        assert outputs >= cells // 2, f"{tutorial.name}: {outputs} outputs for {cells} cells"
        assert "Traceback" not in html and 'class="output stderr"' not in html, tutorial.name
        for src in re.findall(r'<img[^>]+src="([^"]+)"', html):
            assert (site / "tutorials" / src).resolve().is_file(), f"{tutorial.name}: {src}"
    for tutorial, figures in (("functional", 1), ("diagnostics", 2)):
        html = (site / "tutorials" / f"{tutorial}.html").read_text()
        assert len(re.findall(r'<img[^>]+src="\.\./_images/', html)) >= figures, tutorial


@pytest.mark.slow
def test_no_page_shows_raw_markup(site):
    raw = ["{code-cell}", "```", ":func:`", ":class:`", "{doc}`", "\\(", "\\[", "$$"]
    pages = [p for p in site.rglob("*.html") if "_static" not in p.parts]
    assert len(pages) >= 20
    for page in pages:
        text = _prose(page.read_text())
        found = [r for r in raw if r in text]
        assert not found, f"{page.relative_to(site)} shows {found}"
    assert "<math" in (site / "tutorials" / "diagnostics.html").read_text()


@pytest.mark.slow
def test_pages_render_in_a_browser(site, tmp_path):
    from PIL import Image

    result = subprocess.run(
        ["bash", "scripts/docs-screenshots.sh", str(site), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if result.returncode == 3:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr
    shots = {p.stem: Image.open(p).convert("RGB") for p in tmp_path.glob("*.png")}
    assert set(shots) == {"index", "tutorials_diagnostics", "api_analysis"}

    def figure_rows(image) -> int:
        """How many pixel rows are a fifth or more strongly coloured: a figure's height (text,
        code and links colour a few pixels per row, never a fifth of the page's width)."""
        hsv = np.asarray(image.convert("HSV"))
        coloured = (hsv[..., 1] > 120) & (hsv[..., 2] > 90)
        return int(np.sum(coloured.mean(axis=1) > 0.2))

    def dark(image) -> float:
        """The fraction of dark pixels (text)."""
        return float(np.mean(np.asarray(image.convert("L")) < 100))

    for name, image in shots.items():
        assert image.width == 1280 and dark(image) > 0.005, f"{name} looks blank"
    # The diagnostics tutorial shows its heatmaps (viridis, about 150 px tall in the screenshot);
    # the API page and the index are text and code.
    assert figure_rows(shots["tutorials_diagnostics"]) >= 100
    assert figure_rows(shots["api_analysis"]) < 30
    assert figure_rows(shots["index"]) < 30
