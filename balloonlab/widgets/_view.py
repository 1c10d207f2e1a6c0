"""What the panels share: HTML status lines, numbers tagged for tests, widget<->params binding.

Values are tagged with ``data-*`` attributes (``data-bytes``, ``data-samples``) so a browser
test reads the number the panel shows without parsing formatted text.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as w

from balloonlab.model.units import format_size
from balloonlab.widgets.panel_state import GuestPanelState, Message

_COLORS = {"info": "#555", "ok": "#1a7f37", "warning": "#9a6700", "error": "#cf222e"}
_STATUS_COLORS = {"running": "#1a7f37", "launching": "#9a6700", "stopping": "#9a6700",
                  "failed": "#cf222e", "exited": "#cf222e"}


def message_html(message: Message | None) -> str:
    """A panel's last message, coloured by level; details fold away under it."""
    if message is None:
        return ""
    text = (f'<span class="bl-message bl-{message.level}" style="color:{_COLORS[message.level]}">'
            f"{html.escape(message.text)}</span>")
    if message.details:
        text += (f'<details style="font-size:85%"><summary>details</summary>'
                 f'<pre style="white-space:pre-wrap;max-height:12em;overflow:auto">'
                 f"{html.escape(message.details)}</pre></details>")
    return text


def status_html(slot: GuestPanelState) -> str:
    """``name: status`` with the state coloured."""
    color = _STATUS_COLORS.get(slot.status, "#555")
    return (f'<b>{html.escape(slot.name)}</b>: <span class="bl-status" data-status="{html.escape(slot.status)}" '
            f'style="color:{color}">{html.escape(slot.status)}</span>')


def size_html(css_class: str, label: str, nbytes: int | None) -> str:
    """``label 256 MiB`` with the exact bytes in ``data-bytes`` (empty when unknown)."""
    data = "" if nbytes is None else str(int(nbytes))
    return (f'{html.escape(label)} <span class="{css_class}" data-bytes="{data}">'
            f"<b>{html.escape(format_size(nbytes))}</b></span>")


def bind(widget: w.ValueWidget, params: Any, attr: str) -> w.ValueWidget:
    """Keep ``params.attr`` equal to the widget's value (the params object is the state)."""
    widget.value = getattr(params, attr)
    widget.observe(lambda change: setattr(params, attr, change["new"]), names="value")
    return widget


def run_safely(action: Any) -> Any:
    """Wrap a widget callback so nothing it raises escapes into the kernel's output."""
    def handler(*_args: object) -> None:
        try:
            action()
        except Exception:  # the controller already turned errors into messages; this is a bug guard
            import logging
            logging.getLogger(__name__).exception("dashboard callback failed")
    return handler
