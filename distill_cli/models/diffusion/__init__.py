"""Diffusion / flow models: noise processes, the `Denoiser` wrapper, samplers and backbones."""
