"""Agent-trajectory distillation (task=agent): a synthetic tool-use task with a calculator."""
