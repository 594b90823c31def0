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

    // Inside the WebUI: refresh the Lora cards of txt2img and img2img once for every run end this
    // browser has not seen yet: the progress box's data-ended is the server's time of the last
    // run's end, so this covers a page that watched the run and a page opened after it ended. The
    // WebUI builds the cards' HTML once (and caches it for every later page load) and rebuilds it
    // only on the extra-networks Refresh button, so the new LoRA (and its thumbnail) would not
    // show otherwise. This presses the same hidden button that Refresh presses.
    var ENDED = ["finished", "stopped"];
    var SEEN_KEY = "loraTrainerCardsRefreshedFor";
    var seenInMemory = 0;   // where localStorage is not available

    function refreshLoraCards() {
        window.loraTrainerCardRefreshes = (window.loraTrainerCardRefreshes || 0) + 1;
        ["txt2img", "img2img"].forEach(function (tabname) {
            var button = root().querySelector("#" + tabname + "_lora_extra_refresh_internal");
            if (button) {
                button.dispatchEvent(new Event("click"));
            }
        });
    }

    function seenEnd() {
        try {
            return parseFloat(window.localStorage.getItem(SEEN_KEY) || "0") || 0;
        } catch (e) {
            return seenInMemory;
        }
    }

    function markSeen(ended) {
        seenInMemory = ended;
        try {
            window.localStorage.setItem(SEEN_KEY, String(ended));
        } catch (e) {
            // private mode: this page remembers it
        }
    }

    function watchRunEnd() {
        var box = root().querySelector("#lora_trainer_progress .lora-trainer-progress");
        if (!box || ENDED.indexOf(box.getAttribute("data-status") || "") < 0) {
            return;
        }
        var ended = parseFloat(box.getAttribute("data-ended") || "0") || 0;
        if (ended > seenEnd()) {
            markSeen(ended);
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
