"""The model: what every layer above agrees on, with no backend, file format or UI in it.

Errors (``errors``), sizes and units (``units``), the one table of balloon statistics and
frame columns (``schema``), the stats record and its parsers (``stats``), per-reader
classification of reports (``classify``), the polling period's limits (``period``), the
balloon logic every backend shares (``balloon``), the guest protocol every backend implements
(``protocols``, ``guest``), and small host helpers (``procfs``, ``files``, ``deadline``).
It imports nothing from balloonlab's other packages.
"""

from balloonlab.model.balloon import BalloonBase, BalloonChange, SettleResult
from balloonlab.model.classify import StatsClassifier
from balloonlab.model.errors import BalloonLabError
from balloonlab.model.period import validate_period
from balloonlab.model.protocols import AgentProtocol, BalloonProtocol, GuestProtocol
from balloonlab.model.stats import BalloonStats

__all__ = ["AgentProtocol", "BalloonBase", "BalloonChange", "BalloonLabError", "BalloonProtocol",
           "BalloonStats", "GuestProtocol", "SettleResult", "StatsClassifier", "validate_period"]
