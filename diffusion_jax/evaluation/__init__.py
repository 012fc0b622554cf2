"""Sample-quality and likelihood evaluation: feature networks, metrics and the eval mode."""
