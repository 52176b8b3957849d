// LoRA Trainer tab: page helpers for the WebUI hosts (AUTOMATIC1111 and Forge inject javascript/*.js).
// Only globals of the host's own scripts are used (gradioApp, updateInput, switch_to_txt2img); each is
// checked first, so a host without one still gets the prompt typed in.

/** Append `prompt` (e.g. "<lora:name:0.8>") to the txt2img prompt and switch to the txt2img tab. */
function loraTrainerSendToTxt2img(prompt) {
    const root = typeof gradioApp === "function" ? gradioApp() : document;
    const box = root.querySelector("#txt2img_prompt textarea");
    if (!box || !prompt) {
        return [prompt];
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
    return [prompt];
}
