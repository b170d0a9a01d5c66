"""prune methods."""
