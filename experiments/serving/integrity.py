"""A registered model's files, checked against the sha256 digests recorded when it was promoted.

`promote` (`registry.py`) records, as the model-version tag `file_sha256`, a JSON object of
every file of the registered version (relative path -> sha256), read back from the store
right after registration. The tag lives in the tracking database, apart from the files it
describes. `predict` and `serve` copy a registered version's files out of the store, check
that copy against the tag (the same files, no more, none changed: an edited MLmodel naming
another loader, or a Python file planted beside the weights, is refused) and only then let
MLflow read the copy. Nothing from the store is imported before the check.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

DIGEST_TAG = "file_sha256"


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by POSIX path relative to it. A symlink or other
    non-regular entry is a ValueError: a model's files are plain files."""
    digests = {}
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if path.is_symlink():
                raise ValueError(f"{relative} is a symlink")
            if name in files:
                if not path.is_file():
                    raise ValueError(f"{relative} is not a regular file")
                digests[relative] = _sha256(path)
    return dict(sorted(digests.items()))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def registered_version(uri: str) -> tuple[str, str] | None:
    """(name, version) of the registered model version `uri` names (`models:/NAME@ALIAS`,
    `models:/NAME/VERSION`, `models:/NAME/STAGE`, `models:/NAME/latest`), or None for a URI
    that names no registered model (`runs:/`, a logged model's `models:/m-...`, a path)."""
    if not uri.startswith("models:/"):
        return None
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    resolved = get_model_name_and_version(MlflowClient(), uri)
    return (resolved[0], str(resolved[1])) if len(resolved) == 2 else None


def download(uri: str, folder: Path) -> Path:
    """The files of the model at `uri`, copied into `folder` (nothing is loaded)."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    folder.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder)))


def record(name: str, version: str, scratch: Path) -> dict[str, str]:
    """Record the digests of registered version `name`/`version` as its `file_sha256` tag."""
    from mlflow import MlflowClient

    digests = file_digests(download(f"models:/{name}/{version}", scratch))
    MlflowClient().set_model_version_tag(name, version, DIGEST_TAG, json.dumps(digests))
    return digests


def mismatch(recorded: dict[str, str], folder: Path) -> str | None:
    """What differs between `folder` and the recorded digests (one phrase), or None."""
    try:
        found = file_digests(folder)
    except ValueError as exc:
        return str(exc)
    extra = sorted(set(found) - set(recorded))
    if extra:
        return f"{extra[0]} is not among the files recorded at promotion"
    missing = sorted(set(recorded) - set(found))
    if missing:
        return f"{missing[0]} is missing"
    changed = sorted(path for path in found if found[path] != recorded[path])
    if changed:
        return f"{changed[0]} differs from its digest recorded at promotion"
    return None


def verified_copy(uri: str, folder: Path) -> Path | None:
    """A checked local copy of the registered version `uri` names, in `folder`; None when
    `uri` names no registered model. A version without recorded digests, or whose files
    differ from them, is a ValueError (one line) and nothing of it is loaded."""
    resolved = registered_version(uri)
    if resolved is None:
        return None
    from mlflow import MlflowClient

    name, version = resolved
    tag = MlflowClient().get_model_version(name, version).tags.get(DIGEST_TAG)
    try:
        recorded = json.loads(tag) if tag else None
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()
    ):
        raise ValueError(
            f"{uri} (version {version} of {name}) has no valid record of its files' digests; "
            "register it again with `make promote`"
        )
    local = download(f"models:/{name}/{version}", folder)
    problem = mismatch(recorded, local)
    if problem:
        raise ValueError(
            f"{uri} (version {version} of {name}) is not loaded: {problem}, so the store's "
            "copy was changed after it was promoted; register it again with `make promote`"
        )
    return local
