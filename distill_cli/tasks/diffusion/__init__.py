"""Diffusion and flow step distillation (task=diffusion): the task, stored pairs, objectives."""
