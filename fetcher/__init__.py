"""fetcher: concurrent downloads, process-pool post-processing and parallel writes."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
