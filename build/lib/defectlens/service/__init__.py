"""The inspection station service: REST API, web dashboard and inspection history.

Imported only by ``defectlens serve`` and its tests, so the library and the command line never
pay for FastAPI or SQLAlchemy at import time.
"""
