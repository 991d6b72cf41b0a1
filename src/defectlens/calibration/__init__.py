"""Pure score maths: thresholds (good-only and labelled rules), the calibration record, the
symmetry term and defect typing. It knows nothing of detectors or model files."""

from defectlens.calibration.calibrate import GOOD_ONLY, LABELLED, STRATEGIES, CalibrationSettings, calibrate_scores
from defectlens.calibration.record import Calibration, threshold_table_text

__all__ = ["GOOD_ONLY", "LABELLED", "STRATEGIES", "Calibration", "CalibrationSettings", "calibrate_scores", "threshold_table_text"]
