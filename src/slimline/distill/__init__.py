"""Knowledge distillation: recover a compressed model from the model it was."""
