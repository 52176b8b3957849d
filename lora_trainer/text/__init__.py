"""``task_type: text-generation``: LoRA for causal language models with transformers + peft.

``data`` reads and validates the training files, ``chat`` renders conversations with the tokenizer's chat
template, ``tokenize`` turns samples into token ids with loss masks, ``batches`` orders and pads them,
``model`` loads the base model and attaches the adapter, ``export`` writes the adapter folder and
``trainer`` runs the loop with the engine's config, callbacks, optimizers, states and runtimes.
"""
