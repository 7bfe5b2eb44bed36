"""Every example in README.md and docs/ runs, and every link between the pages holds.

The Python and shell examples run against `python app.py --demo --mcp` on the tiny checkpoint,
with the documented address (`http://127.0.0.1:7860`) replaced by the test app's. An example that
can only run elsewhere (a GPU server, Spaces, another machine) is marked so in the Markdown and
skipped here with its reason (`pytest -rs` lists them); see tests/doc_snippets.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.doc_snippets import broken_links, markdown_pages, snippets
from tests.helpers import ROOT, demo_home, running_app

DOCUMENTED_URL = "http://127.0.0.1:7860"
PAGES = markdown_pages(ROOT)
EXAMPLES = [snippet for page in PAGES for snippet in snippets(page)]
# What a reader of the docs must find an example of, each run here: (what, a line that shows it).
EXPECTED_KINDS = {
    "the openai SDK": "from openai import OpenAI",
    "huggingface_hub's InferenceClient": "from huggingface_hub import InferenceClient",
    "gradio_client": "from gradio_client import Client",
    "curl": "curl ",
    "an MCP client": "from mcp import ClientSession",
}
EXAMPLE_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def app_url(tiny_dir, tmp_path_factory):
    """`python app.py --demo --mcp`, its demo checkpoint being the session's tiny one."""
    home = demo_home(tiny_dir, tmp_path_factory.mktemp("docs-home"))
    with running_app("--demo", "--mcp", env={"HOME": str(home)}, log_path=home / "app.log") as url:
        yield url


def example_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    # InferenceClient refuses every request in offline mode, and would send a saved token.
    return {**env, "HOME": str(home), "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.name for example in EXAMPLES])
def test_the_example_runs_against_the_app(example, app_url, tmp_path):
    if example.elsewhere:
        pytest.skip(f"{example.name} runs elsewhere: {example.elsewhere}")
    code = example.code.replace(DOCUMENTED_URL, app_url)
    assert ":7860" not in code, "an address the test did not point at its app (write it as DOCUMENTED_URL)"
    command = (
        [sys.executable, "-c", code] if example.kind == "python" else ["bash", "-euo", "pipefail", "-c", code]
    )
    done = subprocess.run(
        command,
        cwd=ROOT,
        env=example_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
    )
    shown = f"{example.name}\n--- stdout\n{done.stdout[-2000:]}\n--- stderr\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"the example failed: {shown}"
    assert done.stdout.strip(), f"the example printed nothing: {shown}"
    assert '"error"' not in done.stdout, f"the server answered an error: {shown}"


def test_the_docs_show_each_way_to_use_the_app_from_code():
    runnable = [example.code for example in EXAMPLES if not example.elsewhere]
    missing = [what for what, line in EXPECTED_KINDS.items() if not any(line in code for code in runnable)]
    assert not missing, f"no runnable example of {', '.join(missing)} in README.md or docs/"


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_every_link_names_a_file_and_heading_that_exist(page):
    assert not broken_links(page, ROOT)


def test_the_snippet_reader_finds_marks_fences_and_broken_links(tmp_path):
    """The reader itself: a test that finds nothing to run would pass on anything."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# Top\n\n## Use it `now`\n\n"
        "```python\nprint('runs')\n```\n\n"
        "<!-- example: elsewhere (needs a GPU) -->\n```bash\nnvidia-smi\n```\n\n"
        '```json\n{"shown": true}\n```\n\n'
        "[ok](docs/a.md#part-two) [same page](#use-it-now) [gone](docs/missing.md) [bad](#nowhere)\n",
        encoding="utf-8",
    )
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Part two\n", encoding="utf-8")
    found = snippets(tmp_path / "README.md")
    assert [(s.kind, s.elsewhere, s.code) for s in found] == [
        ("python", None, "print('runs')\n"),
        ("shell", "needs a GPU", "nvidia-smi\n"),
    ]
    problems = broken_links(tmp_path / "README.md", tmp_path)
    assert len(problems) == 2 and "docs/missing.md" in problems[0] and "#nowhere" in problems[1]
