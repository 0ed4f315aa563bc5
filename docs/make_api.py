"""Write the API reference ``docs/api.md`` from the docstrings of esdmri.

Standard library only (``importlib``, ``inspect``, ``pkgutil``): every public
class and function of the public modules is listed with its signature and
its numpydoc docstring, rendered as Markdown.

Usage, from the repository root::

    python docs/make_api.py          # (re)write docs/api.md
    python docs/make_api.py --check  # exit 1 if docs/api.md is out of date
"""

import argparse
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "api.md"

# Public modules in reading order; a package also brings its submodules.
MODULES = (
    "esdmri", "esdmri.sphere", "esdmri.shm", "esdmri.response", "esdmri.sims",
    "esdmri.peaks", "esdmri.metrics", "esdmri.viz", "esdmri.reconst", "esdmri.train", "esdmri.nn",
    "esdmri.segmentation", "esdmri.workflows",
    "esdmri.data_fetchers",
)

# numpydoc sections whose entries are "name : type" lines with indented text.
ENTRY_SECTIONS = ("Parameters", "Other Parameters", "Returns", "Yields", "Receives",
                  "Raises", "Warns", "Attributes", "See Also")

_SECTION_RULE = re.compile(r"^-{3,}\s*$")
_RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_RST_TABLE_RULE = re.compile(r"^=+( +=+)+\s*$")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

# Public objects without a docstring of their own, reported by main().
UNDOCUMENTED = []


def module_names():
    """MODULES with the submodules of each package, in order, without repeats."""
    names = []
    for name in MODULES:
        module = importlib.import_module(name)
        names.append(name)
        # The root package's submodules are listed in MODULES themselves.
        if hasattr(module, "__path__") and name != MODULES[0]:
            names += sorted(info.name for info in pkgutil.walk_packages(
                module.__path__, prefix=name + ".") if not _is_private(info.name))
    return list(dict.fromkeys(names))


def _is_private(dotted_name):
    return any(part.startswith("_") for part in dotted_name.split("."))


def public_members(module):
    """(name, object, home) of a module's public classes and functions.

    ``__all__`` when the module defines it (``home`` is the module that
    defines the object, for re-exports), else the classes and functions
    defined in the module itself whose names do not start with ``_``.
    """
    if hasattr(module, "__all__"):
        members = [(name, getattr(module, name)) for name in module.__all__]
    else:
        members = [(name, value) for name, value in vars(module).items()
                   if not name.startswith("_") and (inspect.isclass(value)
                                                    or inspect.isfunction(value))
                   and value.__module__ == module.__name__]
    return [(name, value, getattr(value, "__module__", module.__name__))
            for name, value in members if callable(value)]


def signature(obj, name, bound=False):
    """``name(arguments)``, with object addresses removed so the output is stable.

    ``bound`` drops the first parameter (``self`` or ``cls``) of a method.
    """
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name + "(...)"
    if bound:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return name + _ADDRESS.sub("", str(sig))


# RST emphasis (**bold**, *italic*) that Markdown reads the same way.
_EMPHASIS = re.compile(r"(\*\*[^*\s](?:[^*\n]*[^*\s])?\*\*"
                       r"|(?<![\w*\\])\*[^*\s](?:[^*\n]*[^*\s])?\*(?![\w*]))")


def _escape(text):
    """Markdown-escape prose outside code spans and emphasis.

    Backslashes, stray ``*`` and ``_``, and ``<``/``>`` (HTML) are escaped; a
    ``* `` at the start of a line stays a list marker, a ``#`` there is
    escaped so it does not start a heading.
    """
    out = []
    for i, part in enumerate(re.split(r"(`[^`]*`)", text)):
        if i % 2:
            out.append(part)
            continue
        for j, piece in enumerate(_EMPHASIS.split(part)):
            if not j % 2:
                piece = (piece.replace("\\", "\\\\").replace("*", r"\*").replace("_", r"\_")
                         .replace("<", "&lt;").replace(">", "&gt;"))
            out.append(piece)
    text = re.sub(r"(?m)^(\s*)\\\* ", r"\1* ", "".join(out))
    return re.sub(r"(?m)^(\s*)#", r"\1\\#", text)


