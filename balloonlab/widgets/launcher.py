"""The launcher panel: what to launch (built-in guest or a domain XML), Launch and Shutdown.

The fields edit a :class:`~balloonlab.widgets.panel_state.LaunchParams`; the buttons call the
:class:`~balloonlab.widgets.controller.GuestController`'s actions, which run on balloonlab's
loop and report back in the panel's status line.
"""

from __future__ import annotations

import ipywidgets as w

from balloonlab.widgets._view import bind, message_html, status_html
from balloonlab.widgets.controller import GuestController

_STYLE = {"description_width": "7em"}


def _field() -> w.Layout:
    return w.Layout(width="22em")


class LauncherPanel:
    """Launch / Shutdown one guest; ``.widget`` is the panel.

    :param slot: the controller of the guest this panel drives.
    """

    def __init__(self, slot: GuestController) -> None:
        self.slot = slot
        p = slot.params
        kw = {"layout": _field(), "style": _STYLE}
        self.name = bind(w.Text(description="name", **kw), p, "name")
        kw = {"style": _STYLE}
        self.source = bind(w.ToggleButtons(options=[("built-in", "builtin"), ("XML file", "xml")],
                                           description="guest", style={"description_width": "5em",
                                                                        "button_width": "7.5em"}), p, "source")
        self.xml_path = bind(w.Text(description="domain XML", placeholder="/path/to/domain.xml", layout=_field(),
                                    **kw), p, "xml_path")
        self.image_path = bind(w.Text(description="disk image", placeholder="optional: replaces the XML's disk",
                                      layout=_field(), **kw), p, "image_path")
        self.memory = bind(w.Text(description="memory", placeholder="512M", layout=w.Layout(width="14em"), **kw),
                           p, "memory")
        self.vcpus = bind(w.BoundedIntText(description="vCPUs", min=1, max=64, layout=w.Layout(width="14em"), **kw),
                          p, "vcpus")
        self.period = bind(w.IntText(description="stats period s", layout=w.Layout(width="14em"), **kw),
                           p, "period_s")
        self.autodeflate = bind(w.Checkbox(description="autodeflate (deflate on OOM)", indent=False,
                                           layout=w.Layout(width="22em")), p, "autodeflate")
        self.free_page_reporting = bind(w.Checkbox(description="free page reporting", indent=False,
                                                   layout=w.Layout(width="22em")), p, "free_page_reporting")
        self.launch_button = w.Button(description="Launch", button_style="success", icon="play",
                                      layout=w.Layout(width="10em"))
        self.shutdown_button = w.Button(description="Shutdown", button_style="danger", icon="stop",
                                        layout=w.Layout(width="10em"))
        self.status = w.HTML()
        self.message = w.HTML()
        self.launch_button.on_click(lambda _b: slot.launch())
        self.shutdown_button.on_click(lambda _b: slot.shutdown())
        self.source.observe(lambda _c: self._show_source(), names="value")
        self._builtin_only = w.VBox([self.memory, self.vcpus, self.period, self.autodeflate,
                                     self.free_page_reporting])
        self._xml_only = w.VBox([self.xml_path, self.image_path])
        self.widget = w.VBox([self.status, self.name, self.source, self._xml_only, self._builtin_only,
                              w.HBox([self.launch_button, self.shutdown_button]), self.message],
                             layout=w.Layout(border="1px solid #ddd", padding="4px", width="24em",
                                             flex="0 0 auto"))
        self._show_source()
        slot.observe(lambda _s: self.refresh())
        self.refresh()

    def _show_source(self) -> None:
        xml = self.source.value == "xml"
        self._xml_only.layout.display = None if xml else "none"
        self._builtin_only.layout.display = "none" if xml else None

    def refresh(self) -> None:
        """Copy the controller's state into the panel (called on every change)."""
        slot = self.slot
        self.status.value = status_html(slot)
        self.message.value = message_html(slot.message("launcher"))
        editable = slot.status not in ("launching", "running", "stopping")
        for field in (self.name, self.source, self.xml_path, self.image_path, self.memory, self.vcpus,
                      self.period, self.autodeflate, self.free_page_reporting):
            field.disabled = not editable
