"""The API reference's pages, written from each public module's ``__all__``.

``jlora-api MODULE`` renders the module's docstring, a summary table of every name in its
``__all__`` and the full entry of each (autodoc: signature, docstring, example), in ``__all__``'s
order. A name added to ``__all__`` appears without touching the docs; ``tests/test_docs.py``
checks the built inventory holds every public name.

Annotations name classes by where they are defined (``jlora._config.LoraConfig``), and
docstrings often name them unqualified (``LoraFactors``); :func:`resolve_public` points both at the
public entry (``jlora.LoraConfig``) so they link instead of failing the nitpicky build.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, TypeVar

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

# The public modules, in the order of the reference's table of contents. jlora.serving is
# documented when it exists (it is newer than the rest).
MODULES = (
    "jlora",
    "jlora.ops",
    "jlora.linen",
    "jlora.nnx",
    "jlora.lowrank",
    "jlora.optim",
    "jlora.checkpoint",
    "jlora.peft",
    "jlora.sharding",
    "jlora.analysis",
    "jlora.quant",
    "jlora.serving",
    "jlora.variants",
)


def public_modules() -> list[str]:
    """The modules of :data:`MODULES` that import (``jlora.serving`` may not exist yet)."""
    found = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        found.append(name)
    return found


def _kind(obj: Any) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "function"
    return "data"


class JloraApi(SphinxDirective):
    """``.. jlora-api:: jlora.ops``: the module's docstring, a summary table and every entry."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        modname = self.arguments[0]
        module = importlib.import_module(modname)
        names = list(module.__all__)
        lines = [f".. automodule:: {modname}", "   :no-members:", ""]
        lines += [".. rubric:: Contents", "", ".. autosummary::", "   :nosignatures:", ""]
        lines += [f"   {name}" for name in names]
        lines.append("")
        for name in names:
            obj = getattr(module, name)
            kind = _kind(obj)
            full = f"{modname}.{name}"
            if kind == "module":
                continue  # its own page; the table above links to it
            if kind in ("class", "exception"):
                lines += [f".. auto{kind}:: {full}", "   :members:"]
                # Methods a jlora class inherits from a jlora base (AdapterBank.build lives in a
                # mixin) are its own API; those of flax, jax or builtin bases are not.
                if any(c.__module__.startswith("jlora") for c in obj.__mro__[1:]):
                    foreign = sorted(
                        {c.__name__ for c in obj.__mro__ if not c.__module__.startswith("jlora")}
                    )
                    lines += [f"   :inherited-members: {', '.join(foreign)}"]
                lines.append("")
            elif kind == "function":
                lines += [f".. autofunction:: {full}", ""]
            else:
                lines += [f".. autodata:: {full}", ""]
                if not isinstance(obj, str | int | float | tuple | type(None)):
                    lines += ["   :no-value:", ""]
        return self.parse_text_to_nodes("\n".join(lines))


def public_names() -> dict[str, str]:
    """``{defining_module.qualname or short name: public full name}`` over every module's
    ``__all__``; the first module that exports an object wins (``jlora`` before submodules)."""
    names: dict[str, str] = {}
    for modname in public_modules():
        module = importlib.import_module(modname)
        for name in module.__all__:
            obj = getattr(module, name)
            full = f"{modname}.{name}"
            names.setdefault(full, full)
            names.setdefault(name, full)
            where = getattr(obj, "__module__", None)
            qualname = getattr(obj, "__qualname__", None)
            if isinstance(where, str) and isinstance(qualname, str) and where.startswith("jlora"):
                names.setdefault(f"{where}.{qualname}", full)
    return names


def _lookup(target: str) -> tuple[bool, Any]:
    """``(found, object)`` for a dotted name ``jlora.x.y``: the longest importable module, then
    attributes."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for part in parts[cut:]:
                obj = getattr(obj, part)
        except AttributeError:
            return False, None
        return True, obj
    return False, None


def resolve_public(app: Sphinx, env: Any, node: Any, contnode: nodes.Element) -> Any:
    """``missing-reference``: retry a jlora reference under the name it is public as.

    A reference to something that exists but is private (``jlora._match``, a ``TypeVar`` in a
    signature) becomes plain text; a jlora name that does not exist at all stays a warning, which
    fails the build.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    table = env.app.config._jlora_public  # built once per build
    public = table.get(target)
    if public is None and "." in target:
        # a method or attribute of a class named by its private path: jlora._config.LoraConfig.x
        head, _, tail = target.rpartition(".")
        if head in table:
            public = f"{table[head]}.{tail}"
    if public is None or public == target:
        found, obj = _lookup(target)
        private = any(part.startswith("_") for part in target.split("."))
        if target.startswith("jlora.") and found and (private or isinstance(obj, TypeVar)):
            return contnode
        return None
    domain = env.get_domain("py")
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], public, node, contnode
    )


