"""Losses as pure functions of parameters/pytrees: denoising, VSD, consistency distillation, latent reward."""
