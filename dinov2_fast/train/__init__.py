"""DINOv2's self-supervised training: data and multi-crop augmentation, masking, losses,
schedules, the student/teacher step (``fast`` and ``baseline`` implementations) and the loop."""
