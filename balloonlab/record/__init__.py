"""Recording: the sampler of many guests, its columnar buffers, and Parquet run folders.

``sampler`` runs one task per guest, reads each report once (``report_clock`` times the
reads to the guest's period; a per-sampler classifier decides what is new), and records
samples and events; ``buffer`` keeps rows column by column and builds frames on demand with
the schema's dtypes; ``store`` streams them to a run folder and loads it back.
"""

from balloonlab.record.guest_side import SamplingState
from balloonlab.record.sampler import Sampler
from balloonlab.record.store import Run, load_run, new_run_dir

__all__ = ["Run", "Sampler", "SamplingState", "load_run", "new_run_dir"]
