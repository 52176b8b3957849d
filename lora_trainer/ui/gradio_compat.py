"""The few places where gradio 3.41 (AUTOMATIC1111), 4.40 (Forge) and 5.x/6.x (standalone) differ.

The tab is written once against the common API; every difference it meets goes through a helper here, so a
new gradio line means editing this file only.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence

import gradio as gr


def gradio_major() -> int:
    try:
        return int(str(gr.__version__).split(".")[0])
    except ValueError:  # pragma: no cover - a development build with an odd version string
        return 4


def update(**changes: Any) -> Any:
    """A partial update of a component's properties (3.x also had ``Component.update``; 4.x removed it)."""
    return gr.update(**changes)


def no_change() -> Any:
    """An output value that leaves the component as it is."""
    return gr.update()


def in_page_hidden() -> Any:
    """``visible`` for a component that page scripts use but users never see: 3.x/4.x keep a ``visible=False``
    component in the page (hidden); from 5.x only ``"hidden"`` does (False leaves it out of the page)."""
    return "hidden" if gradio_major() >= 5 else False


def js_kwargs(code: Optional[str]) -> Dict[str, str]:
    """Client-side JavaScript for an event: ``_js=`` in 3.x, ``js=`` from 4.0."""
    if not code:
        return {}
    return {"_js": code} if gradio_major() < 4 else {"js": code}


def quiet_progress() -> Dict[str, Any]:
    """No spinner over the outputs (polling would make them flicker every second)."""
    return {"show_progress": "hidden"}


def poll(fn: Callable[..., Any], inputs: Sequence[Any], outputs: Sequence[Any], seconds: float, blocks: Any) -> None:
    """Call ``fn`` every ``seconds`` while the page is open; call inside the ``with blocks:`` context.

    gradio >= 4.40 has ``gr.Timer``; older versions repeat a load event with ``every=`` (needs the queue,
    which the WebUI enables and ``standalone`` turns on).
    """
    if hasattr(gr, "Timer"):
        gr.Timer(seconds).tick(fn, inputs=list(inputs), outputs=list(outputs), **quiet_progress())
    else:
        blocks.load(fn, inputs=list(inputs), outputs=list(outputs), every=seconds, **quiet_progress())


def file_path(value: Any) -> Optional[str]:
    """The local path of an uploaded file: a path string from 4.0, a tempfile wrapper (``.name``) in 3.x."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path") or value.get("name")
    return getattr(value, "path", None) or getattr(value, "name", None)


def dataframe_kwargs(headers: List[str]) -> Dict[str, Any]:
    """A read-only table with these columns (3.41's ``max_rows`` and 6.x's ``column_count`` are avoided)."""
    return {"headers": headers, "interactive": False, "wrap": True}


def editable_table_kwargs(headers: List[str], read_only_columns: Sequence[int] = ()) -> Dict[str, Any]:
    """An editable text table with exactly these columns; ``read_only_columns`` stay fixed where the version
    can (6.x's ``static_columns``). Fixed column counts: ``col_count=(n, "fixed")`` before 6.0, then
    ``column_count``."""
    count = len(headers)
    kwargs: Dict[str, Any] = {"headers": list(headers), "interactive": True, "wrap": True, "datatype": ["str"] * count}
    if gradio_major() >= 6:
        kwargs["column_count"] = count
        if read_only_columns and "static_columns" in inspect.signature(gr.Dataframe.__init__).parameters:
            kwargs["static_columns"] = list(read_only_columns)
    else:
        kwargs["col_count"] = (count, "fixed")
    return kwargs


def table_value(headers: List[str], rows: Sequence[Sequence[Any]]) -> Any:
    """A Dataframe value every version shows the same, also when empty (a pandas frame with the columns)."""
    import pandas as pd

    return pd.DataFrame([list(r) for r in rows], columns=list(headers))


def selected_row(evt: Any) -> Optional[int]:
    """The row index of a Dataframe ``select`` event (``index`` is [row, col] in every version)."""
    index = getattr(evt, "index", None)
    if isinstance(index, (list, tuple)) and index:
        return int(index[0])
    return int(index) if isinstance(index, int) else None


def table_rows(value: Any) -> List[List[Any]]:
    """A Dataframe input as a list of rows, whether it arrives as pandas, a dict or lists."""
    if value is None:
        return []
    if hasattr(value, "values") and hasattr(value, "columns"):  # pandas DataFrame
        return [list(r) for r in value.values.tolist()]
    if isinstance(value, dict):
        return [list(r) for r in value.get("data", [])]
    return [list(r) for r in value]


def blocks_kwargs(css: str = "", title: str = "") -> Dict[str, Any]:
    """``gr.Blocks`` arguments: css moved from ``Blocks`` to ``launch`` in 6.0."""
    kwargs: Dict[str, Any] = {"analytics_enabled": False}
    if title:
        kwargs["title"] = title
    if css and gradio_major() < 6:
        kwargs["css"] = css
    return kwargs


def launch_kwargs(css: str = "") -> Dict[str, Any]:
    """``launch`` arguments that only some versions take."""
    kwargs: Dict[str, Any] = {}
    if css and gradio_major() >= 6:
        kwargs["css"] = css
    if gradio_major() >= 4:
        kwargs["show_error"] = True
    return kwargs


def enable_queue(blocks: Any) -> Any:
    """The queue (polling with ``every=`` needs it in 3.x; 4.x+ queue by default)."""
    return blocks.queue()
