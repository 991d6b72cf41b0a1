"""The verbs users run (fit, select, calibrate), free of command-line and output formatting."""

from .selection import Candidate, CandidateResult, Selection, candidates, select_detector

__all__ = ["Candidate", "CandidateResult", "Selection", "candidates", "select_detector"]
