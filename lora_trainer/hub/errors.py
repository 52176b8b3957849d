"""Why a model could not come from the Hub, each said with what to do. All are ``ModelLoadError``s: the CLI
prints them as one ``error: ...`` line, the tab shows them as they are."""

from lora_trainer.errors import ModelLoadError


class HubError(ModelLoadError):
    """A Hub reference could not be turned into local files."""


class HubUnavailableError(HubError):
    """Not in the cache, and no download possible: ``HF_HUB_OFFLINE=1`` or the Hub cannot be reached."""


class HubGatedError(HubError):
    """The repository is gated: its licence must be accepted and a token given (``HF_TOKEN``)."""


class HubNotFoundError(HubError):
    """No such repository, revision or file (or a private one the token cannot read)."""


class HubDownloadError(HubError):
    """A download started but did not finish (connection cut, server error); nothing partial was kept."""
