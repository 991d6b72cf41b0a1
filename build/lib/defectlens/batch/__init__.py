"""Inspecting many images: where it runs (engines), and what it writes (outputs, Parquet)."""

ENGINES = ("local", "ray")  # here, so the command line can offer them without loading a model
