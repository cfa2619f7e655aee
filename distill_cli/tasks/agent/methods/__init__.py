"""The agent task's forms of the LM objectives (config: recipe_loss/agent_toolcalc_*.yaml)."""
