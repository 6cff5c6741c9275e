"""dit-accel: training-free acceleration for diffusion transformers on diffusers."""
