"""Execute the notebooks (in place with ``--in-place``) and export them to HTML that needs no network.

    python notebooks/run.py                      # execute every notebook, check for errors
    python notebooks/run.py --in-place           # ... and save the outputs (``make notebooks``)
    python notebooks/run.py --html build/nb      # ... and write build/nb/NAME.html

The kernel sees this checkout first on its path, so a notebook runs the attnlens beside it.

Two things make execution reliable on a loaded 2-core machine:

- cell timeouts of :data:`CELL_TIMEOUT` seconds: the slowest cell (RefAM's ablations) takes
  about a minute alone and several times that while other jobs share the cores;
- the reply to a cell is awaited in slices of :data:`POLL_SLICE` seconds. nbclient awaits it with
  one ``zmq.asyncio`` poll as long as the whole cell timeout. That poll wakes on the socket's
  edge-triggered file descriptor, and nbclient's stand-in for an ipywidgets ``Output`` widget
  sends on the same shell socket while the poll waits (it echoes every output it captures back
  to the kernel); a wake-up lost there is only noticed when the poll times out, so the client
  sat idle for the whole cell timeout with the reply already queued. Measured on a loaded 2-core
  machine (nbclient 0.11, jupyter_client 8.10, ipykernel 7.4, pyzmq 27.3), a notebook with an
  ``Output`` widget: the stock client once waited 596 s on a reply the kernel had sent (kernel
  and client both idle); awaited in slices, no cell waited more than 0.02 s. Each slice ends in a
  level-triggered ``zmq_poll`` that finds a queued reply, so a lost wake-up costs at most a slice.

The HTML export (``offline.html.j2``: nbconvert's lab template without the scripts it fetches
from CDNs) shows each plotly figure's PNG (the notebooks keep one beside the interactive figure,
see :func:`attnlens.viz.static_images`) and the explorer's PNG instead of the live widget, whose
renderer would come from a CDN; the ``.ipynb`` keeps the widget state for JupyterLab.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(Path(__file__).resolve().parent.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT = 900
POLL_SLICE = 1.0
#: what the offline HTML shows of an output, most wanted first (no widget view, no plotly JSON)
STATIC_PRIORITY = ["image/png", "text/html", "image/svg+xml", "text/markdown", "text/latex", "text/plain"]


class Client(NotebookClient):
    """An nbclient ``NotebookClient`` that awaits each shell reply in slices (see the module doc)."""

    async def async_start_new_kernel_client(self):
        kc = await super().async_start_new_kernel_client()
        channel = kc.shell_channel
        whole = channel.get_msg

        async def get_msg(timeout: float | None = None):
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                left = POLL_SLICE if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    return await whole(timeout=min(POLL_SLICE, left))
                except Empty:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise

        channel.get_msg = get_msg
        return kc


def execute(path: Path, *, cwd: Path | None = None, timeout: int = CELL_TIMEOUT) -> nbformat.NotebookNode:
    """Run a notebook top to bottom in a fresh kernel; return it with outputs and widget state.

    Raises nbclient's ``CellExecutionError`` (with the cell and its traceback) when a cell fails.
    """
    notebook = nbformat.read(path, as_version=4)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    client = Client(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd or path.parent)}},
        store_widget_state=True,
    )
    client.execute(env=env)
    _drop_widget_code(notebook)
    return notebook


def _drop_widget_code(notebook: nbformat.NotebookNode) -> None:
    """Keep the saved widget state, without the JavaScript of each plotly ``FigureWidget``.

    An anywidget model saves its front-end code (``_esm``: plotly.js, 5 MB) in the state of every
    instance; the controls' state stays, and the figure itself is the PNG kept beside the widget.
    """
    state = notebook.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    for model in state.get("state", {}).values():
        if model.get("model_name") == "AnyModel":
            for code in ("_esm", "_css"):
                model["state"].pop(code, None)


def to_html(notebook: nbformat.NotebookNode, path: Path) -> Path:
    """Write the notebook as HTML that renders offline: PNGs for figures and for the explorer."""
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    exporter = HTMLExporter(
        config=Config({"NbConvertBase": {"display_data_priority": STATIC_PRIORITY}}),
        extra_template_paths=[str(Path(__file__).resolve().parent)],
        template_file="offline.html.j2",
    )
    body, _ = exporter.from_notebook_node(notebook)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, default=NOTEBOOKS)
    parser.add_argument("--in-place", action="store_true", help="save the outputs into the notebooks")
    parser.add_argument("--html", type=Path, help="folder for an offline HTML export of each notebook")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.notebooks:
        start = time.monotonic()
        try:
            with tempfile.TemporaryDirectory() as work:  # what a notebook writes stays out of the docs
                notebook = execute(path, cwd=Path(work))
        except CellExecutionError as error:
            failed += 1
            print(f"{path.name}: failed after {time.monotonic() - start:.0f} s\n{error}")
            continue
        print(f"{path.name}: ran in {time.monotonic() - start:.0f} s")
        if args.in_place:
            nbformat.write(notebook, path)
        if args.html:
            to_html(notebook, args.html / path.with_suffix(".html").name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
