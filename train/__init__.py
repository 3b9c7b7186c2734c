"""What runs on every rank: data preparation, the packed loader, the engine."""
