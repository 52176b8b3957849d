// Stand-ins for the WebUI page globals javascript/lora_trainer.js uses, written from reading AUTOMATIC1111's
// javascript/ (script.js: gradioApp, onUiLoaded; ui.js: switch_to_txt2img; progressbar.js: request), for the
// browser tests' stand-in page (tests/serve_webui_standin.py). Injected as a <script>, as the host injects its own.

function gradioApp() {
    const app = document.querySelector("gradio-app");
    return app ? (app.shadowRoot || app) : document;
}

function updateInput(target) {
    target.dispatchEvent(new Event("input", {bubbles: true}));
}

function switch_to_txt2img() {
    // The host clicks the first button of #tabs; gradio >= 4 marks tab buttons with role=tab.
    const root = gradioApp();
    const tabs = root.querySelectorAll("[role=tab]");
    const buttons = Array.from(tabs.length ? tabs : root.querySelectorAll("button"));
    const tab = buttons.find((b) => b.textContent.trim() === "txt2img");
    if (tab) {
        tab.click();
    }
    return [];
}

// The page is loaded when the test injects these scripts; the host runs these callbacks once its UI is built.
function onUiLoaded(callback) {
    setTimeout(callback, 0);
}

// The host's progress call, answering as it does for a generation waiting for the GPU queue lock.
function request(url, data, handler, errorHandler) {
    window.standinRequests = (window.standinRequests || 0) + 1;
    setTimeout(() => handler({active: false, queued: true, completed: false, textinfo: "In queue: 1/1"}), 0);
}
