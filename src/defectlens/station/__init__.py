"""The station on the line: sources of parts (hot folders, cameras) watched and inspected as they arrive."""
