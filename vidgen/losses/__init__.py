"""Losses: reconstruction (L1, KL), perceptual (LPIPS), adversarial (hinge, LeCam, R1)."""
