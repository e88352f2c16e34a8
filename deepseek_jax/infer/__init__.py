"""Inference: scoring a token file today (score.py); generation with the latent KV cache next.

Everything here is a library under `model/` and `convert/` (checkpoint loading); the command-line
tools that drive it (`python -m deepseek_jax.score`) live at the package root.
"""
