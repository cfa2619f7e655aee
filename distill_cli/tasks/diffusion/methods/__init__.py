"""The diffusion objectives (StepObjective subclasses), one file per method; their YAMLs are
distill_cli/conf/loss/<name>.yaml."""
