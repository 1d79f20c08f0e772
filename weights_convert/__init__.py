"""Convert PyTorch checkpoints (mmdet, torchvision) into Paddle state dicts."""
from weights_convert.convert import (ConversionError, convert_mmdet_state_dict,
                                     convert_torchvision_resnet50, mmdet_to_paddle,
                                     torchvision_resnet50_to_paddle)

__all__ = ["ConversionError", "convert_mmdet_state_dict", "convert_torchvision_resnet50",
           "mmdet_to_paddle", "torchvision_resnet50_to_paddle"]
