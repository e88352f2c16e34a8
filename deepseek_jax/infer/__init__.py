"""Inference: MLA latent KV cache with absorbed decode, batched generation, MTP speculation."""
