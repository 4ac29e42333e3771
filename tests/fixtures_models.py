"""Model fixtures (filled in by the model-lifecycle work)."""
