"""The workload panel: allocate and free memory in the guest, or play a pattern.

Patterns are :class:`~balloonlab.experiments.runner.Schedule` s of kind ``"workload"`` (steps, ramp,
sawtooth) played by the guest's workload agent (``workload.run_pattern``); every change is
recorded as a ``workload`` event by the dashboard's sampler.
"""

from __future__ import annotations

import ipywidgets as w

from balloonlab.widgets._view import bind, message_html, size_html
from balloonlab.widgets.controller import GuestController
from balloonlab.widgets.panel_state import PatternParams


def _short() -> w.Layout:
    return w.Layout(width="13em")


_STYLE = {"description_width": "7em"}


class WorkloadPanel:
    """Memory pressure in one guest; ``.widget`` is the panel.

    :param slot: the controller of the guest this panel drives.
    :param pattern: the pattern's parameters (a default one if None).
    """

    def __init__(self, slot: GuestController, pattern: PatternParams | None = None) -> None:
        self.slot = slot
        self.pattern = pattern or PatternParams()
        p = self.pattern
        self.held = w.HTML()
        self.size = w.Text(value="64M", description="size", layout=_short(), style=_STYLE)
        self.alloc_button = w.Button(description="Allocate", layout=w.Layout(width="7em"))
        self.free_button = w.Button(description="Free", layout=w.Layout(width="6em"))
        self.free_all_button = w.Button(description="Free all", layout=w.Layout(width="6em"))
        self.kind = bind(w.Dropdown(options=["steps", "ramp", "sawtooth"], description="pattern",
                                    layout=_short(), style=_STYLE), p, "kind")
        self.low = bind(w.Text(description="low", layout=_short(), style=_STYLE), p, "low")
        self.high = bind(w.Text(description="high", layout=_short(), style=_STYLE), p, "high")
        self.step_s = bind(w.FloatText(description="s per step", layout=_short(), style=_STYLE), p, "step_s")
        self.n_steps = bind(w.IntText(description="steps", layout=_short(), style=_STYLE), p, "n_steps")
        self.cycles = bind(w.IntText(description="cycles", layout=_short(), style=_STYLE), p, "cycles")
        self.run_button = w.Button(description="Run pattern", icon="play", layout=w.Layout(width="10em"))
        self.stop_button = w.Button(description="Stop", icon="stop", layout=w.Layout(width="6em"))
        self.message = w.HTML()
        self.alloc_button.on_click(lambda _b: slot.alloc(self.size.value.strip()))
        self.free_button.on_click(lambda _b: slot.free(self.size.value.strip()))
        self.free_all_button.on_click(lambda _b: slot.free(None))
        self.run_button.on_click(lambda _b: slot.run_pattern(self.pattern))
        self.stop_button.on_click(lambda _b: slot.stop_pattern())
        self.widget = w.VBox([w.HTML("<b>workload</b>"), self.held,
                              w.HBox([self.size, self.alloc_button, self.free_button, self.free_all_button]),
                              w.HBox([self.kind, self.low, self.high]),
                              w.HBox([self.step_s, self.n_steps, self.cycles]),
                              w.HBox([self.run_button, self.stop_button]), self.message],
                             layout=w.Layout(border="1px solid #ddd", padding="4px"))
        slot.observe(lambda _s: self.refresh())
        self.refresh()

    def refresh(self) -> None:
        """Copy the controller's state into the panel."""
        slot = self.slot
        running = slot.status == "running"
        held = slot.held
        self.held.value = size_html("bl-held", "held in the guest", held) + (
            " · pattern running" if slot.pattern_running else "")
        self.message.value = message_html(slot.message("workload"))
        for control in (self.alloc_button, self.free_button, self.free_all_button, self.run_button):
            control.disabled = not running or held is None
        self.stop_button.disabled = not slot.pattern_running