def _prose(text):
    """RST inline markup to Markdown: roles and ``literals`` become code spans."""
    text = _RST_ROLE.sub(r"`\1`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    return _escape(text)


def _prose_block(lines):
    """Paragraphs as Markdown; indented blocks and RST tables stay verbatim.

    An indented block runs until the next non-blank line without indent, a
    table (starting with a ``=== ===`` rule) until the next blank line. Prose
    is converted a paragraph at a time, so inline markup may span lines.
    """
    out, paragraph, block = [], [], None  # block: None, "indent" or "table"

    def flush():
        if paragraph:
            out.extend(_prose("\n".join(paragraph)).split("\n"))
            paragraph.clear()

    for line in lines:
        blank = not line.strip()
        if (block == "indent" and not blank and not line.startswith(" ")) or (
                block == "table" and blank):
            _close_fence(out)
            block = None
        if block is None and not blank:
            if line.startswith("    "):
                block = "indent"
            elif _RST_TABLE_RULE.match(line):
                block = "table"
            if block is not None:
                flush()
                out += ["", "```text"]
        if block is not None:
            out.append(line[4:] if block == "indent" else line)
        elif blank:
            flush()
            out.append("")
        else:
            # RST's "text::" announces a literal block; Markdown needs no marker.
            paragraph.append(line[:-1] if line.endswith("::") else line)
    flush()
    if block is not None:
        _close_fence(out)
    return out


def _close_fence(out):
    """End a fenced block, dropping its trailing blank lines."""
    while out and not out[-1].strip():
        out.pop()
    out += ["```", ""]


def _entries(lines):
    """numpydoc "name : type" entries and their indented text as a bullet list."""
    entries = []  # [name, type, description lines]
    for line in lines:
        if not line.strip():
            continue
        if not line.startswith(" "):
            name, _, kind = line.partition(" : ")
            entries.append([name.strip(), kind.strip(), []])
        elif entries:
            entries[-1][2].append(line.strip())
    out = []
    for name, kind, description in entries:
        entry = f"- `{name}`" + (f" : *{_prose(kind)}*" if kind else "")
        if description:
            entry += " &mdash; " + _prose(" ".join(description))
        out.append(entry)
    return out


def _docstring(obj, label):
    """The object's own docstring, cleaned; None (and noted) when it has none.

    ``inspect.getdoc`` would fall back to a base class's docstring, which
    describes the base rather than the object.
    """
    doc = getattr(obj, "__doc__", None)
    if not doc:
        UNDOCUMENTED.append(label)
        return None
    return inspect.cleandoc(doc)


def render_docstring(doc):
    """Markdown lines of a numpydoc docstring."""
    if not doc:
        return []
    lines = doc.expandtabs().splitlines()
    sections, title, body = [], None, []
    i = 0
    while i < len(lines):
        if i + 1 < len(lines) and _SECTION_RULE.match(lines[i + 1]) and lines[i].strip():
            sections.append((title, body))
            title, body = lines[i].strip(), []
            i += 2
            continue
        body.append(lines[i])
        i += 1
    sections.append((title, body))
    out = []
    for title, body in sections:
        while body and not body[-1].strip():
            body.pop()
        if title is None:
            out += _prose_block(body)
            continue
        out += ["", f"**{title}**", ""]
        out += _entries(body) if title in ENTRY_SECTIONS else _prose_block(body)
    return out


def _own_methods(cls):
    """Public methods and properties a class defines and documents.

    Members of private esdmri base classes (``_DeconvolutionModel``) count
    as the class's own. Overrides of another base-class method without a
    docstring of their own (``forward``, ``get_short_name``, ...) are left out.
    """
    sources = [cls] + [base for base in cls.__mro__[1:] if base.__name__.startswith("_")
                       and base.__module__.startswith(MODULES[0])]
    others = [base for base in cls.__mro__ if base not in sources]
    members, seen = [], set()
    for source in sources:
        for name, value in vars(source).items():
            if name.startswith("_") or name in seen:
                continue
            seen.add(name)
            if isinstance(value, (classmethod, staticmethod)):
                function = value.__func__
            elif isinstance(value, property):
                function = value.fget
            elif callable(value):
                function = value
            else:
                continue
            inherited = any(name in vars(base) for base in others)
            if inherited and not function.__doc__:
                continue
            members.append((name, value, function))
    return members


def render_class(name, cls, anchor):
    """Markdown of a class: constructor signature, docstring, documented members."""
    out = [f'<a id="{anchor}"></a>', "", f"### class `{name}`", "",
           "```python", signature(cls, name), "```", ""]
    command = getattr(cls, "get_short_name", None)
    workflow = command is not None and "get_short_name" in vars(cls)
    if workflow:
        # A DIPY workflow: its run() docstring is the command's help.
        out += [f"Command line: `{command()}`; `{command()} --help` lists the options "
                "documented under `run` below.", ""]
    if cls.__doc__ or not workflow:
        out += render_docstring(_docstring(cls, anchor))
    for method_name, value, function in _own_methods(cls):
        out += ["", f"#### `{name}.{method_name}`", ""]
        if isinstance(value, property):
            out += ["*property*", ""]
        else:
            static = isinstance(value, staticmethod)
            prefix = "classmethod " if isinstance(value, classmethod) else (
                "staticmethod " if static else "")
            out += ["```python", prefix + signature(function, method_name, bound=not static),
                    "```", ""]
        out += render_docstring(_docstring(function, f"{anchor}.{method_name}"))
    return out + [""]


def render_function(name, function, anchor):
    """Markdown of a function: signature and docstring."""
    out = [f'<a id="{anchor}"></a>', "", f"### `{name}`", "",
           "```python", signature(function, name), "```", ""]
    return out + render_docstring(_docstring(function, anchor)) + [""]


def _anchor(module_name):
    """HTML id of a module's section (dots would clash with object ids)."""
    return module_name.replace(".", "-")


def render_module(module_name, documented):
    """Markdown of one module; objects already documented elsewhere are linked."""
    module = importlib.import_module(module_name)
    out = [f'<a id="{_anchor(module_name)}"></a>', "", f"## `{module_name}`", ""]
    doc = inspect.getdoc(module)
    if doc:
        out += _prose_block(doc.splitlines()) + [""]
    reexports, own = [], []
    for name, value, home in public_members(module):
        key = f"{home}.{getattr(value, '__qualname__', name)}"
        (reexports if home != module_name else own).append((name, value, key))
    if reexports:
        out += ["Public names (documented in their own modules):", ""]
        out += [f"- [`{name}`](#{key})" for name, _, key in reexports]
        out += [""]
    for name, value, key in own:
        if key in documented:
            continue
        documented.add(key)
        render = render_class if inspect.isclass(value) else render_function
        out += render(name, value, key)
    return out


def build():
    """The whole of docs/api.md as a string."""
    names = module_names()
    out = ["# API reference", "",
           "Generated by `python docs/make_api.py` from the docstrings (do not edit by "
           "hand; rerun the script after changing the code). Arrays follow DIPY's "
           "conventions: shapes are given in the docstrings, SH coefficients are in "
           "DIPY's non-legacy `descoteaux07` basis unless a docstring says otherwise, "
           "and network tensors are `[batch, channels, vertices, X, Y, Z]`.", "",
           "## Modules", ""]
    out += [f"- [`{name}`](#{_anchor(name)})" for name in names]
    out += [""]
    documented = set()
    for name in names:
        out += render_module(name, documented)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 if docs/api.md is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="file to write")
    args = parser.parse_args(argv)
    text = build()
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current != text:
            sys.exit(f"{args.output} is out of date: run python docs/make_api.py")
        print(f"{args.output} is up to date")
        return
    args.output.write_text(text)
    print(f"wrote {args.output} ({text.count(chr(10))} lines)", flush=True)
    if UNDOCUMENTED:
        print(f"{len(UNDOCUMENTED)} public objects have no docstring:", ", ".join(UNDOCUMENTED),
              file=sys.stderr)


if __name__ == "__main__":
    main()
