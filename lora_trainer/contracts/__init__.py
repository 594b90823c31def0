"""The typed contracts between the loop and what plugs into it (backbones)."""
