"""The composition root: wires config, data, a backbone, monitors, previews and cards around the
training loop (`training/`), which itself knows none of them."""
