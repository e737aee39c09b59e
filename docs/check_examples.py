"""Run the code examples of the documentation pages.

Every ```python block of a page is executed and every ```pycon block is run as a
doctest, in page order and in one namespace per page, so blocks build on each other.
Other fences (console, text) are not run. Exit status 1 if any example fails.

    python docs/check_examples.py [page.md ...]

Without arguments it runs every page under docs/ (subfolders included, docs/_build not).
"""

from __future__ import annotations

import doctest
import re
import sys
import traceback
from pathlib import Path

FENCE = re.compile(r"^```(python|pycon)\s*\n(.*?)^```\s*$", re.M | re.S)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def check(page: Path) -> int:
    text = page.read_text()
    ns: dict[str, object] = {"__name__": "__main__"}  # a module torch.compile can look up
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    parser = doctest.DocTestParser()
    failures = 0
    for m in FENCE.finditer(text):
        kind, code = m.group(1), m.group(2)
        line = text.count("\n", 0, m.start()) + 2
        where = f"{page.name}:{line}"
        if kind == "python":
            try:
                exec(compile(code, where, "exec"), ns)
            except Exception:
                failures += 1
                print(f"FAILED {where}")
                traceback.print_exc()
        else:
            test = parser.get_doctest(code, ns, where, str(page), line - 1)
            result = runner.run(test, clear_globs=False)
            failures += result.failed
            ns.update(test.globs)  # DocTest works on a copy of the namespace
    print(f"{page.name}: {'ok' if not failures else f'{failures} failure(s)'}")
    return failures


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    pages = [Path(p) for p in argv] or sorted(
        p for p in here.rglob("*.md") if "_build" not in p.relative_to(here).parts
    )
    return 1 if sum(check(p) for p in pages) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
