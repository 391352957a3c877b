"""ikos."""
