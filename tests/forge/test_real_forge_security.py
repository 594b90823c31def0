"""The outside attacks of tests/webui/test_real_webui_security.py (the same test functions, imported)
against a real Forge started with --listen (and without --enable-insecure-extension-access): the
gradio 4 JSON route and the tab's buttons called by fn_index refuse outside folders, traversal in
names, and never echo a file's content. Skipped without LORA_TRAINER_FORGE_DIR (see forge_harness);
one Forge server of its own."""
from __future__ import annotations

import pytest
from forge_harness import FORGE_DIR, SKIP_REASON, forge_data, start_forge, stop_forge  # noqa: F401 (fixture)
from test_real_webui_security import (listening_site, test_json_route_refuses_outside_paths,  # noqa: F401
                                      test_save_and_load_a_preset_by_name,
                                      test_save_preset_by_fn_index_stays_in_the_presets_folder,
                                      test_start_button_by_fn_index_follows_the_same_rules)

pytestmark = pytest.mark.skipif(not FORGE_DIR, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def listening(forge_data, tmp_path_factory):
    log = tmp_path_factory.mktemp("forge-listen") / "forge.log"
    with listening_site(tmp_path_factory, forge_data, lambda extra_args: start_forge(forge_data, log, extra_args),
                        stop_forge) as site:
        yield site
