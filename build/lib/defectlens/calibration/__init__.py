"""Pure score maths: thresholds (good-only and labelled rules), the calibration record, the
symmetry term and defect typing. It knows nothing of detectors or model files.

Import from the modules: ``settings`` (CalibrationSettings, the rule names), ``calibrate``
(calibrate_scores), ``record`` (Calibration), ``strategies``, ``symmetry``, ``defect_types``.
The package itself imports nothing, so reading the settings does not load SciPy.
"""
