"""The verbs users run (fit, select, calibrate), free of command-line and output formatting."""

from defectlens.workflows.fitting import (
    SCHEMES,
    ScoredImages,
    calibrate_bundle,
    calibrate_detector,
    fit_calibrated,
    kfold_scores,
    score_images,
    single_image_views,
)
from defectlens.workflows.selection import Candidate, CandidateResult, Selection, candidates, select_detector

__all__ = ["SCHEMES", "Candidate", "CandidateResult", "ScoredImages", "Selection", "calibrate_bundle", "calibrate_detector", "candidates",
           "fit_calibrated", "kfold_scores", "score_images", "select_detector", "single_image_views"]
