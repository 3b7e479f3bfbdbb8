"""The commands check their inputs before computing: one line naming the bad input, exit status 2."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from attnlens import cli
from attnlens.analysis import synthetic
from attnlens.store import StoreWriter


@pytest.fixture
def printed(monkeypatch, capsys):
    """What a command printed, as lines, on an 80-column console."""
    monkeypatch.setattr(cli, "console", Console(width=80))

    def lines() -> list[str]:
        out = capsys.readouterr()
        return [line for line in (out.out + out.err).splitlines() if line.strip()]

    return lines


@pytest.fixture
def never_computes(monkeypatch):
    """Fail the test if a command gets as far as computing."""
    import attnlens.analysis
    from attnlens import demo, refam

    def computed(*args, **kwargs):
        raise AssertionError("the command computed before checking its inputs")

    monkeypatch.setattr(demo, "run", computed)
    monkeypatch.setattr(refam, "segment", computed)
    monkeypatch.setattr(attnlens.analysis, "find_sinks", computed)
    monkeypatch.setattr(cli, "_load_model", computed)


@pytest.fixture
def files(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "black.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder").mkdir()
    writer = StoreWriter(str(tmp_path / "s.zarr"))
    writer.submit(None, lambda: synthetic.planted(layers=2, heads=1, steps=1, grid=(2, 2)))
    writer.close()
    return tmp_path


BAD = [
    (["segment", "{t}/missing.png", "the red circle"], "IMAGE {t}/missing.png: no such file"),
    (["segment", "{t}/notes.txt", "the red circle"], "IMAGE {t}/notes.txt is not an image PIL can read"),
    (["segment", "{t}/folder", "the red circle"], "IMAGE {t}/folder is a folder"),
    (
        ["segment", "{t}/black.png", "the red circle", "--out", "{t}/nowhere/m.png"],
        "--out {t}/nowhere/m.png: the folder {t}/nowhere does not exist",
    ),
    (
        ["segment", "{t}/black.png", "the red circle", "--heatmap", "{t}/folder"],
        "--heatmap {t}/folder is a folder; give a file name",
    ),
    (["segment", "{t}/black.png", "the red circle", "--t", "1.5"], "--t must lie in (0, 1]; got 1.5"),
    (["demo", "--out", "{t}/black.png"], "--out {t}/black.png is a file; give a folder"),
    (["demo", "--out", "{t}/x", "--scenes", "0"], "--scenes must be above 0; got 0"),
    (["demo", "--out", "{t}/x", "--model", "nosuch"], "--model 'nosuch' is no embedded model"),
    (["inspect", "{t}/none.zarr"], "no attnlens store at {t}/none.zarr"),
    (["inspect", "{t}/s.zarr", "--sample", "nosuch"], "--sample 'nosuch' is not a sample of {t}/s.zarr"),
    (["inspect", "{t}/s.zarr", "--sample", "[x]"], "--sample '[x]' is not a sample"),
    (["sinks", "{t}/s.zarr", "--out", "{t}/nowhere/f.html"], "--out {t}/nowhere/f.html: the folder"),
    (["sinks", "{t}/s.zarr", "--head-share", "0"], "--head-share must lie in (0, 1]; got 0"),
    (["sinks", "{t}/none.zarr"], "no attnlens store at {t}/none.zarr"),
    (["segment", "{t}/black.png"], "attnlens segment: error: the following arguments are required"),
    (["sinks", "--min-ratio", "ten"], "attnlens sinks: error: argument --min-ratio: invalid float value"),
]


@pytest.mark.parametrize(
    ("argv", "message"), BAD, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in enumerate(BAD)]
)
def test_bad_input_is_one_line_and_exit_status_2(argv, message, files, printed, never_computes):
    argv = [a.format(t=files) for a in argv]
    try:
        status = cli.main(argv)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    lines = printed()
    assert status == 2
    assert len(lines) == 1, lines
    assert message.format(t=files) in lines[0]
    assert not (files / "m.png").exists() and not (files / "x").exists()


def test_inspect_lists_the_tokens_of_the_sample_asked_for(files, printed):
    assert cli.main(["inspect", str(files / "s.zarr"), "--sample", "0"]) == 0
    assert any("text tokens of sample '0'" in line for line in printed())


def test_a_wide_table_keeps_every_figure_whole_on_a_narrow_terminal(printed):
    import pandas as pd

    figures = {"step": 1600, "images": 102400, "shape": 0.28125, "noun pointing, same colour": 0.248}
    wide = pd.DataFrame([{f"{name} ({run})": v for run in ("words", "minilm", "shape-first") for name, v in
                          figures.items()}])  # fmt: skip
    cli._print_frame(wide, "curves")
    body = " ".join(printed())
    for figure in ("1600", "102400", "0.281", "0.248"):
        assert body.count(figure) == 3, figure


def test_segment_keeps_the_models_chosen_options_unless_told(files, printed, monkeypatch):
    from attnlens import refam
    from attnlens.testing import tiny_shapes_pipeline

    pipe = tiny_shapes_pipeline()
    pipe.refam_options = {"t": 0.3, "gas": "redirect", "refiner": "region", "prompts": "grid"}
    ran, segment = [], refam.segment
    monkeypatch.setattr(cli, "_load_model", lambda name: pipe)
    monkeypatch.setattr(refam, "segment", lambda *a, **kw: ran.append(segment(*a, **kw)) or ran[-1])
    argv = ["segment", str(files / "black.png"), "the red circle", "--out", str(files / "m.png")]
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--t", "0.7", "--option", "prompts=peaks", "--option", "n_points=2"]) == 0
    chosen, told = (r.options for r in ran)
    assert (chosen["t"], chosen["gas"], chosen["refiner"], chosen["prompts"]) == (
        0.3,
        "redirect",
        "region",
        "grid",
    )
    assert (told["t"], told["gas"], told["prompts"], told["n_points"]) == (0.7, "redirect", "peaks", 2)
    assert any("refiner: segmenter" in line for line in printed())
