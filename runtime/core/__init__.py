"""The sampling math: noise schedule, samplers, per-image noise streams, the guided U-Net step."""
