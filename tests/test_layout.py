"""The layout's rules, checked on the source: which part may import which, and what settings load.

See `orca_space/web/__init__.py` for the rule of the web parts. A lower layer importing a higher
one (the page from `sharing/`, say) makes the layout say something untrue; a heavy import in
settings makes `--help` and every refused flag wait for torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "orca_space"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Every orca_space module `path` imports (or `source`, read as if it stood at `path`),
    anywhere in the file, made absolute."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("orca_space")}


def part_of(module: str) -> str:
    """The layer a module belongs to: web.page, web.api, web.server, web (its guards), or below."""
    for part in ("orca_space.web.page", "orca_space.web.api", "orca_space.web.server"):
        if module == part or module.startswith(part + "."):
            return part
    return "orca_space.web" if module.startswith("orca_space.web") else "below"


# What each part must never import.
FORBIDDEN = {
    "below": {"orca_space.web", "orca_space.web.page", "orca_space.web.api", "orca_space.web.server"},
    "orca_space.web": {"orca_space.web.page", "orca_space.web.api", "orca_space.web.server"},
    "orca_space.web.page": {"orca_space.web.api", "orca_space.web.server"},
    "orca_space.web.api": {"orca_space.web.page", "orca_space.web.server"},
    "orca_space.web.server": set(),
}


def test_no_import_runs_from_a_lower_layer_up():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = part_of(module_name(path))
        for module in imported_modules(path):
            if part_of(module) in FORBIDDEN[here]:
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, "imports against the layout's rule (orca_space/web/__init__.py):\n" + "\n".join(wrong)


def test_the_rule_checker_sees_a_wrong_import():
    """The check above must be able to fail: `sharing/` importing the page, or the API importing
    the page, is caught (both were in the code once)."""
    links = PACKAGE / "sharing" / "links.py"
    imports = imported_modules(links, links.read_text() + "\nfrom ..web.page import ui\n")
    assert part_of("orca_space.web.page.ui") in FORBIDDEN["below"] and "orca_space.web.page.ui" in imports
    mcp = PACKAGE / "web" / "api" / "mcp_tool.py"
    imports = imported_modules(mcp, "from ..page.ui import DEFAULT_SYSTEM_MESSAGE\n")
    assert any(part_of(m) in FORBIDDEN["orca_space.web.api"] for m in imports)


def loaded_after(code: str) -> set[str]:
    """The heavy packages a fresh interpreter has loaded after running `code` from the root."""
    heavy = "('torch', 'gradio', 'transformers')"
    probe = code + f"\nimport sys\nprint('LOADED:', *(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.startswith("LOADED:"), result.stdout[-500:]
    return set(last_line.split()[1:])


def test_settings_import_nothing_heavy():
    assert loaded_after("import orca_space.settings") == set(), "settings must not load torch or gradio"


def test_help_and_a_refused_flag_load_no_torch():
    run_app = (
        "import runpy, sys\n"
        "for argv in (['app.py', '--help'], ['app.py', '--port', 'abc']):\n"
        "    sys.argv = argv\n"
        "    try:\n"
        "        runpy.run_path('app.py', run_name='__main__')\n"
        "    except SystemExit:\n"
        "        pass\n"
    )
    assert loaded_after(run_app) == set(), "--help and a refused flag must answer before torch or gradio load"
