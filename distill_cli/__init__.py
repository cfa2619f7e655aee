"""distill_cli: knowledge-distillation experiment runner."""
__version__ = "0.1.0"
