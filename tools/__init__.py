"""Command-line tools around training runs: plotting, logging helpers."""
