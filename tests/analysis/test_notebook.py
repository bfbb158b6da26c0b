"""The routing-analysis notebook runs end to end on a small export directory."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "routing_analysis.ipynb"


def test_notebook_executes(tmp_path, monkeypatch, example_run):
    run_dir, _ = example_run
    report_dir = tmp_path / "report"
    monkeypatch.setenv("OLMOE_EXPORT_DIR", str(run_dir))
    monkeypatch.setenv("OLMOE_REPORT_DIR", str(report_dir))
    monkeypatch.delenv("OLMOE_ROUTING_STATS", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)

    # jupyter_client starts the "python3" kernel with the interpreter running this test.
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    outputs = [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    ]
    errors = [output for output in outputs if output.output_type == "error"]
    assert errors == []
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == 6  # four single-checkpoint figures, saturation, training load
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "step200: step 200, 300 tokens" in text
    assert "Router saturation against step 200" in text
    assert "uniform share: 0.250" in text
    assert (report_dir / "report.txt").is_file()
