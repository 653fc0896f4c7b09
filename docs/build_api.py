"""Build the API reference (HTML) from the docstrings of the top-level packages, with pdoc.

    python docs/build_api.py                  # -> docs/api/index.html (git-ignored)
    python docs/build_api.py -o /tmp/api      # what .ci/run does

It documents the packages of the checkout it sits in (``uwsfmt``, ``jupyter_ext``: their public
names, ``__all__`` where a package defines one), never single modules, so modules can move inside
the packages without touching this script. It fails (exit 1) when pdoc warns — a submodule that
does not import, a docstring or annotation it cannot parse — or when a package's page is missing,
and names each problem. Needs the ``docs`` extra: ``pip install -e ".[docs]"``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("uwsfmt", "jupyter_ext")


def build(output: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Write the HTML reference of ``packages`` under ``output``; return the problems found (empty: all good).

    >>> problems = build(Path("/tmp/uwsfmt-api"))  # doctest: +SKIP
    >>> problems
    []
    """
    try:
        import pdoc
        import pdoc.render
    except ImportError:
        return ['pdoc is not installed: pip install -e ".[docs]" (or pip install pdoc)']
    sys.path.insert(0, str(ROOT))  # document this checkout, not whatever copy is installed
    import uwsfmt

    pdoc_dir = os.path.dirname(os.path.abspath(pdoc.__file__))
    pdoc.render.configure(docformat="restructuredtext", footer_text=f"uwsfmt {uwsfmt.__version__}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*packages, output_directory=output)
    # pdoc reports what it could not document as warnings issued from its own modules; warnings
    # that importing torch, zarr, ... emit on their own are not about our docstrings
    problems = [f"pdoc: {w.message}" for w in caught if os.path.abspath(w.filename).startswith(pdoc_dir)]
    problems += [f"no page for {p}: expected {output / (p + '.html')}" for p in packages if not (output / f"{p}.html").is_file()]
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python docs/build_api.py [-o DIR]``; exit status 1 on any problem."""
    ap = argparse.ArgumentParser(description="Build the uwsfmt API reference with pdoc.")
    ap.add_argument("-o", "--output", default=str(ROOT / "docs" / "api"), help="output folder (default: docs/api)")
    args = ap.parse_args(argv)
    out = Path(args.output)
    problems = build(out)
    if problems:
        for p in problems:
            print(f"docs/build_api.py: {p}", file=sys.stderr)
        print(f"docs/build_api.py: {len(problems)} problem(s); fix the docstrings or imports named above", file=sys.stderr)
        return 1
    print(f"API reference written to {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
