"""The pieces of the running WebUI this package touches, in one place.

Everything is looked up when used (the WebUI's `modules` package only exists inside the WebUI
process), and every piece can be handed in explicitly, which is how the tests run the same code
against a stand-in model without a WebUI.

The built-in Lora extension's modules are not on `sys.path`: the WebUI imports them while loading
the extension's scripts (with its folder on the path for that moment), so afterwards they can only
be found in `sys.modules` under their bare names (`networks`, `network`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any


def lora_extension_module(name: str = "networks"):
    """The built-in Lora extension's `networks` module (A1111) if the extension is loaded, else None.

    Forge's own Lora extension also registers a `networks` module, without the weight backups this
    package restores; it is recognised by what it lacks.
    """
    module = sys.modules.get(name)
    if module is None or not hasattr(module, "loaded_networks"):
        return None
    return module


def is_a1111_networks(networks) -> bool:
    return networks is not None and hasattr(networks, "network_restore_weights_from_backup")


@dataclass
class WebuiEnv:
    """Explicit handles; `WebuiEnv.current()` fills them from the running WebUI."""
    sd_model: Any = None
    state: Any = None                 # modules.shared.state
    cmd_opts: Any = None              # modules.shared.cmd_opts
    opts: Any = None                  # modules.shared.opts
    networks: Any = None              # the Lora extension's networks module (or None)
    processing: Any = None            # modules.processing
    extra_pages: list = field(default_factory=list)   # modules.ui_extra_networks.extra_pages
    call_queue: Any = None            # modules.call_queue
    devices: Any = None               # modules.devices
    sd_hijack: Any = None             # modules.sd_hijack
    prompt_parser: Any = None         # modules.prompt_parser (SdConditioning)
    models_path: str | None = None    # modules.paths.models_path
    is_forge: bool = False            # Stable Diffusion WebUI Forge (lora_trainer.webui.forge)
    memory_management: Any = None     # Forge: backend.memory_management
    data_path: str | None = None      # modules.paths.data_path (--data-dir)

    @classmethod
    def current(cls, with_model: bool = True) -> "WebuiEnv":
        """Handles of the running WebUI. Fails with a clear message outside the WebUI.
        `with_model=False` leaves `sd_model` out: reading `shared.sd_model` loads the checkpoint
        if none is loaded yet (not wanted while the UI is being built). In Forge, `with_model`
        loads the selected checkpoint if it is not yet (Forge loads at the first generation)."""
        try:
            from modules import call_queue, devices, paths, processing, prompt_parser, sd_hijack, shared
        except ImportError as e:
            raise RuntimeError("lora_trainer.webui needs a running AUTOMATIC1111 WebUI (the 'modules' "
                               f"package is not importable: {e})") from e
        try:
            from modules import ui_extra_networks
            extra_pages = ui_extra_networks.extra_pages
        except ImportError:
            extra_pages = []
        from .forge import forge_loaded_model, running_in_forge

        forge, memory_management, sd_model = running_in_forge(), None, None
        if forge:
            from backend import memory_management as forge_memory_management
            memory_management = forge_memory_management
        if with_model:
            sd_model = forge_loaded_model() if forge else shared.sd_model
        return cls(sd_model=sd_model, state=shared.state, cmd_opts=shared.cmd_opts,
                   opts=shared.opts, networks=lora_extension_module(), processing=processing,
                   extra_pages=extra_pages, call_queue=call_queue, devices=devices, sd_hijack=sd_hijack,
                   prompt_parser=prompt_parser, models_path=paths.models_path, is_forge=forge,
                   memory_management=memory_management,
                   data_path=getattr(paths, "data_path", None))

    def option(self, name: str, default=None):
        if self.opts is None:
            return default
        value = getattr(self.opts, name, default)
        return default if value is None else value

    def cmd_option(self, name: str, default=None):
        return getattr(self.cmd_opts, name, default) if self.cmd_opts is not None else default


def refresh_lora_cards(env, networks) -> str:
    """Make the WebUI (A1111 or Forge) list files just written: refresh the Lora cards page when the
    UI has one, else rescan the Lora folder. Returns what was done, for the job's log line."""
    page = next((p for p in env.extra_pages if getattr(p, "name", "") == "lora"), None)
    if page is not None:
        page.refresh()
        return "refreshed the Lora cards"
    if hasattr(networks, "list_available_networks"):
        networks.list_available_networks()
        return "rescanned the Lora folder"
    return ""
