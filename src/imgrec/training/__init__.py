"""Training: the loop, augmentation, recipes and the training record."""
