"""ikos.supervision layer."""
