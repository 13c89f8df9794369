"""TFF learning: the training and evaluation processes, the model aggregator,
differential privacy and the one task builder."""
