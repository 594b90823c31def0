"""Which base-model components a run no longer needs in memory once its caches are filled."""
from __future__ import annotations


def parkable_components(cfg, samples, backbone) -> list[str]:
    """Components the backbone may take out of memory after caching (see DiffusersBackbone.park).

    The VAE when every latent is cached (no random_crop); the text encoders when every caption's
    embedding is (not trained, no shuffle_caption, cached latents). A backbone without ``park``
    (the WebUI's: the model belongs to the WebUI, which needs it afterwards) parks nothing.
    """
    if not hasattr(backbone, "park"):
        return []
    names = []
    if cfg.offload_vae_after_caching and samples.cache_latents:
        names.append("vae")
    if cfg.free_text_encoders_after_caching and samples.conditioning_all_cached:
        names += ["text_encoder", "text_encoder_2"][:len(backbone.text_encoders)]
    return names
