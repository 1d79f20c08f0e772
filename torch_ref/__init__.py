"""mmdet's own GHM RetinaNet, built from the config file mmdet ships."""
from torch_ref.reference import (CONFIG_RELPATH, build_reference, config_path, load_checkpoint,
                                 load_config, load_mmdet_state_dict, randomize_statistics,
                                 synthesize_checkpoint)

__all__ = ["CONFIG_RELPATH", "build_reference", "config_path", "load_checkpoint", "load_config",
           "load_mmdet_state_dict", "randomize_statistics", "synthesize_checkpoint"]
