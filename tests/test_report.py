"""The report runner on two trivial notebooks: parameters pass through, HTML renders, Chromium opens it."""

from __future__ import annotations

import shutil
import subprocess

import nbformat
import pytest

from prkit.report import main


def _write(folder, name, body, params="x = 1"):
    book = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(f"{params}\nrun_dir = 'unused'")
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
    assert "[1/2] 01_write_value.ipynb ok (" in capsys.readouterr().out
    index = (run / "index.html").read_text()
    assert "01_write_value.html" in index and "02_check_value.html" in index
    assert "01_write_value.ipynb" in (run / "01_write_value.html").read_text()


def test_failure_stops_the_series_and_is_reported(tmp_path, books, capsys):
    _write(books, "02_a_fail.ipynb", "raise ValueError('boom')")
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books)]) == 1
    run = next((tmp_path / "runs").iterdir())
    index = (run / "index.html").read_text()
    said = "02_a_fail.ipynb failed in cell [3]: ValueError: boom"  # the cause, not papermill's wrapper's name
    assert said in capsys.readouterr().out and "failed in cell [3]: ValueError: boom" in index
    assert "02_check_value.ipynb</td><td>not run</td>" in index  # the notebooks after the failure are listed
    assert "boom" in (run / "02_a_fail.ipynb").read_text()


def test_relative_paths_are_the_callers_not_the_run_folders(tmp_path, books, monkeypatch):
    from prkit.report import resolve_paths

    _write(books, "03_check_paths.ipynb", "from pathlib import Path\nassert Path(concept_folder, 'a.png').is_file()\n"
                                         "assert Path(model, 'model_index.json').is_file()",
           params="concept_folder = ''\nmodel = 'world'")
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


def test_a_backbone_folder_is_the_callers_not_the_run_folders(tmp_path, books, monkeypatch):
    """06's clip_backbone / dino_backbone name folders as model does: a relative one was looked for in the run folder,
    where the notebooks run, not found there and taken for a hub id missing from the cache (metrics 'unavailable')."""
    from prkit.report import resolve_paths

    _write(books, "03_check.ipynb", "from pathlib import Path\nassert Path(clip_backbone, 'config.json').is_file()\n"
                                    "assert Path(dino_backbone, 'config.json').is_file()",
           params="clip_backbone = 'auto'\ndino_backbone = 'auto'")
    for name in ("clip", "dino", "auto"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert main(["--out", "runs", "--notebooks", str(books), "--only", "03", "-p", "clip_backbone", "clip",
                 "-p", "dino_backbone", "dino"]) == 0
    kept = {"clip_backbone": "auto", "dino_backbone": "facebook/dino-vits16"}  # the notebook's default, a hub id
    assert resolve_paths(kept, tmp_path) == kept
    assert resolve_paths({"clip_backbone": "world"}, tmp_path) == {"clip_backbone": "world"}
    assert resolve_paths({"concept_folder": "auto"}, tmp_path) == {"concept_folder": str(tmp_path / "auto")}


def test_two_runs_in_one_second_get_their_own_folders(tmp_path, books, monkeypatch):
    from prkit import report

    monkeypatch.setattr(report, "run_series", lambda out, *args: [])
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books)]) == 1  # nothing ran: not ok
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books)]) == 1
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_out_with_a_tilde_is_the_users_home(tmp_path, books, monkeypatch):
    """--out=~/runs (no shell expands a ~ after '=') made a folder named '~' in the current folder, while the check
    that --out is no file and --run both read it as the home folder."""
    from prkit import report

    monkeypatch.setattr(report, "run_series", lambda out, parameters, chosen, kernel: [
        {"notebook": b.name, "seconds": 1.0, "status": "ok"} for b in chosen])
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["--out=~/runs", "--notebooks", str(books)]) == 0
    assert not (tmp_path / "~").exists()
    assert (next((tmp_path / "home" / "runs").iterdir()) / "index.html").is_file()


def test_only_without_a_match_is_a_usage_error(tmp_path, books, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path / "runs"), "--notebooks", str(books), "--only", "09"])
    assert err.value.code == 2 and "with the prefixes --only 09" in capsys.readouterr().err


