"""Training: batches of chat examples and documents, and the one shared training loop."""
