"""Training: the conditional U-Net, data loading and the DDPM training loop (torch)."""
