"""ikos.ipc layer."""