def test_only_without_a_prefix_is_a_usage_error(tmp_path, books, capsys):
    # it ran every notebook, the opposite of what a forgotten prefix meant
    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path / "runs"), "--notebooks", str(books), "--only"])
    assert err.value.code == 2 and "--only: expected at least one argument" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


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


def test_figures_reach_the_report_and_typos_are_refused(tmp_path, books, capsys, monkeypatch):
    """Under the README's MPLBACKEND=Agg the kernels drew no inline figures (the report had none), the files the
    notebooks wrote were not linked, and a misspelt -p name ran the defaults with only papermill's warning."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    _write(books, "03_plot.ipynb", "import matplotlib.pyplot as plt\nfrom pathlib import Path\n"
                                   "fig = plt.figure(); plt.plot([1, 2])\nPath(run_dir, 'plots').mkdir()\n"
                                   "fig.savefig(Path(run_dir, 'plots', 'line.png'))\n"
                                   "Path(run_dir, 'plots', 'rows.csv').write_text('a')", params="steps = 1")
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books), "--only", "03"]) == 0
    run = next((tmp_path / "runs").iterdir())
    assert "image/png" in (run / "03_plot.ipynb").read_text()
    index = (run / "index.html").read_text()
    assert '<img alt="line.png" src="plots/line.png">' in index and 'href="plots/rows.csv"' in index
    import os
    assert os.environ["MPLBACKEND"] == "Agg"  # the caller's setting is back
    with pytest.raises(SystemExit) as err:  # steps is 03's only: declared in the series, also with --only 01
        main(["--out", str(tmp_path / "runs"), "--notebooks", str(books), "--only", "01", "-p", "step", "2"])
    assert err.value.code == 2 and "no notebook of this series has the parameter(s) step" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "r2"), "--notebooks", str(books), "--only", "01", "-p", "steps", "2"]) == 0
    with pytest.raises(SystemExit) as err:  # was overwritten by the report's folder without a word
        main(["--out", str(tmp_path / "r3"), "--notebooks", str(books), "-p", "run_dir", "mine"])
    assert err.value.code == 2 and "pass --out instead" in capsys.readouterr().err


def test_a_parameter_that_only_notebooks_left_out_take_is_said_unused(tmp_path, books, capsys, monkeypatch):
    """--run R --only 02 -p steps 300, steps being 03's only: the report ran 02 without it and without a word (a
    user meant it for the notebooks run)."""
    from prkit import report

    _write(books, "03_plot.ipynb", "pass", params="steps = 1")
    monkeypatch.setattr(report, "run_series", lambda out, parameters, chosen, kernel: [
        {"notebook": b.name, "seconds": 1.0, "status": "ok"} for b in chosen])
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books), "--only", "01", "02", "-p", "steps", "3",
                 "-p", "x", "2"]) == 0
    said = capsys.readouterr().out
    assert "note: --only 01 02 runs no notebook that takes steps (03_plot.ipynb): not used" in said
    assert "x (" not in said  # 01 and 02 take x
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books), "-p", "steps", "3"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_a_params_files_relative_paths_are_its_own_folders(tmp_path, books, monkeypatch):
    _write(books, "03_check.ipynb", "from pathlib import Path\nassert Path(concept_folder, 'a.png').is_file()",
           params="concept_folder = ''")
    (tmp_path / "data" / "dog").mkdir(parents=True)
    (tmp_path / "data" / "dog" / "a.png").write_bytes(b"x")
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "p.yaml").write_text("concept_folder: ../data/dog\n")
    monkeypatch.chdir(books)  # anywhere else
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books), "--params", str(tmp_path / "params" /
                                                                                             "p.yaml")]) == 0


def test_the_ablations_reference_run_takes_train_steps_and_the_static_explorer_its_token(monkeypatch):
    """05's train_steps changed nothing (the reference variants took the steps sweep's last count); the static
    explorer showed the prompt's first token ('a'), and twice under the inline backend (returned and still open)."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt
    import torch

    import prkit.train
    from prkit.viz import attention_explorer
    from prkit.world import ablate

    seen = []

    class Handle:
        name = "x"

        def num_parameters(self):
            return 1

        def remove(self):
            pass

    monkeypatch.setattr(prkit.train, "train_residuals", lambda pipe, data, config, **kw: (
        seen.append((config.target, config.steps)), SimpleNamespace(residuals=Handle()))[1])
    monkeypatch.setattr(ablate, "score", lambda *a, **k: {"identity": 0.5, "prompt": 0.5})
    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=8)), vae_scale_factor=4)
    config = ablate.AblationConfig(steps=7, ranks=(0.05,), targets=("attn_kv",), step_counts=(3,), thresholds=())
    ablate.run_ablations(pipe, config)
    assert seen == [("residuals", 7), ("attn_kv", 7), ("residuals", 3)]

    store = SimpleNamespace(blocks=lambda: ["down_blocks.0.attentions.0"],
                            get=lambda block: torch.arange(3.0).reshape(1, 3, 1, 1).expand(1, 3, 4, 4))
    before = set(plt.get_fignums())
    fig = attention_explorer(store, torch.zeros(16, 16, 3).numpy(), ["a", "photo", "sks"], interactive=False,
                             token=2)
    assert fig._suptitle.get_text() == "'sks' averaged over steps (static view)"
    assert set(plt.get_fignums()) == before  # closed: displayed once, as the cell's value


