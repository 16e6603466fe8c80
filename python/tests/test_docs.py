"""docs/python.md's example runs as printed, against the mock server instead of
OpenRouter (the one substitution: its base URL)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
OPENROUTER = "https://openrouter.ai/api/v1"


def python_blocks(page):
    return re.findall(r"^```python\n(.*?)^```$", page.read_text(), flags=re.S | re.M)


def test_the_python_guide_runs_against_the_mock(mock_url, capsys):
    blocks = python_blocks(ROOT / "docs" / "python.md")
    assert blocks, "docs/python.md has a python block"
    for code in blocks:
        assert code.count(OPENROUTER) == 1, "the example names OpenRouter's base URL once"
        exec(compile(code.replace(OPENROUTER, mock_url), "docs/python.md", "exec"), {})
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 3, out  # the answer, the streamed one, the last line
    assert "'label': 'key-0'" in lines[2], out  # pool.stats()["keys"][0]
