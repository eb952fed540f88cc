"""Center-wise positives: features, K-means, kNN, selection, the online round."""
