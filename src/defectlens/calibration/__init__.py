"""Thresholds and score normalisation: good-only and labelled strategies (see each module)."""

from .calibrate import GOOD_ONLY, LABELLED, STRATEGIES, CalibrationSettings, calibrate_scores
from .fitting import SCHEMES, ScoredImages, calibrate_bundle, fit_calibrated, kfold_scores, score_images, single_image_views
from .record import Calibration, threshold_table_text

__all__ = [
    "GOOD_ONLY", "LABELLED", "SCHEMES", "STRATEGIES", "Calibration", "CalibrationSettings", "ScoredImages",
    "calibrate_bundle", "calibrate_scores", "fit_calibrated", "kfold_scores", "score_images",
    "single_image_views", "threshold_table_text",
]
