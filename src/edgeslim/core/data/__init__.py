"""Datasets (MNIST subset, npz arrays) split into train / val / test."""
