"""Broker fixtures (filled in by the network-core work)."""
