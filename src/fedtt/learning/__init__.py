"""One model, no federation: tokenised batches, the local training step and evaluation (no Flower imports)."""
