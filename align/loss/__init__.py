"""Loss stage: the same head outputs and ground truth through mmdet's loss and ours."""
