"""report.md shows values from run files and the command line as text: no HTML, no links, no extra
table columns and no way out of the code block, whatever summary.json or config.json holds."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from forwardgrad.cli import main
from forwardgrad.reporting import markdown

# The "$...$" would be an error in matplotlib's mathtext if the plots did not escape it.
LABEL = r"<script>alert(1)</script> [click](javascript:alert(1)) | extra | `code` $\nosuch{$"
COMMAND = ["forwardgrad", "train", "--out", "a\n```\n<script>alert(2)</script>\n````", "b"]
PLATFORM = "<img src=x onerror=alert(3)>"
_CELL_SEPARATOR = re.compile(r"(?<!\\)\|")


@pytest.fixture
def tampered_runs(tmp_path, capsys) -> list[Path]:
    """Two finished beale runs whose summary label, command and platform are hostile."""
    first = tmp_path / "first"
    argv = ["train", "--problem", "beale", "--steps", "5", "--quiet", "--out", str(first)]
    assert main(argv) == 0
    capsys.readouterr()
    second = tmp_path / "second"
    shutil.copytree(first, second)
    for run_dir in (first, second):
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["label"] = LABEL
        (run_dir / "summary.json").write_text(json.dumps(summary))
        config = json.loads((run_dir / "config.json").read_text())
        config["command"], config["machine"]["platform"] = COMMAND, PLATFORM
        (run_dir / "config.json").write_text(json.dumps(config))
    return [first, second]


def _assert_inert(report: str) -> None:
    for markup in ("<script", "<img", "[click]"):
        assert markup not in report, markup
    assert not re.search(r"(?<!\\)\]\(javascript:", report)  # a link needs an unescaped "]("
    header = next(line for line in report.splitlines() if line.startswith("| estimator"))
    for row in (line for line in report.splitlines() if "alert(1)" in line):
        if row.startswith("|"):
            assert len(_CELL_SEPARATOR.split(row)) == len(_CELL_SEPARATOR.split(header))


def test_a_run_report_escapes_the_label_platform_and_command(tampered_runs, capsys):
    assert main(["plot", str(tampered_runs[0])]) == 0, capsys.readouterr().err
    lines = (tampered_runs[0] / "report.md").read_text().splitlines()
    opening = lines.index("To rerun:") + 2
    fence = lines[opening]
    assert set(fence) == {"`"} and len(fence) > 4  # longer than the ```` in the command
    closing = lines.index(fence, opening + 1)
    block = "\n".join(lines[opening + 1 : closing])
    # Inside the block the command is shown verbatim, which a renderer shows as text.
    assert "<script>alert(2)</script>" in block and block.endswith(" b")
    _assert_inert("\n".join(lines[:opening] + lines[closing + 1 :]))


def test_a_comparison_report_escapes_every_label(tampered_runs, tmp_path, capsys):
    out = tmp_path / "comparison"
    argv = ["plot", *map(str, tampered_runs), "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    _assert_inert((out / "report.md").read_text())


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("a|b", r"a\|b"),
        ("x86_64", "x86_64"),
        ("_start_", r"\_start\_"),
        ("<b>&", "&lt;b&gt;&amp;"),
        ("[x](y)", r"\[x\](y)"),
        ("$x$", r"\$x\$"),
        ("two\nlines", "two lines"),
    ],
)
def test_text_escapes_markup_and_keeps_plain_words(value, shown):
    assert markdown.text(value) == shown
