// LoRA Trainer tab: page helpers for the WebUI hosts (AUTOMATIC1111 and Forge inject javascript/*.js).
// Only globals of the host's own scripts are used (gradioApp, updateInput, switch_to_txt2img, request,
// onUiLoaded); each is checked first, so a host without one still works as far as it can.
// The functions called from gradio events return [] : those events have no outputs, and gradio 3.41's page
// throws on a value returned for outputs that do not exist.

function loraTrainerRoot() {
    return typeof gradioApp === "function" ? gradioApp() : document;
}

/** Append `prompt` (e.g. "<lora:name:0.8>") to the txt2img prompt and switch to the txt2img tab. */
function loraTrainerSendToTxt2img(prompt) {
    const box = loraTrainerRoot().querySelector("#txt2img_prompt textarea");
    if (!box || !prompt) {
        return [];
    }
    // Append rather than replace: the user may already have a prompt to try the LoRA with.
    box.value = box.value.trim() ? `${box.value.trim()} ${prompt}` : prompt;
    if (typeof updateInput === "function") {
        updateInput(box);  // tells gradio the value changed
    } else {
        box.dispatchEvent(new Event("input", {bubbles: true}));
    }
    if (typeof switch_to_txt2img === "function") {
        switch_to_txt2img();
    }
    return [];
}

/**
 * A run's LoRA was published into the Lora folder: have the host list it, as its own refresh button does.
 * The host's extra-networks pages (txt2img and img2img) each have a hidden "..._extra_refresh_internal"
 * button whose click rescans the folders and rebuilds the cards; its visible refresh icon clicks it.
 */
function loraTrainerRefreshLoras(published) {
    if (!published) {
        return [];
    }
    const root = loraTrainerRoot();
    for (const tab of ["txt2img", "img2img"]) {
        const button = root.querySelector(`#${tab}_lora_extra_refresh_internal`)
            || root.querySelector(`[id^="${tab}_"][id$="_extra_refresh_internal"]`);
        if (button) {
            button.click();  // a real click event: every gradio version's button reacts to it
        }
    }
    return [];
}

/**
 * While a LoRA training holds the GPU, a generation waits in the host's queue with only "In queue: 1/1" to
 * show. Add to that progress text what it waits for: the run's step and ETA (the tab's own progress line,
 * which the tab's page keeps current) and that Cancel in the LoRA Trainer tab frees the GPU.
 */
function loraTrainerQueueHint(res) {
    if (!res || res.active || res.completed || !res.queued) {
        return res;
    }
    const box = loraTrainerRoot().querySelector("#lora_trainer_progress textarea, #lora_trainer_progress input");
    const line = box ? String(box.value).split("\n")[0] : "";
    if (!line.startsWith("Running")) {
        return res;
    }
    // Only the step and ETA of the tab's line ("Running (Train: x) · step 5/4000 (0%) · loss … · ETA 29:02"):
    // the host shows textinfo on one line (none at all with a line break) that does not wrap, in a bar as wide
    // as the results column (about 650 px in a 1400 px window in A1111 1.10), so a longer text hides the part that
    // says how to free the GPU.
    const parts = line.split("·").map((part) => part.trim());
    const step = (parts.find((part) => part.startsWith("step ")) || "").replace(/^step\s*|\s*\(.*\)$/g, "");
    const eta = parts.find((part) => part.startsWith("ETA ")) || "";
    const run = [step, eta].filter(Boolean).join(", ");
    res.textinfo = `${res.textinfo || "Waiting..."} · LoRA training ${run} · Cancel in LoRA Trainer tab`.replace("  ", " ");
    return res;
}

/** Wrap the host's progress request (progressbar.js's global `request`) to pass answers through the hint. */
function loraTrainerWatchQueue() {
    if (typeof request !== "function" || request.loraTrainerWrapped) {
        return;
    }
    const original = request;
    const wrapped = function(url, data, handler, errorHandler) {
        const progress = String(url).endsWith("internal/progress") && typeof handler === "function";
        return original(url, data, progress ? (res) => handler(loraTrainerQueueHint(res)) : handler, errorHandler);
    };
    wrapped.loraTrainerWrapped = true;
    window.request = wrapped;
}

if (typeof onUiLoaded === "function") {
    onUiLoaded(loraTrainerWatchQueue);
} else {
    document.addEventListener("DOMContentLoaded", loraTrainerWatchQueue);
}
