"""stiefel_peft: optimization on the Stiefel manifold and FoRA for parameter-efficient fine-tuning."""

__version__ = "0.1.0"

__all__ = ["__version__"]
