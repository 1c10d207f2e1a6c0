"""The balloon panel: a target slider (and exact size box), the stats period, and ``actual``.

``actual`` is what the library last saw (BALLOON_CHANGE events, queries); the panel is
refreshed on every event and by the dashboard's timer.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as w

from balloonlab.model.units import format_size
from balloonlab.widgets._view import message_html, size_html
from balloonlab.widgets.controller import GuestController

MiB = 1 << 20
#: The slider's lowest target: a smaller guest runs out of memory for its own kernel.
MIN_TARGET_MIB = 64


class BalloonPanel:
    """Drive one guest's balloon; ``.widget`` is the panel.

    :param slot: the controller of the guest this panel drives.
    """

    def __init__(self, slot: GuestController) -> None:
        self.slot = slot
        self.actual = w.HTML()
        self.slider = w.IntSlider(value=512, min=MIN_TARGET_MIB, max=512, step=16, description="target MiB",
                                  continuous_update=False, disabled=True, layout=w.Layout(width="36em"),
                                  style={"description_width": "8em"})
        self.size = w.Text(placeholder="exact size, e.g. 300M", layout=w.Layout(width="12em"))
        self.set_button = w.Button(description="Set target", layout=w.Layout(width="8em"))
        self.period = w.IntText(value=1, description="stats period s", layout=w.Layout(width="14em"),
                                style={"description_width": "8em"})
        self.period_button = w.Button(description="Set period", layout=w.Layout(width="8em"))
        self.message = w.HTML()
        self._syncing = False
        self._shown_target: int | None = None
        self._shown_period: int | None = None
        self.slider.observe(self._on_slider, names="value")
        self.set_button.on_click(lambda _b: slot.set_target(self.size.value.strip()))
        self.period_button.on_click(lambda _b: slot.set_period(self.period.value))
        self.widget = w.VBox([w.HTML("<b>balloon</b>"), self.actual, self.slider,
                              w.HBox([self.size, self.set_button, self.period, self.period_button]),
                              self.message], layout=w.Layout(border="1px solid #ddd", padding="4px"))
        slot.observe(lambda _s: self.refresh())
        self.refresh()

    def _on_slider(self, change: dict[str, Any]) -> None:  # a traitlets change: new is the slider's int
        if not self._syncing:
            self.slot.set_target(int(change["new"]) * MiB)

    def refresh(self) -> None:
        """Copy the controller's state into the panel."""
        slot = self.slot
        running = slot.status == "running"
        period = slot.period_s
        self.actual.value = (size_html("bl-actual", "actual", slot.actual) + " · "
                             + size_html("bl-target", "target", slot.target) + " · period "
                             + (f"{period} s" if period is not None else "NA"))
        self.message.value = message_html(slot.message("balloon"))
        for control in (self.slider, self.set_button, self.period_button):
            control.disabled = not running
        memory = slot.memory_bytes
        target = slot.target if slot.target is not None else slot.actual
        if running and memory is not None and (target != self._shown_target or self.slider.max != memory // MiB):
            self._syncing = True  # moving the slider to show the state must not send a target
            try:
                self.slider.max = max(MIN_TARGET_MIB, memory // MiB)
                if target is not None:
                    self.slider.value = min(self.slider.max, max(self.slider.min, round(target / MiB)))
                self._shown_target = target
            finally:
                self._syncing = False
        if running and period is not None and period != self._shown_period:
            self.period.value = self._shown_period = period
        self.slider.tooltip = f"guest memory {format_size(memory)}" if memory else None
