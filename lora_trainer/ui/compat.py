"""Everything that differs between gradio 3.41 (what A1111 WebUI v1.10 pins) and gradio 4+/latest.

The rest of the UI calls these helpers instead of gradio directly wherever the two disagree, and
uses only public gradio API (no private modules, no internals):

- keyword arguments a component does not know are dropped (`make`), so e.g. `Gallery(columns=)`
  or `LinePlot(y_lim=)` can be asked for on every version;
- event JavaScript is `_js=` on 3.x and `js=` on 4+ (`js_kwargs`);
- periodic refresh is a per-page generator on 3.x and `gr.Timer(...).tick` on 4.40+ (`poll`);
- the queue's concurrency argument changed name (`enable_queue`);
- page CSS is a Blocks argument before gradio 6 and a launch() argument since (`blocks`, `launch`).
"""
from __future__ import annotations

import inspect
import logging
import re
import time
from typing import Any, Callable

import gradio as gr


def _major(version: str) -> int:
    match = re.match(r"(\d+)", version or "")
    return int(match.group(1)) if match else 0


GRADIO_VERSION: str = getattr(gr, "__version__", "0")
GRADIO_MAJOR: int = _major(GRADIO_VERSION)
IS_GRADIO_3: bool = GRADIO_MAJOR < 4
HAS_TIMER: bool = hasattr(gr, "Timer")


def named_parameters(func: Callable) -> set[str]:
    """Explicitly named parameters of `func` (gradio 3 components also take **kwargs, which only
    warn about unknown names, so those do not count)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def supported(func: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    names = named_parameters(func)
    return {k: v for k, v in kwargs.items() if k in names}


def make(cls, **kwargs):
    """`cls(**kwargs)` without the keyword arguments this gradio's `cls` does not have."""
    return cls(**supported(cls.__init__, kwargs))


def update(**kwargs):
    """A partial update of a component's value or properties (`gr.update` exists on 3.x and 4+)."""
    return gr.update(**kwargs)


def no_change():
    return gr.update()


def js_kwargs(js: str) -> dict[str, str]:
    """The event keyword for client-side JavaScript."""
    return {"_js": js} if IS_GRADIO_3 else {"js": js}


def poll(blocks, seconds: float, step: Callable, inputs, outputs):
    """Refresh `outputs` every `seconds` while the page is open. Call inside `with blocks:`.

    `step(state, *inputs) -> (state, [outputs])` is called repeatedly; `state` (None at first) is
    private to one page, so a step can compare with what that page already shows and send
    `no_change()` for the rest.

    gradio 4.40+: a `gr.Timer` tick with the state in a `gr.State` (inputs are read fresh on each
    tick). Older gradio (3.41): `load(every=)` would call the function with the inputs the page had
    when it loaded, again and again, and with no memory between calls, so one generator per page
    loops instead, keeping the state in a local variable; its inputs are likewise the values at
    page load. It holds one queue worker per open page (the WebUI's queue has 64; the standalone
    app enables 16).
    """
    if HAS_TIMER:
        state = gr.State(None)

        def tick(current, *values):
            new_state, values_out = step(current, *values)
            return [new_state, *values_out]

        timer = gr.Timer(seconds)
        timer.tick(tick, [state, *inputs], [state, *outputs], show_progress="hidden")
        return timer

    def loop(*values):
        current = None
        while True:
            try:
                current, values_out = step(current, *values)
            except Exception:  # noqa: BLE001 - one bad refresh must not end the page's updates
                logging.getLogger("lora_trainer").exception("UI refresh failed")
                values_out = [no_change() for _ in outputs]
            yield values_out
            time.sleep(seconds)

    return blocks.load(loop, list(inputs), list(outputs), show_progress="hidden")


def on_load(blocks, fn: Callable | None, inputs=None, outputs=None, js: str | None = None):
    """Run once when the page loads (`fn` on the server and/or `js` in the browser)."""
    kwargs = js_kwargs(js) if js else {}
    return blocks.load(fn, inputs, outputs, show_progress="hidden", **kwargs)


def blocks(css: str | None = None, title: str | None = None) -> "gr.Blocks":
    """A gr.Blocks; the CSS goes here on gradio < 6 and to `launch` on gradio 6+ (see `launch`)."""
    kwargs: dict[str, Any] = {"analytics_enabled": False}
    if title:
        kwargs["title"] = title
    if css and not _css_belongs_to_launch():
        kwargs["css"] = css
    return gr.Blocks(**supported(gr.Blocks.__init__, kwargs))


def _css_belongs_to_launch() -> bool:
    return "css" in named_parameters(gr.Blocks.launch) and GRADIO_MAJOR >= 6


def enable_queue(blocks, concurrency: int = 16):
    if IS_GRADIO_3:
        return blocks.queue(concurrency_count=concurrency)
    return blocks.queue(**supported(blocks.queue, {"default_concurrency_limit": concurrency}))


def launch(blocks, host: str, port: int | None, *, css: str | None = None, block: bool = True,
           quiet: bool = False):
    """Start the server. Returns what `Blocks.launch` returns (app, local_url, share_url)."""
    kwargs: dict[str, Any] = dict(server_name=host, server_port=port, prevent_thread_lock=not block,
                                  inbrowser=False, share=False, show_api=False, quiet=quiet,
                                  show_error=True)
    if css and _css_belongs_to_launch():
        kwargs["css"] = css
    return blocks.launch(**supported(blocks.launch, kwargs))


def line_plot(**kwargs):
    """A LinePlot with only the arguments this gradio has (x, y, title, x_title, y_title, height
    and y_lim exist everywhere)."""
    return make(gr.LinePlot, **kwargs)


def component_value(component) -> Any:
    """The initial value of a component as the constructor received it."""
    return getattr(component, "value", None)
