"""Signatures of the files rlkd lets a library unpickle: a sweep's Ray Tune state (`tuner.pkl`, the
experiment state, whose trials are cloudpickled). `Tuner.restore` unpickles them, so a file planted in an
output directory would run code when the sweep is re-run. rlkd signs them with an HMAC-SHA256 under a key of
this user's (`~/.config/rlkd/signing.key`, mode 0600) when a sweep returns, and restores only what verifies.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

SIGNATURE = "rlkd-signature.json"
PATTERNS = ("*.pkl", "*.json", "*/*.pkl")  # what Ray Tune reads back on restore


def key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "rlkd" / "signing.key"


def _key(create: bool) -> bytes | None:
    path = key_path()
    if not path.is_file() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
        except FileExistsError:  # another process made it first
            pass
    return path.read_bytes() if path.is_file() else None


def _files(directory: Path) -> list[Path]:
    found = {p for pattern in PATTERNS for p in directory.glob(pattern) if p.is_file() and p.name != SIGNATURE}
    return sorted(found)


def _digest(key: bytes, path: Path) -> str:
    return hmac.new(key, path.read_bytes(), hashlib.sha256).hexdigest()


def sign(directory: Path) -> None:
    """Sign every file of `directory` that a restore reads (OSError if this user's key cannot be written)."""
    key = _key(create=True)
    files = {str(p.relative_to(directory)): _digest(key, p) for p in _files(directory)}
    (directory / SIGNATURE).write_text(json.dumps({"files": files}, indent=1) + "\n")


def problem(directory: Path) -> str | None:
    """Why `directory` cannot be trusted (a file unsigned, changed or missing, no signature, no key), or None."""
    key, signature = _key(create=False), directory / SIGNATURE
    if key is None:
        return f"this user has no signing key ({key_path()}), so nothing here was signed by rlkd for them"
    if not signature.is_file():
        return f"{signature.name} is missing (the sweep was not ended by rlkd, or was written elsewhere)"
    try:
        signed = json.loads(signature.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{signature.name} is not valid"
    for path in _files(directory):
        name = str(path.relative_to(directory))
        if name not in signed:
            return f"{name} was not signed by rlkd"
        if not hmac.compare_digest(signed[name], _digest(key, path)):
            return f"{name} changed after rlkd signed it"
    missing = [n for n in signed if not (directory / n).is_file()]
    return f"{missing[0]} is missing" if missing else None