def _header(folder, name, reads="", writes=""):
    """Give the notebook ``name`` a first cell that lists the run files it reads and writes, as the series' do."""
    book = nbformat.read(folder / name, as_version=4)
    book.cells[0].source = f"# {name}\n\n* reads: {reads}\n* writes: {writes}\n"
    nbformat.write(book, folder / name)


def test_only_a_later_notebook_runs_in_an_existing_run_folder(tmp_path, books, monkeypatch, capsys):
    """--only 03 made a fresh folder, where 03 could not find the residuals 02 had written elsewhere."""
    from prkit import report

    _header(books, "01_write_value.ipynb", writes="`run_dir/x.txt`, `run_dir/plots/`")
    _header(books, "02_check_value.ipynb", reads="`run_dir/x.txt`", writes="`run_dir/checked/`")
    seen = []
    monkeypatch.setattr(report, "run_series", lambda out, parameters, chosen, kernel: (
        seen.append((out, [b.name for b in chosen])),
        [{"notebook": b.name, "seconds": 1.0, "status": "ok"} for b in chosen])[1])
    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path / "runs"), "--notebooks", str(books), "--only", "02"])
    said = capsys.readouterr().err
    assert err.value.code == 2 and "02_check_value.ipynb reads run_dir/x.txt, which 01_write_value.ipynb writes" in said
    assert "Pass --run runs/<timestamp>" in said and not (tmp_path / "runs").exists() and not seen
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books), "--only", "01"]) == 0  # needs nothing
    run = next((tmp_path / "runs").iterdir())
    nbformat.write(nbformat.read(books / "01_write_value.ipynb", as_version=4), run / "01_write_value.ipynb")
    assert main(["--run", str(run), "--notebooks", str(books), "--only", "02"]) == 0
    assert seen[-1] == (run.resolve(), ["02_check_value.ipynb"]) and len(list((tmp_path / "runs").iterdir())) == 1
    index = (run / "index.html").read_text()
    assert "01_write_value.ipynb</a></td><td>earlier run</td>" in index and "02_check_value.ipynb</td><td>ok" in index
    for argv, said in ((["--run", str(tmp_path / "nowhere")], "no such folder"),
                       (["--run", str(run), "--out", str(tmp_path / "runs")], "pass one of them"),
                       (["--run", str(books)], "is the folder of the notebooks themselves")):
        with pytest.raises(SystemExit) as err:
            main([*argv, "--notebooks", str(books)])
        assert err.value.code == 2 and said in capsys.readouterr().err


