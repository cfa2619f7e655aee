"""Kinds of distillation. A task decides what a batch is, the model contract, how outputs are
evaluated and what a stored teacher output is; the rest of the runner is shared
(docs/ARCHITECTURE.md)."""
