"""API keys for the OpenAI-compatible servers a service calls: a secret file, else a value from the
environment, read once by the composition root. Errors name the file, never what is in it."""

from __future__ import annotations

from pathlib import Path


def read_api_key(key_file: str | Path, fallback: str = "", what: str = "API key") -> str:
    """The content of `key_file` (stripped) when a file is named, else `fallback` stripped.

    Empty when neither is set (a local server without auth). A named file that cannot be read or is
    empty is an error: a key file that lost its key must not quietly mean "no key".
    """
    if not key_file:
        return fallback.strip()
    try:
        key = Path(key_file).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {key_file}: {exc.strerror}") from None
    if not key:
        raise ValueError(f"the {what} file {key_file} is empty")
    return key
