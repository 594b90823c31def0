// Train LoRA tab (lora_trainer): the copy button, small layout helpers and, in the WebUI, refreshing
// the Lora cards when a run ends. The WebUI injects this file into every page; `lora-trainer ui` runs it
// once on page load. Everything is attached to `window` explicitly so both ways behave the same.
(function () {
    "use strict";

    function root() {
        if (typeof gradioApp === "function") {
            return gradioApp();
        }
        var app = document.querySelector("gradio-app");
        return (app && app.shadowRoot) || document;
    }

    // Clipboard API where the page is a secure context (localhost, https); otherwise the old
    // textarea + execCommand way (e.g. `lora-trainer ui --listen` opened over plain http).
    function copyText(text) {
        if (navigator.clipboard && window.isSecureContext) {
            return navigator.clipboard.writeText(text).then(function () { return true; },
                                                            function () { return legacyCopy(text); });
        }
        return Promise.resolve(legacyCopy(text));
    }

    function legacyCopy(text) {
        var area = document.createElement("textarea");
        area.value = text;
        area.setAttribute("readonly", "");
        area.style.position = "fixed";
        area.style.opacity = "0";
        document.body.appendChild(area);
        area.select();
        var ok = false;
        try {
            ok = document.execCommand("copy");
        } catch (e) {
            ok = false;
        }
        document.body.removeChild(area);
        return ok;
    }

    function flash(buttonId, ok) {
        var button = buttonId ? root().querySelector("#" + buttonId) : null;
        if (!button) {
            return;
        }
        var original = button.getAttribute("data-label") || button.textContent;
        button.setAttribute("data-label", original);
        button.textContent = ok ? "Copied!" : "Copy failed";
        button.classList.toggle("lora-trainer-copied", ok);
        clearTimeout(button._loraTrainerTimer);
        button._loraTrainerTimer = setTimeout(function () {
            button.textContent = original;
            button.classList.remove("lora-trainer-copied");
        }, 1500);
    }

    window.loraTrainerCopy = function (text, buttonId) {
        text = text || "";
        if (!text) {
            flash(buttonId, false);
            return;
        }
        window.loraTrainerLastCopied = text;
        copyText(text).then(function (ok) { flash(buttonId, ok); });
    };

    // Keep the newest line of the training log in view (the textarea is replaced on updates, so
    // this looks for it each time rather than holding a reference).
    function scrollLog() {
        var area = root().querySelector("#lora_trainer_log textarea");
        if (area && area.value !== area._loraTrainerLast) {
            area._loraTrainerLast = area.value;
            area.scrollTop = area.scrollHeight;
        }
    }

    // Inside the WebUI: when a run ends (finished or stopped, as this page's progress box shows it),
    // refresh the Lora cards of txt2img and img2img. The WebUI builds their HTML once and only
    // rebuilds it on the extra-networks Refresh button, so the new LoRA (and its thumbnail) would
    // not show otherwise. This presses the same hidden button that Refresh presses.
    var ENDED = ["finished", "stopped"];
    var lastRun = null;

    function refreshLoraCards() {
        window.loraTrainerCardRefreshes = (window.loraTrainerCardRefreshes || 0) + 1;
        ["txt2img", "img2img"].forEach(function (tabname) {
            var button = root().querySelector("#" + tabname + "_lora_extra_refresh_internal");
            if (button) {
                button.dispatchEvent(new Event("click"));
            }
        });
    }

    function watchRunEnd() {
        var box = root().querySelector("#lora_trainer_progress .lora-trainer-progress");
        if (!box) {
            return;
        }
        var now = {run: box.getAttribute("data-run") || "", status: box.getAttribute("data-status") || ""};
        var before = lastRun;
        lastRun = now;
        if (before && (before.run !== now.run || before.status !== now.status) &&
                ENDED.indexOf(now.status) >= 0) {
            refreshLoraCards();
        }
    }

    function everySecond() {
        scrollLog();
        watchRunEnd();
    }

    if (!window.loraTrainerLogTimer) {
        window.loraTrainerLogTimer = setInterval(everySecond, 1000);
    }
})();
