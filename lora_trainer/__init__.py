"""lora_trainer: train Stable Diffusion LoRAs headless or inside the WebUI."""
__version__ = "0.1.0"
