"""quantize methods."""
