"""Language-model distillation (task=lm): token data, tokenizers, objectives."""
