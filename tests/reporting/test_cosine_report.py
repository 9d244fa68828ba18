"""The variance study in reports: the cosine plot and table column of a comparison."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import install_tiny_dataset

from forwardgrad.cli import main
from forwardgrad.reporting.cosines import COSINE_HEADER

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMPARE = ["compare", "--problem", "logreg", "--dataset", "tiny", "--batch-size", "16",
           "--steps", "4", "--lr", "0.05", "--threads", "1", "--quiet",
           "--estimators", "forward,backprop"]  # fmt: skip


@pytest.fixture
def tiny_data(tmp_path, monkeypatch) -> Path:
    return install_tiny_dataset(monkeypatch, tmp_path / "data", 64, 32)


def table_rows(report: str) -> dict[str, list[str]]:
    """The cells of each table row, by the row's first cell."""
    rows = [line.strip("|").split("|") for line in report.splitlines() if line.startswith("|")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


def test_compare_report_plots_and_tabulates_the_cosines(tiny_data, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main([*COMPARE, "--cosine-every", "2", "--out", str(out)]) == 0, capsys.readouterr()
    plot = out / "logreg_cosine_vs_steps.png"
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    report = (out / "report.md").read_text()
    rows = table_rows(report)
    column = rows["estimator"].index(COSINE_HEADER)
    assert rows["backprop"][column] == "1"
    assert 0 < float(rows["forward (K=1, normal, mean)"][column]) < 0.2
    assert "every 2 steps" in report
    # each run's own report draws its plot too
    assert (out / "backprop" / "cosine_vs_steps.png").is_file()


def test_runs_without_cosines_have_no_plot_or_column(tiny_data, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main([*COMPARE, "--out", str(out)]) == 0, capsys.readouterr()
    assert not list(out.rglob("*cosine*"))
    assert COSINE_HEADER not in (out / "report.md").read_text()
