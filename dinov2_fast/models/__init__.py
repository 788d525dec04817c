"""DINOv2-compatible backbones and heads built from dinov2_fast.nn."""
