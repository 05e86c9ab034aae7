"""Sphinx configuration of jaxlora's documentation: MyST markdown, guides executed by myst-nb, autodoc API pages.

Built by `bash scripts/docs.sh` (warnings are errors). The API pages under docs/api/ are generated here, at every
build, from each public module's `__all__`, so that every public name has an entry and none can go stale.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

project = "jaxlora"
author = "the jaxlora authors"
copyright = "the jaxlora authors"
release = importlib.import_module("jaxlora").__version__

extensions = [
    "myst_nb",  # MyST markdown and executed code cells
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # the Google-style Args:/Returns: docstrings
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "**/.ipynb_checkpoints", "README.md"]
myst_enable_extensions = ["colon_fence"]  # no math: formulas are written as code, which renders offline
myst_heading_anchors = 3

# Every code cell runs at every build, top to bottom in a fresh kernel per page; an error fails the build.
nb_execution_mode = os.environ.get("JAXLORA_DOCS_EXECUTE", "force")  # "off" only to iterate on prose locally
nb_execution_raise_on_error = True
nb_execution_timeout = 300
nb_execution_show_tb = True
nb_merge_streams = True
nb_render_markdown_format = "myst"  # a cell's Markdown output (the tables read from results files) with tables

autosummary_generate = False
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # dataclass fields: one entry each, not a second description beside autodoc's
add_module_names = False
suppress_warnings = ["myst.header"]

html_theme = "sphinx_book_theme"
html_title = f"jaxlora {release}"
html_static_path = []
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}

# The public modules and what their API page says about them (the generated pages are gitignored).
API_MODULES = {
    "jaxlora": "The public face: configure, plan, initialise, apply, merge, train, shard, serve several adapters.",
    "jaxlora.checkpoint": "Orbax adapter checkpoints and resumable training checkpoints.",
    "jaxlora.peft_format": "Hugging Face PEFT's LoRA files, both ways.",
    "jaxlora.quantization": "A quantized frozen base (QLoRA's NF4, int8) with qwix.",
    "jaxlora.analysis": "The LoRA paper's analysis tools (section 7).",
    "jaxlora.layers": "Layer kinds: serving a layer of your own factored.",
    "jaxlora.name_maps": "Parameter paths <-> torch module names and weight layouts.",
    "jaxlora.loraplus": "LoRA+: a larger learning rate for B.",
    "jaxlora.models.gpt2": "GPT-2 in flax.linen with Hugging Face loading and KV-cache generation.",
    "jaxlora.models.llama": "Llama / Qwen2 in flax NNX, scanned or unrolled, with Hugging Face loading.",
    "jaxlora.models.decoding": "The decoding loop under both model families' generate: a prefill, then compiled steps.",
    "jaxlora.models.kv_cache": "The KV cache both model families decode with: one length per row, rows refilled alone.",
    "jaxlora.models.continuous_batching": "Continuous batching: requests over time, each on its adapter.",
    "jaxlora.models.rematerialization": "Rematerialised decoder blocks: the checkpoint policies the models take.",
}


def public_names(module_name: str) -> list[str]:
    """The names a module exports (its `__all__`), which its API page must cover."""
    module = importlib.import_module(module_name)
    return list(getattr(module, "__all__", ()))


def write_api_pages(app=None) -> None:
    """docs/api/<module>.md for every public module: a summary table and the docstring of every public name."""
    api = DOCS / "api"
    api.mkdir(exist_ok=True)
    index = ["# API reference", "", "Generated from the docstrings of every public name.", ""]
    index += ["```{toctree}", ":maxdepth: 1", "", *API_MODULES, "```", ""]
    _write(api / "index.md", "\n".join(index))
    for module_name, blurb in API_MODULES.items():
        module = importlib.import_module(module_name)
        names = public_names(module_name)
        lines = [f"# `{module_name}`", "", blurb, "", "```{eval-rst}", f".. currentmodule:: {module_name}", ""]
        summarised = [
            n for n in names if callable(getattr(module, n)) and not isinstance(getattr(module, n), type(module))
        ]
        lines += [".. autosummary::", ""] + [f"   {name}" for name in summarised] + [""]  # constants: below
        for name in names:
            value = getattr(module, name)
            if isinstance(value, type(module)):
                lines += [f"``{module_name}.{name}`` is a public module: see its own page.", ""]
            elif isinstance(value, type):
                lines += [f".. autoclass:: {name}", "   :members:", ""]
            elif callable(value):
                lines += [f".. autofunction:: {name}", ""]
            else:  # a constant: its value (autodata would show the docstring of its type, e.g. dict's)
                shown = repr(value) if len(repr(value)) <= 100 else repr(value)[:97] + "..."
                lines += [f".. py:data:: {name}", f"   :value: {shown}", ""]
        lines += ["```", ""]
        _write(api / f"{module_name}.md", "\n".join(lines))


def _write(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:  # unchanged pages keep their time stamp: no rebuild
        path.write_text(text)


_LITERAL = re.compile(r"(``[^`]+?``|`[^`]+`)")


def _escape(text: str) -> str:
    """Backslashes, `*`, `|` and stray backticks as plain characters (napoleon's own `\\*args` stays as it is)."""
    text = re.sub(r"\\(?!\*)", r"\\\\", text)
    text = re.sub(r"(?<!\\)\*", r"\\*", text)
    return text.replace("|", "\\|").replace("`", "\\`")


def _plain_text(text: str) -> str:
    """Docstring text written for people (`code` in single backticks, a·b, *args, a|b) made safe reStructuredText:
    single-backticked spans become literals, and outside literals `*`, `|` and backslashes lose their markup
    meaning. Newlines are kept, so the lines still line up."""
    out = []
    for part in _LITERAL.split(text):
        if part.startswith("`") and part.endswith("`") and len(part) > 1 and part.strip("`"):
            out.append(f"``{part.strip('`')}``")
            if len(out) > 1 and out[-2][-1:].isalnum():  # "a``x``": reST needs a (zero-width) break before
                out[-2] += "\\ "
        elif out and out[-1].endswith("``") and part[:1].isalnum():  # "``x``s": and after
            out.append("\\ " + _escape(part))
        else:
            out.append(_escape(part))
    return "".join(out)


def docstrings_as_plain_text(app, what, name, obj, options, lines) -> None:
    """autodoc-process-docstring: the docstring made safe by `_plain_text`, except its doctest examples and
    directives. Runs of ordinary lines are converted together, so a `span` broken over two lines stays one."""
    kinds = []
    in_doctest = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_doctest = True
        elif not stripped:
            in_doctest = False
        kinds.append("keep" if in_doctest or stripped.startswith("..") else "text")
    out, i = [], 0
    while i < len(kinds):
        j = i
        while j < len(kinds) and kinds[j] == kinds[i]:
            j += 1
        block = lines[i:j]
        out += block if kinds[i] == "keep" else _plain_text("\n".join(block)).split("\n")
        i = j
    lines[:] = out


def returns_as_prose(app, what, name, obj, options, lines) -> None:
    """Before napoleon: a "Returns:" section stays prose under a heading. Napoleon would split its first line at
    the first colon into a type and a description, which cuts `{path: error}` or "The `Plan`: hold it" in two."""
    for i, line in enumerate(lines):
        if line.strip() != "Returns:":
            continue
        lines[i : i + 1] = [".. rubric:: Returns", ""]
        j = i + 2
        while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
            lines[j] = lines[j].strip()
            j += 1
        return


def setup(app):
    # The guides' kernels are child processes: they import this checkout's jaxlora, on the CPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    write_api_pages()
    app.connect("autodoc-process-docstring", returns_as_prose, priority=400)
    app.connect("autodoc-process-docstring", docstrings_as_plain_text)