def test_the_series_own_dependencies_are_read_from_the_notebooks():
    from prkit.report import NOTEBOOKS, notebook_list, skipped_inputs

    series = notebook_list(NOTEBOOKS)
    only = [b for b in series if b.name.startswith("03")]
    assert skipped_inputs(series, only) == [
        "03_attention_maps.ipynb reads run_dir/residuals.safetensors, which 02_train_residuals.ipynb writes"]
    assert skipped_inputs(series, series) == [] and skipped_inputs(series, series[:2]) == []


def test_the_index_links_every_file_of_the_run_and_shows_the_parameters(tmp_path):
    """The index missed the run folder's own files (residuals, train stats, the executed notebooks), the samples
    under lag/images/, and said nothing of the parameters."""
    from prkit.report import render_html

    run = tmp_path / "run"
    (run / "lag" / "images").mkdir(parents=True)
    for name in ("train_stats.json", "residuals.safetensors", "lag/grid.png", "lag/images/base_0.png"):
        (run / name).write_bytes(b"x")
    nbformat.write(nbformat.v4.new_notebook(), run / "01_a.ipynb")
    index = render_html(run, [{"notebook": "01_a.ipynb", "seconds": 2.0, "status": "ok"}],
                        {"train_steps": 20, "prompts": ["a {token}"]}).read_text()
    for name in ("train_stats.json", "residuals.safetensors", "01_a.ipynb", "01_a.html", "lag/images/base_0.png"):
        assert f'<li><a href="{name}">' in index, name
    assert '<img alt="grid.png" src="lag/grid.png">' in index and 'src="lag/images/base_0.png"' not in index
    assert "<td>train_steps</td><td><code>20</code>" in index and "[&#x27;a {token}&#x27;]" in index
    assert 'href="index.html"' not in index
    assert "the notebooks' defaults" in (render_html(run, [], {})).read_text()


def test_the_index_quotes_links_and_links_only_this_runs_pages(tmp_path):
    """A '#' in a file name cut the link at it; a notebook not run this time linked the page an earlier report left;
    each notebook's row says what it ran with (papermill's record), not only this call's parameters."""
    from prkit.report import render_html

    run = tmp_path / "run"
    run.mkdir()
    (run / "a#b <i>.csv").write_text("x")
    ran = nbformat.v4.new_notebook()
    ran.metadata["papermill"] = {"parameters": {"train_steps": 20, "run_dir": str(run), "interactive": False}}
    nbformat.write(ran, run / "01_a.ipynb")
    nbformat.write(nbformat.v4.new_notebook(), run / "02_b.ipynb")  # left by an earlier report
    index = render_html(run, [{"notebook": "01_a.ipynb", "seconds": 2.0, "status": "ok"},
                              {"notebook": "02_b.ipynb", "seconds": 0.0, "status": "not run"}], {}).read_text()
    assert '<a href="a%23b%20%3Ci%3E.csv">a#b &lt;i&gt;.csv</a>' in index
    assert '<a href="01_a.html">01_a.ipynb</a>' in index and "<td><code>train_steps=20</code></td>" in index
    assert "<tr><td>02_b.ipynb</td><td>not run</td>" in index and not (run / "02_b.html").exists()


@pytest.mark.parametrize("content, said", [
    (None, "--params {path}: No such file or directory"),
    ("- train_steps: 3\n", "--params {path} must hold 'name: value' lines (a mapping), not a list"),
    ("train_steps: [1\n", "--params {path} is no valid YAML: "),
    ("5\n", "--params {path} must hold 'name: value' lines (a mapping), not a int"),
])
def test_a_params_file_that_is_missing_or_no_mapping_is_a_usage_error(tmp_path, books, capsys, content, said):
    """A YAML list gave 'ValueError: dictionary update sequence element #0 has length 1; 2 is required'."""
    path = tmp_path / "my params.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path / "runs"), "--notebooks", str(books), "--params", str(path)])
    assert err.value.code == 2 and said.format(path=path) in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_out_that_is_a_file_is_a_usage_error(tmp_path, books, capsys):
    (tmp_path / "runs").write_text("")
    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path / "runs"), "--notebooks", str(books)])
    assert err.value.code == 2 and f"--out {tmp_path / 'runs'} is a file" in capsys.readouterr().err


