"""The files notebooks hand each other: a missing one names the notebook that writes it."""

from __future__ import annotations

import pytest

from prkit.run_files import run_file


def test_a_missing_run_file_names_the_notebook_to_run_first(tmp_path):
    """03, 04 and 06 in a fresh run_dir ended in load_residuals' "residual file ... does not exist"."""
    with pytest.raises(FileNotFoundError, match="residuals.safetensors' does not exist: run 02_train_residuals first"):
        run_file(tmp_path, "residuals.safetensors")
    (tmp_path / "residuals.safetensors").write_bytes(b"x")
    assert run_file(tmp_path, "residuals.safetensors") == tmp_path / "residuals.safetensors"
    with pytest.raises(ValueError, match="'lag' is no file the notebooks hand each other"):
        run_file(tmp_path, "lag")


@pytest.mark.parametrize("name", ["03_attention_maps", "04_lag_sampling", "06_metrics"])
def test_the_notebooks_load_the_residuals_through_run_file(name):
    import json
    from pathlib import Path

    book = Path(__file__).resolve().parent.parent / "notebooks" / f"{name}.ipynb"
    text = "".join("".join(c["source"]) for c in json.loads(book.read_text())["cells"])
    assert 'load_residuals(pipe, run_file(run_dir, "residuals.safetensors"))' in text


def test_06_loads_a_real_models_concept_through_run_file_and_says_it_reads_it():
    """06 scores a real model's concept against run_dir/concept/ (01's), but loaded it by its bare path: without 01
    it ended in "concept folder ... does not exist; check the path", naming no notebook, and its header did not list
    the folder, so the report's --only check did not see that 06 needs 01."""
    import json
    from pathlib import Path

    from prkit.report import NOTEBOOKS, notebook_list, skipped_inputs

    book = Path(__file__).resolve().parent.parent / "notebooks" / "06_metrics.ipynb"
    code = "\n".join("".join(c["source"]) for c in json.loads(book.read_text())["cells"] if c["cell_type"] == "code")
    assert 'load_concept(run_file(run_dir, "concept")' in code and 'Path(run_dir) / "concept"' not in code
    series = notebook_list(NOTEBOOKS)
    assert "06_metrics.ipynb reads run_dir/concept, which 01_prepare_data.ipynb writes" in skipped_inputs(
        series, [b for b in series if b.name.startswith("06")])
