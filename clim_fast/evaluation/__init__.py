"""What was learned: kNN accuracy, linear evaluation, class similarity, t-SNE."""