def test_ctrl_c_in_a_notebook_still_writes_the_index(tmp_path, books, capsys):
    """Ctrl-C during a long notebook left the run folder without index.html or the pages of the notebooks that had
    finished."""
    _write(books, "02_a_stop.ipynb", "import os, signal, time\nprint('started')\nos.kill(os.getppid(), signal.SIGINT)\n"
                                     "time.sleep(60)")  # the kernel's parent: the report, as a terminal's Ctrl-C
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books)]) == 1
    run = next((tmp_path / "runs").iterdir())
    index = (run / "index.html").read_text()
    assert '<a href="01_write_value.html">01_write_value.ipynb</a></td><td>ok</td>' in index
    assert '<a href="02_a_stop.html">02_a_stop.ipynb</a></td><td>interrupted (Ctrl-C)</td>' in index
    assert "02_check_value.ipynb</td><td>not run</td>" in index
    assert "started" in (run / "02_a_stop.html").read_text()  # as far as it ran
    assert "02_a_stop.ipynb interrupted (Ctrl-C)" in capsys.readouterr().out


def test_a_rerun_into_a_run_folder_lists_the_files_it_did_not_write_apart(tmp_path):
    """--run R --only 04 -p second_concept '' showed the earlier run's lag/multi_concept.png beside this run's
    figures, as if this run had drawn it."""
    import os
    import time

    from prkit.report import render_html

    run = tmp_path / "run"
    (run / "lag").mkdir(parents=True)
    for name in ("lag/grid.png", "lag/multi_concept.png", "residuals.safetensors"):
        (run / name).write_bytes(b"x")
    now = time.time()
    for name in ("lag/multi_concept.png", "residuals.safetensors"):
        os.utime(run / name, (now - 3600, now - 3600))
    index = render_html(run, [], {}, since=now - 2).read_text()
    fresh, _, old = index.partition("<h2>lag/ (an earlier run&#x27;s, not written by this one)</h2>")
    assert 'src="lag/grid.png"' in fresh and 'src="lag/multi_concept.png"' not in fresh
    assert 'src="lag/multi_concept.png"' in old and 'src="lag/grid.png"' not in old
    assert "<h2>run folder (an earlier run&#x27;s, not written by this one)</h2><ul><li><a href=\"residuals" in index
    assert "earlier run" not in render_html(run, [], {}).read_text()  # without since: one list, as before


def test_file_names_that_are_no_utf8_are_shown_escaped_and_still_linked(tmp_path):
    """A run file named b'\\xff.png' (Linux names are bytes; Python holds 0xff as a lone surrogate) stopped the index
    with UnicodeEncodeError: the link was quoted as UTF-8 and the page written as UTF-8."""
    import os
    import urllib.parse

    from prkit.report import render_html

    run = tmp_path / "run"
    try:
        (run / os.fsdecode(b"d\xfe")).mkdir(parents=True)
        for name in (b"\xff.png", b"d\xfe/a b\xe9.csv"):
            (run / os.fsdecode(name)).write_bytes(b"x")
    except (OSError, UnicodeError):  # a file system that takes only UTF-8 names (macOS): nothing to show
        pytest.skip("this file system refuses names that are no UTF-8")
    nbformat.write(nbformat.v4.new_notebook(), run / "01_a.ipynb")
    index = render_html(run, [{"notebook": "01_a.ipynb", "seconds": 2.0, "status": "ok"}], {}).read_text("utf-8")
    assert '<a href="%FF.png"><img alt="\\xff.png" src="%FF.png"></a>' in index
    assert '<h2>d\\xfe/</h2><ul><li><a href="d%FE/a%20b%E9.csv">d\\xfe/a b\\xe9.csv</a></li></ul>' in index
    for href, name in (("%FF.png", b"\xff.png"), ("d%FE/a%20b%E9.csv", b"d\xfe/a b\xe9.csv")):  # links open their file
        assert urllib.parse.unquote_to_bytes(href) == name and os.path.isfile(os.fsencode(run) + b"/" + name)


