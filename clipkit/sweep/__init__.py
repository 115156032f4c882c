"""``clipkit sweep``: a recipe against its variants over seeds, each run evaluated with a suite.

``spec`` reads the sweep file and expands its variants (named, grid, random); ``runner`` runs
each (variant, seed) in its own process and resumes after a kill; ``job`` is that process;
``report`` writes the results table, the mean ± std / z summary and the plot.
"""

from clipkit.sweep.runner import Options, run_sweep
from clipkit.sweep.spec import Sweep, SweepError, load_sweep

__all__ = ["Options", "Sweep", "SweepError", "load_sweep", "run_sweep"]
