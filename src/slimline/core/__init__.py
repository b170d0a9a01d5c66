"""The recipe engine: configs, registry, recipe, targets, calibration, checkpoints."""