# Maths in module and function docstrings is written as an indented block after a sentence
# (``... computes\n\n    h = x W0 + scale * (x a) b``), which reads well in source and under
# help(). reStructuredText would read such a block as a quotation and its ``*`` as emphasis, so
# each one becomes a literal block: the preceding paragraph gets the ``::`` marker.
_NOT_PROSE = ("..", ":", "* ", "- ", ">>>", "|")


def literal_maths(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]):
    """``autodoc-process-docstring`` (after napoleon): indented blocks after prose -> literal."""

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() or i == 0:
            i += 1
            continue
        prev = next((j for j in range(i - 1, -1, -1) if lines[j].strip()), None)
        nxt = next((j for j in range(i + 1, len(lines)) if lines[j].strip()), None)
        if prev is None or nxt is None:
            i += 1
            continue
        text = lines[prev].rstrip()
        # the first line of the paragraph that ends at `prev`
        first = prev
        while first > 0 and lines[first - 1].strip() and indent(lines[first - 1]) == indent(text):
            first -= 1
        block_indent = indent(lines[nxt])
        if (
            block_indent > indent(text)
            and indent(text) == 0
            and not text.endswith("::")
            and not lines[first].lstrip().startswith(_NOT_PROSE)
            and not lines[nxt].lstrip().startswith((">>>", ".. ", ":"))
            and not lines[first].lstrip()[:1].isdigit()
        ):
            # "computes:" -> "computes::" (shown "computes:"); "gives" -> "gives ::" (no colon)
            lines[prev] = text + (":" if text.endswith(":") else " ::")
        i += 1


def constant_docs(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]):
    """``autodoc-process-docstring``: a module constant (``RANK_AXIS = "lora_rank"``) has no
    docstring of its own, and autodoc would show its type's (``str``'s). Use the comment that
    documents it in the source instead: on its line, or the ``#`` lines right above it."""
    if what not in ("data", "attribute") or not inspect.getdoc(type(obj)):
        return
    if "\n".join(lines).strip() != (inspect.getdoc(type(obj)) or "").strip():
        return
    lines[:] = _source_comment(name.rpartition(".")[2])


def _source_comment(name: str) -> list[str]:
    import pathlib
    import re

    package = pathlib.Path(importlib.import_module("jlora").__file__).parent
    pattern = re.compile(rf"^{re.escape(name)}\b[^=(]*=(?!=)")
    for path in sorted(package.rglob("*.py")):
        source = path.read_text().splitlines()
        for i, line in enumerate(source):
            if not pattern.match(line):
                continue
            if "  # " in line:
                return [line.split("  # ", 1)[1].strip()]
            above = []
            j = i - 1
            while j >= 0 and source[j].startswith("#"):
                above.insert(0, source[j].lstrip("#:").strip())
                j -= 1
            return [" ".join(above)] if above else []
    return []


def skip_dataclass_fields(app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any):
    """``autodoc-skip-member``: a dataclass's (NamedTuple's, Flax module's) fields are documented by its
    docstring's Attributes section, not again as members (autodoc would pick up a field whose
    default has a docstring, ``param_dtype = jnp.float32``, and document it a second time)."""
    if what != "class" or name not in app.config._jlora_fields:
        return None
    if isinstance(obj, property):
        return None
    own = inspect.isroutine(obj) and getattr(obj, "__module__", "").startswith("jlora")
    return None if own else True


def _build_table(app: Sphinx) -> None:
    app.config._jlora_public = public_names()
    fields: set[str] = set()
    for modname in public_modules():
        module = importlib.import_module(modname)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj):
                fields.update(getattr(obj, "__dataclass_fields__", {}))
                if issubclass(obj, tuple):  # a NamedTuple's fields, as a dataclass's
                    fields.update(getattr(obj, "_fields", ()))
    app.config._jlora_fields = fields


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("jlora-api", JloraApi)
    app.connect("builder-inited", _build_table)
    app.connect("missing-reference", resolve_public)
    app.connect("autodoc-process-docstring", literal_maths, priority=600)
    app.connect("autodoc-skip-member", skip_dataclass_fields)
    app.connect("autodoc-process-docstring", constant_docs, priority=400)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
