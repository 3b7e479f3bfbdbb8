"""Self-contained HTML reports: headings, text, tables, plotly figures and images in one file.

The file embeds plotly.js once and every image as a base64 PNG, so it opens offline, can be
mailed, and keeps no link to the store it was made from.

>>> import pandas as pd
>>> report = Report("attnlens demo")
>>> report.heading("Segmentation")
>>> report.table(pd.DataFrame({"method": ["RefAM"], "mIoU": [0.5]}), notes={"mIoU": "mean IoU"})
>>> "<table" in report.html() and "<dt>mIoU</dt><dd>mean IoU</dd>" in report.html()
True
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

__all__ = ["Report", "markdown_table"]

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; }
.wide { max-width: 100%; overflow-x: auto; margin: 0.5rem 0 0.5rem; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
td.text { text-align: left; max-width: 28rem; }
dl.columns { font-size: 0.85rem; color: #444; margin: 0 0 1.5rem; display: grid;
             grid-template-columns: max-content 1fr; gap: 0.15rem 1rem; }
dl.columns dt { font-family: ui-monospace, monospace; } dl.columns dd { margin: 0; }
table.gallery td { text-align: center; font-size: 0.8rem; }
table.gallery td:first-child { text-align: left; max-width: 14rem; }
img.px { image-rendering: pixelated; border: 1px solid #ccc; }
.note { color: #555; }
"""


class Report:
    """An HTML report built section by section, then written with :meth:`save`."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._parts: list[str] = []
        self._plotly_embedded = False

    def heading(self, text: str, level: int = 2) -> None:
        self._parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, paragraph: str, note: bool = False) -> None:
        css = ' class="note"' if note else ""
        self._parts.append(f"<p{css}>{html.escape(paragraph)}</p>")

    def table(self, frame: pd.DataFrame, floats: str = "{:.3f}", notes: dict[str, str] | None = None) -> None:
        """A table that scrolls sideways on narrow screens, followed by what its ``notes`` columns mean."""
        table = frame.to_html(
            index=False,
            border=0,
            float_format=floats.format,
            na_rep="—",
            escape=True,
            table_id=f"t{len(self._parts)}",
        )
        # words read from the left, numbers line up on the right
        text = [i + 1 for i, c in enumerate(frame.columns) if frame[c].dtype.kind not in "biufc"]
        cells = ", ".join(
            f"#t{len(self._parts)} td:nth-child({i}), #t{len(self._parts)} th:nth-child({i})" for i in text
        )
        style = f"<style>{cells} {{ text-align: left; }}</style>" if text else ""
        self._parts.append(f'{style}<div class="wide">{table}</div>')
        if notes:
            items = "".join(
                f"<dt>{html.escape(str(c))}</dt><dd>{html.escape(notes[c])}</dd>"
                for c in frame.columns
                if c in notes
            )
            self._parts.append(f'<dl class="columns">{items}</dl>')

    def figure(self, fig: Any) -> None:
        """A plotly figure; plotly.js is embedded with the first one."""
        self._parts.append(fig.to_html(full_html=False, include_plotlyjs=not self._plotly_embedded))
        self._plotly_embedded = True

    def images(self, images: list[tuple[np.ndarray, str]], width: int = 128) -> None:
        """One row of ``(H, W[, 3])`` images (uint8, or float in ``[0, 1]``), each under its caption."""
        self.gallery([caption for _, caption in images], [(None, [a for a, _ in images])], width=width)

    def gallery(
        self, columns: list[str], rows: list[tuple[str | None, list[np.ndarray]]], width: int = 96
    ) -> None:
        """A table of images, aligned: one row per ``(caption, images)``, one named column per image.

        Rows whose caption is ``None`` have no caption cell (when none has one).
        """
        captioned = any(caption is not None for caption, _ in rows)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ([""] if captioned else []) + columns)
        body = []
        for caption, images in rows:
            cells = [f"<td>{html.escape(caption or '')}</td>"] if captioned else []
            cells += [
                f'<td><img class="px" width="{width}" src="data:image/png;base64,{_png(a)}"></td>'
                for a in images
            ]
            body.append("<tr>" + "".join(cells) + "</tr>")
        self._parts.append(
            f'<div class="wide"><table class="gallery"><tr>{head}</tr>{"".join(body)}</table></div>'
        )

    def html(self) -> str:
        title = html.escape(self.title)
        body = "\n".join(self._parts)
        return (
            f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{title}</h1>\n{body}\n</body></html>"
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.html(), encoding="utf-8")
        return path


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table, floats to three decimals (for cards and BENCHMARKS.md).

    >>> print(markdown_table(pd.DataFrame({"method": ["RefAM"], "mIoU": [0.51234]})))
    | method | mIoU |
    |---|---|
    | RefAM | 0.512 |
    """

    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float | np.floating) else str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * frame.shape[1]]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _png(array: np.ndarray) -> str:
    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = np.round(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(a).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
