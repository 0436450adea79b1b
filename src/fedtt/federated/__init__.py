"""Federated learning components (strategies, client and server apps)."""
