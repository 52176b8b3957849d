"""Bring the files a use needs from a Hub repository into the standard cache, and say where they are.

Cache first: when the cached snapshot of the revision already holds every planned file, no request is made
at all (later runs work offline, and do not wait on a slow network). Otherwise, unless ``HF_HUB_OFFLINE``
is set, one listing call (``HfApi.model_info``) pins the revision to a commit and gives the file sizes, and
``hf_hub_download`` fetches each missing planned file at that commit (its own atomic ``.incomplete`` ->
rename, locks, resume, ``HF_TOKEN``, ``HF_ENDPOINT``, Xet). The branch's ref is written last, after every
file is in place. Failures become ``HubError``s that say what to do.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from typing import Callable, List, Optional, Sequence

from lora_trainer.hub.cache import (
    blobs_folder,
    cached_commit,
    hub_cache_dir,
    record_ref,
    snapshot_files,
    snapshot_folder,
)
from lora_trainer.hub.errors import (
    HubDownloadError,
    HubGatedError,
    HubNotFoundError,
    HubUnavailableError,
)
from lora_trainer.hub.files import MissingRepoFiles, RepoFiles
from lora_trainer.hub.progress import DownloadCallback, DownloadProgress, IncompleteFileWatcher, format_bytes
from lora_trainer.hub.reference import HubReference

Log = Callable[[str], None]
DOWNLOAD_ATTEMPTS = 3  # per file, when the connection drops mid-file

# Exception class names (anywhere in the class's MRO) that mean "the network failed", across requests,
# httpx/httpx2, urllib3 and the standard library: huggingface_hub raised the first kind before 1.0 and
# raises the second since, and the WebUI hosts pin the old one.
_NETWORK_ERRORS = {
    "ConnectionError",
    "ConnectError",
    "ConnectTimeout",
    "Timeout",
    "TimeoutError",
    "TimeoutException",
    "ReadTimeout",
    "ReadError",
    "NetworkError",
    "TransportError",
    "ProtocolError",
    "RemoteProtocolError",
    "ChunkedEncodingError",
    "IncompleteRead",
    "ProxyError",
    "SSLError",
    "OfflineModeIsEnabled",
}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _huggingface_hub():
    try:
        import huggingface_hub
    except ImportError as exc:
        raise HubUnavailableError(
            f"Models from the Hugging Face Hub need the huggingface_hub package ({exc}): "
            "`pip install huggingface_hub`, or give a local path instead."
        ) from None
    return huggingface_hub


def hub_is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as huggingface_hub read it when it was imported."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` (default https://huggingface.co), as huggingface_hub read it."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return "https://huggingface.co"
    return constants.ENDPOINT


def hf_download_command(ref: HubReference, files: RepoFiles) -> str:
    """The ``hf download`` command line that puts ``files`` of ``ref`` into the cache. The patterns go as
    positional arguments: both the 0.x and the 1.x+ CLI take several of them as glob patterns, while their
    ``--include`` options differ (one list option vs. a repeated one)."""
    parts = ["hf", "download", ref.repo_id, *files.include_patterns()]
    if ref.revision:
        parts += ["--revision", ref.revision]
    return " ".join(shlex.quote(p) for p in parts)


def _is_network_error(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(cls.__name__ in _NETWORK_ERRORS for cls in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


class _Messages:
    """The sentences of one fetch's errors: what it was for, and how else to get the files."""

    def __init__(self, ref: HubReference, files: RepoFiles, as_given: str, place_hint: str, download_command: str):
        self.ref, self.files, self.as_given = ref, files, as_given
        self.place_hint, self.download_command = place_hint, download_command
        self.url = f"{hub_endpoint()}/{ref.repo_id}"

    def offline_ways(self, cache_dir: str) -> str:
        command = f"`{hf_download_command(self.ref, self.files)}`"
        if self.download_command:
            command = f"`{self.download_command}` (or {command})"
        ways = (
            f"To use it on a machine without a network, fill the cache where there is one with {command} "
            f"and copy that machine's cache folder to {cache_dir} here (or point HF_HOME at a copy)"
        )
        return ways + (f"; or {self.place_hint}." if self.place_hint else ".")

    def unavailable(self, reason: str, cache_dir: str, cached_missing: Sequence[str] = ()) -> HubUnavailableError:
        lacks = f" (the cached copy lacks {', '.join(cached_missing)})" if cached_missing else ""
        return HubUnavailableError(
            f"{self.files.label} {self.ref.repo_text()} is not in the Hugging Face cache ({cache_dir}){lacks}, and "
            f"{reason}. {self.offline_ways(cache_dir)}"
        )

    def gated(self) -> HubGatedError:
        from huggingface_hub import get_token

        if get_token():
            advice = (
                f"the token this machine uses (HF_TOKEN or `hf auth login`) has no access to it yet: accept the "
                f"licence at {self.url} with that account (some repositories approve requests by hand), then run "
                "again"
            )
        else:
            advice = (
                f"open {self.url}, log in and accept its licence, create a read token at "
                f"{hub_endpoint()}/settings/tokens, then set HF_TOKEN=<token> (or run `hf auth login`) and run again"
            )
        return HubGatedError(f"{self.files.label} {self.ref.repo_id} is a gated repository: {advice}.")

    def not_found(self, what: str) -> HubNotFoundError:
        local = ""
        if "/" in self.as_given and not self.as_given.startswith(("hf://", "http")):
            local = f" (nor a file or folder at {os.path.abspath(self.as_given)})"
        return HubNotFoundError(
            f"{self.files.label} {self.as_given}: {what}{local}. Check the spelling (owner/name, optionally "
            f"@revision or /file.safetensors); a private or gated repository needs HF_TOKEN set to a token that "
            "can read it."
        )

    def interrupted(self, filename: str, exc: BaseException) -> HubDownloadError:
        return HubDownloadError(
            f"Downloading {filename} of {self.ref.repo_id} did not finish ({_short(exc)}). Run again to retry: "
            "finished files are not downloaded twice, and a partial file is never taken for a complete one."
        )

    def translate(self, exc: BaseException, cache_dir: str, filename: Optional[str] = None) -> BaseException:
        """The HubError for a huggingface_hub failure, or ``exc`` itself when it is none of the known kinds."""
        from huggingface_hub import errors

        revision = self.ref.revision_or_default
        if isinstance(exc, errors.GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
            return self.gated()
        if isinstance(exc, errors.RepositoryNotFoundError):
            return self.not_found(f"no such repository on the Hugging Face Hub ({hub_endpoint()})")
        if isinstance(exc, errors.RevisionNotFoundError):
            return self.not_found(f"{self.ref.repo_id} has no revision {revision!r}")
        if isinstance(exc, errors.LocalEntryNotFoundError):  # before EntryNotFoundError: a subclass in 0.x
            reason = f"the Hub at {hub_endpoint()} could not be reached ({_short(exc)})"
            return self.unavailable(reason, cache_dir)
        if isinstance(exc, errors.EntryNotFoundError) or type(exc).__name__ == "RemoteEntryNotFoundError":
            return self.not_found(f"{self.ref.repo_text()} has no file {filename or self.ref.filename!r}")
        if _is_network_error(exc) or (isinstance(exc, OSError) and "Consistency check failed" in str(exc)):
            if filename is None:  # nothing started: the Hub is out of reach
                return self.unavailable(f"the Hub at {hub_endpoint()} could not be reached ({_short(exc)})", cache_dir)
            return self.interrupted(filename, exc)
        if isinstance(exc, errors.HfHubHTTPError):
            status = getattr(getattr(exc, "response", None), "status_code", "?")
            return HubDownloadError(
                f"The Hugging Face Hub answered HTTP {status} for {self.files.label} {self.ref.repo_text()}"
                f"{' (' + filename + ')' if filename else ''}: {_short(exc)}. Try again later."
            )
        return exc


def fetch_repo_files(
    ref: HubReference,
    files: RepoFiles,
    *,
    as_given: Optional[str] = None,
    place_hint: str = "",
    download_command: str = "",
    on_progress: Optional[DownloadCallback] = None,
    log: Optional[Log] = None,
) -> str:
    """The cache snapshot folder of ``ref`` holding every file ``files`` plans; downloads what is missing.

    ``as_given`` is the reference as the user typed it (named in not-found errors); ``place_hint`` completes
    the offline error with the local alternative ("put ... in a folder and pass --model-path FOLDER");
    ``download_command`` is our own pre-download command for this use. ``on_progress`` receives a
    ``DownloadProgress`` when each file starts, about four times a second while it downloads, and once at
    the end; ``log`` (default: stderr) gets a line before a download and after it.

    Raises HubUnavailableError (offline or unreachable, not cached), HubGatedError, HubNotFoundError (repo,
    revision or file; or the repository lacks what ``files`` needs), HubDownloadError (cut, server error).
    """
    hub = _huggingface_hub()
    log = log or _stderr
    cache_dir = hub_cache_dir()
    revision = ref.revision_or_default
    messages = _Messages(ref, files, as_given or str(ref), place_hint, download_command)

    cached_missing: List[str] = []
    commit = cached_commit(ref.repo_id, revision, cache_dir)
    if commit is not None:
        folder = snapshot_folder(ref.repo_id, commit, cache_dir)
        present = snapshot_files(folder) if os.path.isdir(folder) else []
        try:
            files.plan(present, present)
            return folder
        except MissingRepoFiles as exc:
            cached_missing = exc.missing

    if hub_is_offline():
        raise messages.unavailable(
            "HF_HUB_OFFLINE=1 forbids downloading it (unset it to download on first use)", cache_dir, cached_missing
        )
    try:
        info = hub.HfApi().model_info(ref.repo_id, revision=revision, files_metadata=True)
    except Exception as exc:  # translated below; anything unknown is re-raised as it is
        raise messages.translate(exc, cache_dir) from None
    sizes = {sibling.rfilename: sibling.size for sibling in (info.siblings or [])}
    folder = snapshot_folder(ref.repo_id, info.sha, cache_dir)
    present = snapshot_files(folder) if os.path.isdir(folder) else []
    try:
        plan = files.plan(list(sizes), present)
    except MissingRepoFiles as exc:
        shown = ", ".join(sorted(sizes)[:12]) + (", ..." if len(sizes) > 12 else "")
        raise messages.not_found(
            f"{ref.repo_text()} has no {', '.join(exc.missing)} (it holds: {shown or 'no files'})"
        ) from None
    todo = [name for name in plan if name not in present]
    if todo:
        _download(hub, ref, info.sha, todo, sizes, cache_dir, messages, on_progress, log)
    record_ref(ref.repo_id, revision, info.sha, cache_dir)
    return folder


def _download(hub, ref, commit, todo, sizes, cache_dir, messages: _Messages, on_progress, log: Log) -> None:
    known = all(sizes.get(name) is not None for name in todo)
    total = sum(sizes[name] for name in todo) if known else None
    log(
        f"{messages.files.label}: downloading {len(todo)} file(s) ({format_bytes(total)}) of {ref.repo_text()} "
        f"from {hub_endpoint()} into {cache_dir} (first use only; later runs read the cache)"
    )
    done = 0
    for number, name in enumerate(todo, 1):
        size = sizes.get(name)

        def report(written: int, name=name, number=number, size=size, done=done) -> None:
            current = min(written, size) if size else written
            on_progress(DownloadProgress(ref.repo_id, name, number, len(todo), done + current, total))

        if on_progress is not None:
            report(0)
        path = _download_file(hub, ref, commit, name, cache_dir, messages, report if on_progress else None, log)
        done += size if size is not None else os.path.getsize(path)
    if on_progress is not None:
        on_progress(DownloadProgress(ref.repo_id, "", len(todo), len(todo), done, total, finished=True))
    log(f"{messages.files.label}: {ref.repo_text()} is in {snapshot_folder(ref.repo_id, commit, cache_dir)}")


def _download_file(hub, ref, commit, name, cache_dir, messages: _Messages, on_bytes, log: Log) -> str:
    """``hf_hub_download`` of one file, tried again when the connection drops mid-file: huggingface_hub 1.x+
    resumes within one call, 0.x only on the next call (from its ``.incomplete`` file), so a dropped
    connection costs a retry, not the run, with both."""
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        watcher = IncompleteFileWatcher(blobs_folder(ref.repo_id, cache_dir), on_bytes) if on_bytes else None
        try:
            with watcher or contextlib.nullcontext():
                return hub.hf_hub_download(ref.repo_id, name, revision=commit, cache_dir=cache_dir)
        except Exception as exc:
            error = messages.translate(exc, cache_dir, filename=name)
            if not isinstance(error, HubDownloadError) or not _is_network_error(exc) or attempt == DOWNLOAD_ATTEMPTS:
                raise error from None
            log(f"{messages.files.label}: the connection dropped while downloading {name} ({_short(exc)}); resuming")
    raise AssertionError("unreachable")  # pragma: no cover


def fetch_file(
    ref: HubReference,
    label: str,
    *,
    beside: Sequence[str] = (),
    **kwargs,
) -> str:
    """The local path of the one file ``ref.filename`` names (``owner/name/file.safetensors``), downloaded on
    first use; ``beside`` lists files fetched next to it when the repository has them (a checkpoint's
    ``.yaml``). Keyword arguments and errors as ``fetch_repo_files``."""
    from lora_trainer.hub.files import ListedFiles

    if not ref.filename:
        raise ValueError(f"{ref} names a repository, not a file")
    folder = fetch_repo_files(ref, ListedFiles(label, ((ref.filename,),), tuple(beside)), **kwargs)
    return os.path.join(folder, *ref.filename.split("/"))


def fetch_subfolder(
    repo_id: str,
    subfolder: str,
    label: str,
    *,
    required: Sequence[Sequence[str]],
    optional: Sequence[str] = (),
    **kwargs,
) -> str:
    """The local path of the folder ``subfolder`` of the repository ``repo_id`` (a pipeline's ``tokenizer_2/``),
    its files downloaded on first use: each ``required`` entry lists alternatives named inside the subfolder
    (one must be present), ``optional`` patterns are fetched when the repository has them. The suggested
    download command fetches the whole subfolder. Keyword arguments and errors as ``fetch_repo_files``."""
    from lora_trainer.hub.files import ListedFiles
    from lora_trainer.hub.reference import HubReference

    files = ListedFiles(
        label,
        tuple(tuple(f"{subfolder}/{name}" for name in names) for names in required),
        tuple(f"{subfolder}/{name}" for name in optional),
    )
    kwargs.setdefault("download_command", f"hf download {repo_id} --include '{subfolder}/*'")
    return os.path.join(fetch_repo_files(HubReference(repo_id), files, **kwargs), subfolder)
