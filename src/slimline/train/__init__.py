"""The one training loop (plain or under ``torchrun``) and its losses, used by ``qat``."""
