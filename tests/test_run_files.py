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
