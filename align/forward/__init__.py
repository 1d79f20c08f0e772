"""Forward stage: identical input through mmdet's model and ours, every output diffed."""
