"""The training loop and what it needs: optimizers, schedules, losses, saved states, callbacks."""
