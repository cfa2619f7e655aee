"""Classification distillation: (x, y) batches, class logits, accuracy/NLL/ECE/agreement
(`task.py`); its report columns (`columns.py`, torch-free so `distill-report` starts fast)."""
