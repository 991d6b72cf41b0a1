"""DefectLens: learn a good part from photos of good parts, then find defects in new ones."""

__version__ = "0.1.0"

from .bundle import Bundle  # noqa: E402
from .data import load_dataset  # noqa: E402
from .detectors import available_detectors, create_detector  # noqa: E402
from .errors import DefectLensError  # noqa: E402
from .inspection import Inspection, Region  # noqa: E402
from .inspector import Inspector  # noqa: E402

__all__ = ["Bundle", "DefectLensError", "Inspection", "Inspector", "Region", "__version__", "available_detectors", "create_detector", "load_dataset"]
