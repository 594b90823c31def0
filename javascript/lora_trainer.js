// Train LoRA tab (lora_trainer): the copy button and small layout helpers.
// The WebUI injects this file into every page; `lora-trainer ui` runs it once on page load.
// Everything is attached to `window` explicitly so both ways of loading behave the same.
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

    if (!window.loraTrainerLogTimer) {
        window.loraTrainerLogTimer = setInterval(scrollLog, 1000);
    }
})();