@pytest.mark.parametrize("given, said", [
    (["-p", "flag", "false"], "flag='false' is no True or False (its default in 01_write_value.ipynb: False); "
                              "give e.g. -p flag False"),
    (["-p", "x", "3OO"], "x='3OO' is no whole number (its default in 01_write_value.ipynb: 1); give e.g. -p x 1"),
    (["-p", "x", "2.5"], "x=2.5 is no whole number"),
    (["-p", "rate", "fast"], "rate='fast' is no number (its default in 02_check_value.ipynb: 0.5)"),
    (["-p", "words", "a photo"], "words='a photo' is no list (its default in 02_check_value.ipynb: ['a'])"),
])
def test_a_parameter_of_the_wrong_kind_is_refused_before_anything_runs(tmp_path, capsys, given, said):
    """papermill hands a -p value over as it is: 'false' reached the notebook as a truthy string, '3OO' ran the
    earlier notebooks of the series and then failed deep in the one that used it, under another name."""
    folder = tmp_path / "books"
    folder.mkdir()
    _write(folder, "01_write_value.ipynb", "assert flag in (True, False)", params="x = 1\nflag = False")
    _write(folder, "02_check_value.ipynb", "pass", params="rate = 0.5\nwords = ['a']\nx = 2\nmaybe = None")
    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path / "runs"), "--notebooks", str(folder), *given])
    assert err.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(folder), "-p", "flag", "True", "-p", "x", "3",
                 "-p", "rate", "1", "-p", "words", "('b',)", "-p", "maybe", "anything"]) == 0


def test_a_notebook_cut_short_still_gets_an_index_that_names_it(tmp_path, books, capsys):
    """papermill writes an executed notebook in place: one cut short (the report killed while it saved) made the
    next report in that run folder end in nbformat's NotJSONError, with no index and no word of which notebook."""
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books)]) == 0
    run = next((tmp_path / "runs").iterdir())
    whole = (run / "01_write_value.ipynb").read_text()
    (run / "01_write_value.ipynb").write_text(whole[:len(whole) // 2])
    capsys.readouterr()
    assert main(["--run", str(run), "--notebooks", str(books), "--only", "02"]) == 0
    index = (run / "index.html").read_text()
    assert "<td>01_write_value.ipynb</td><td>earlier run; its page could not be made: NotJSONError" in index
    assert '02_check_value.html">02_check_value.ipynb</a></td><td>ok</td>' in index
    assert "01_write_value.ipynb: no page, NotJSONError" in capsys.readouterr().out


def test_a_params_files_numbers_in_exponent_form_are_numbers(tmp_path, books):
    """PyYAML reads YAML 1.1, where 1e-3 (no dot) and 1.5e10 (no sign) are strings: 'learning_rate: 1e-3' passed
    the report's checks (its default is None) and reached 02 as the string '1e-3', refused there after 01 had run."""
    _write(books, "03_check.ipynb", "assert lr == 0.001 and big == 1.5e10 and small == -2e-4 and rate == 0.5, "
                                    "(lr, big, small, rate)\nassert name == '1e-3' and word == 'e5'",
           params="lr = None\nbig = None\nsmall = None\nrate = 0.1\nname = 'x'\nword = 'x'")
    (tmp_path / "p.yaml").write_text("lr: 1e-3\nbig: 1.5e10\nsmall: -2E-4\nrate: 5e-1\nname: '1e-3'\nword: e5\n")
    assert main(["--out", str(tmp_path / "runs"), "--notebooks", str(books), "--only", "03", "--params",
                 str(tmp_path / "p.yaml")]) == 0


@pytest.mark.parametrize("flag", ["--run", "--params", "--out", "--notebooks"])
def test_an_empty_path_is_a_usage_error(tmp_path, books, capsys, monkeypatch, flag):
    """An unset shell variable ('--run "$RUN"'): --run "" ran the series in the current folder, --params "" ran it
    with the notebooks' defaults, both without a word."""
    monkeypatch.chdir(tmp_path)
    given = {"--notebooks": str(books), flag: ""}
    with pytest.raises(SystemExit) as err:
        main([word for pair in given.items() for word in pair])
    assert err.value.code == 2 and f"{flag} is empty; give a path (an unset shell variable?)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["books"]
