"""The service registry, service discovery and the dependency graph of the tree."""
