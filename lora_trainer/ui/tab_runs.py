"""The Runs list of the "Train LoRA" tab: where it looks for runs, the table it shows, and how a
choice in "Run to resume" maps back to a run folder. A mixin of `tab._TabBuilder`, kept apart from
the layout and the handlers because it is the one piece with its own file-system rules.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..config import resolve_path
from ..storage.containment import inside_any
from . import compat, runs
from .worker import TrainingWorker

if TYPE_CHECKING:   # tab.py imports this module
    from .tab import TabSettings

log = logging.getLogger("lora_trainer")


class _RunsList:
    """Runs-list helpers; they read the builder's `settings`, `defaults` and `worker`."""

    # set by tab._TabBuilder (declared here for the type checker)
    settings: TabSettings
    defaults: dict
    worker: TrainingWorker

    def _default_runs_folder(self) -> Path:
        if self.settings.runs_folder:
            return Path(self.settings.runs_folder)
        run_dir = self.defaults.get("run_dir")
        if run_dir:
            return Path(resolve_path(str(run_dir), self.settings.base_dir)).parent
        return Path(self.settings.base_dir) / "runs"

    def _runs_frame(self, found):
        import pandas as pd

        return pd.DataFrame(runs.table(found), columns=runs.COLUMNS)

    def _allowed_runs_folder(self, path) -> bool:
        """Inside the WebUI the Runs list shows and resumes only runs of the extension's runs
        folder: a folder typed in the box is request input (it would list and resume anything)."""
        allowed = self.settings.runs_roots
        return allowed is None or inside_any(path, allowed) is not None

    def _runs_roots_text(self) -> str:
        return " or ".join(str(p) for p in self.settings.runs_roots or ()) or "any folder"

    def _runs_roots(self, folder: str) -> list:
        roots = []
        typed = resolve_path(folder.strip(), self.settings.base_dir) if folder and folder.strip() else None
        if typed and self._allowed_runs_folder(typed):
            roots.append(typed)
        elif typed:
            log.warning("Runs list: %s is outside %s; not listed", typed, self._runs_roots_text())
        current = self.worker.snapshot().run_dir
        if current:
            roots.append(str(Path(current).parent))
        return roots

    def _runs_found(self, folder: str):
        """(table, resumable runs newest first, as `_run_label`s)."""
        try:
            found = runs.find_runs(self._runs_roots(folder))
        except OSError as error:
            log.warning("Cannot list runs: %s", error)
            found = []
        return self._runs_frame(found), [self._run_label(r.path, folder) for r in found if r.resumable]

    def _run_label(self, run_dir, folder: str) -> str:
        """What the Run to resume list shows: the run's name when it is in the runs folder (the
        full path, e.g. <WebUI>/extensions/<extension>/runs/<name>, is too long to tell runs
        apart in the box), its full path otherwise."""
        roots = self._runs_roots(folder)
        if roots and Path(run_dir).resolve().parent == Path(roots[0]).resolve():
            return Path(run_dir).name
        return str(run_dir)

    def _run_dir_of(self, choice: str, folder: str) -> str:
        """The run folder a `_run_label` stands for."""
        if not choice or Path(choice).is_absolute():
            return choice
        for root in self._runs_roots(folder):
            if (Path(root) / choice).is_dir():
                return str(Path(root) / choice)
        return choice

    def _runs_outputs(self, folder: str, selected: Optional[str]):
        table, choices = self._runs_found(folder)
        value = selected if selected in choices else (choices[0] if choices else None)
        return table, compat.update(choices=choices, value=value)
