"""Wrappers around pretrained models, one module per family (see DESIGN.md section 1)."""
