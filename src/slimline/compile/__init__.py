"""compile methods."""
