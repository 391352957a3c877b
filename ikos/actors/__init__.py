"""ikos.actors layer."""
