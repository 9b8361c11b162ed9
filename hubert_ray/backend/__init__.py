"""The only package that imports Ray: the extraction and units jobs wired into Ray Data.

Importing it (as every Ray worker that runs one of its tasks or actors does) makes this
process report its storage retries to the run's tally.
"""

from hubert_ray.backend import progress
from hubert_ray.io import storage

storage.on_retries(progress.report_retries)
