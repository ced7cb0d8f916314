"""The report runner on two trivial notebooks: parameters pass through, HTML renders, Chromium opens it."""

from __future__ import annotations

import shutil
import subprocess

import nbformat
import pytest

from prkit.report import main


def _write(folder, name, body):
    book = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1\nrun_dir = 'unused'")
    params.metadata["tags"] = ["parameters"]
    book.cells = [nbformat.v4.new_markdown_cell(f"# {name}"), params, nbformat.v4.new_code_cell(body)]
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(book, folder / name)


@pytest.fixture
def books(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    _write(folder, "01_write_value.ipynb", "from pathlib import Path\nPath(run_dir, 'x.txt').write_text(str(x))")
    _write(folder, "02_check_value.ipynb", "from pathlib import Path\nassert Path(run_dir, 'x.txt').read_text() == str(x)")
    return folder


def test_series_runs_with_parameters_and_renders(tmp_path, books, capsys):
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books), "-p", "x", "7"]) == 0
    run = next((tmp_path / "runs").iterdir())
    assert (run / "x.txt").read_text() == "7"
    assert "[1/2] 01_write_value.ipynb ... ok" in capsys.readouterr().out
    index = (run / "index.html").read_text()
    assert "01_write_value.html" in index and "02_check_value.html" in index
    assert "01_write_value.ipynb" in (run / "01_write_value.html").read_text()


def test_failure_stops_the_series_and_is_reported(tmp_path, books):
    _write(books, "02_a_fail.ipynb", "raise ValueError('boom')")
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books)]) == 1
    run = next((tmp_path / "runs").iterdir())
    index = (run / "index.html").read_text()
    assert "failed: " in index
    assert "02_check_value.ipynb</td><td>not run</td>" in index  # the notebooks after the failure are listed
    assert "boom" in (run / "02_a_fail.ipynb").read_text()


def test_relative_paths_are_the_callers_not_the_run_folders(tmp_path, books, monkeypatch):
    from prkit.report import resolve_paths

    _write(books, "03_check_paths.ipynb", "from pathlib import Path\nassert Path(concept_folder, 'a.png').is_file()\n"
                                         "assert Path(model, 'model_index.json').is_file()")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.png").write_bytes(b"x")
    (tmp_path / "sd15").mkdir()
    (tmp_path / "sd15" / "model_index.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert main(["--out", "runs", "--notebooks", str(books), "-p", "concept_folder", "mine", "-p", "model", "sd15"]) == 0
    assert resolve_paths({"model": "org/hub-id", "concept_folder": "missing", "x": "mine"}, tmp_path) == {
        "model": "org/hub-id", "concept_folder": str(tmp_path / "missing"), "x": "mine"}  # hub ids and others kept
    assert resolve_paths({"model": "world", "concept_folder": ""}, tmp_path) == {"model": "world", "concept_folder": ""}
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_paths({"model": "~/sd15", "concept_folder": "~/mine"}, tmp_path / "elsewhere") == {
        "model": str(tmp_path / "sd15"), "concept_folder": str(tmp_path / "mine")}  # ~ is the user's home


def test_two_runs_in_one_second_get_their_own_folders(tmp_path, books, monkeypatch):
    from prkit import report

    monkeypatch.setattr(report, "run_series", lambda out, *args: [])
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books)]) == 1  # nothing ran: not ok
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books)]) == 1
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_only_without_a_match_is_a_usage_error(tmp_path, books, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path / "runs"), "--notebooks", str(books), "--only", "09"])
    assert err.value.code == 2 and "with the prefixes --only 09" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_opens_in_headless_chromium(tmp_path, books):
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books)]) == 0
    run = next((tmp_path / "runs").iterdir())
    for page in ("index.html", "02_check_value.html"):
        done = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--enable-logging=stderr", "--dump-dom", (run / page).as_uri()],
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "</html>" in done.stdout and "Uncaught" not in done.stderr, done.stderr[-2000:]
    assert "prkit report" in subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", (run / "index.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
