"""The `ghostvis` command line: renders and launches; all decisions live in ghostvis_core."""
