"""Running the model: sampling, batched generation with the latent cache, MTP speculative decoding."""
