"""The "Train LoRA" tab (gradio): `lora_trainer.ui.tab.build_tab(mode, defaults) -> gr.Blocks`,
used by `lora-trainer ui` (app.py) and by the WebUI extension's scripts/. Importing this package
imports nothing heavy; gradio is only needed by tab.py, fields.py's builders and compat.py."""
