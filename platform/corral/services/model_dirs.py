"""Where a tenant's model directories may be: the path sandbox for registered models'
checkpoints and adapters, and for DPO's starting checkpoint (`finetuned_model`).

A directory is admitted under a shared model root (operator-provided models every tenant
may use), as one of the models file's own directories, or inside the tenant's own part of
the checkpoints directory (`corral.tenancy.job_checkpoint_dir`), never another tenant's.
With artifacts in object storage (corral.storage), a storage URI, or the URL of one that
`/post_training/job/artifacts` gave, is admitted inside the tenant's own part of storage,
judged on the URI.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from corral.errors import InvalidRequest
from corral.serving.catalog import ModelRoots, ModelSpec
from corral.storage import Storage
from corral.tenancy import tenant_dir
from serve_apps.model_cache import is_local, local_path


class ModelDirs:
    def __init__(
        self,
        *,
        roots: ModelRoots,
        file_models: Iterable[ModelSpec] = (),
        storage: Storage | None = None,
    ) -> None:
        """A shared root may not overlap the tenant-partitioned checkpoints directory, or
        one tenant's checkpoints would be everyone's. `storage`: the artifacts' storage,
        when it is object storage (a local one is `roots.checkpoints`)."""
        file_models = list(file_models)
        self._storage = storage if storage is not None and not storage.is_local else None
        self._shared_roots = _both_forms(roots.shared)
        self._checkpoints = roots.checkpoints
        if self._checkpoints is not None:
            checkpoints = self._checkpoints.expanduser().resolve()
            for root in self._shared_roots:
                if root.is_relative_to(checkpoints) or checkpoints.is_relative_to(root):
                    raise ValueError(
                        f"shared model root {root} overlaps the checkpoints directory "
                        f"{checkpoints}, which is partitioned by tenant"
                    )
        self._shared_dirs = _both_forms(
            location
            for spec in file_models
            for location in (spec.checkpoint_dir, spec.adapter_dir)
            if isinstance(location, Path)
        )

    def checked_location(
        self, value: str, field: str, required_file: str, *, tenant: str
    ) -> Path | str:
        """`checked_dir` for a path or `file://` URL, whose `required_file` must also be a
        readable JSON object (`readable_config`); with object storage, a storage URI or
        an `http(s)://` URL of one is checked there (`Storage.checked_model_uri`) and
        comes back as the storage URI. InvalidRequest for anything else."""
        if is_local(value):
            try:
                path = str(local_path(value))
            except ValueError as exc:
                raise InvalidRequest(f"{field}: {exc}") from None
            directory = self.checked_dir(path, field, required_file, tenant=tenant)
            readable_config(directory / required_file, field)
            return directory
        if self._storage is None:
            raise InvalidRequest(
                f"{field} must be a directory on the server: this server keeps no "
                "artifacts in object storage"
            )
        return self._storage.checked_model_uri(value, field, required_file, tenant=tenant)

    def checked_dir(self, value: str, field: str, required_file: str, *, tenant: str) -> Path:
        """An absolute directory that holds `required_file` and that `tenant` may use:
        under a shared model root, one of the models file's own directories, or inside
        the tenant's own part of the checkpoints directory (its jobs' checkpoints).
        InvalidRequest otherwise.

        The path must qualify both as written and after resolving links, and it is judged
        as written before the file system is asked anything: a path into another tenant's
        directory, or a link from the tenant's own directory into another's, is refused
        with the same answer whether or not anything is there."""
        raw = Path(value)
        if not raw.is_absolute() or ".." in raw.parts:
            raise InvalidRequest(f"{field} must be an absolute path without '..'")
        allowed_roots = (*self._shared_roots, *self._own_roots(tenant))
        if not _admitted(raw, allowed_roots, self._shared_dirs):
            raise InvalidRequest(self._refusal(field, tenant))
        try:
            resolved = raw.resolve()
        except (OSError, RuntimeError):
            raise InvalidRequest(f"{field}: cannot resolve {value[:300]!r}") from None
        if not _admitted(resolved, allowed_roots, self._shared_dirs):
            raise InvalidRequest(self._refusal(field, tenant))
        if not resolved.exists():
            raise InvalidRequest(f"{field}: no such directory {value[:300]!r}")
        if not resolved.is_dir():
            raise InvalidRequest(f"{field}: {value[:300]!r} is not a directory")
        if not (resolved / required_file).is_file():
            raise InvalidRequest(f"{field}: no {required_file} in {value[:300]!r}")
        return resolved

    def _own_roots(self, tenant: str) -> tuple[Path, ...]:
        """The tenant's own part of the checkpoints directory (where `job_checkpoint_dir`
        puts its jobs' checkpoints), as configured and resolved (the tenant's directory
        may itself be a link the operator made)."""
        if self._checkpoints is None:
            return ()
        return _both_forms([tenant_dir(self._checkpoints, tenant)])

    def _refusal(self, field: str, tenant: str) -> str:
        places = [f"under {root}" for root in dict.fromkeys(self._shared_roots)]
        if self._checkpoints is not None:
            own = tenant_dir(self._checkpoints, tenant)
            places.insert(0, f"a checkpoint of one of your own jobs (under {own})")
        places.append("a directory the models file names")
        return f"{field} must be {', '.join(places[:-1])} or {places[-1]}"


def _both_forms(paths: Iterable[Path]) -> tuple[Path, ...]:
    """Each path as configured (made absolute) and with its links resolved: a path is
    judged as written and as resolved, and a root may be written either way."""
    forms: dict[Path, None] = {}
    for path in paths:
        absolute = path.expanduser().absolute()
        forms[absolute] = None
        forms[absolute.resolve()] = None
    return tuple(forms)


def _admitted(path: Path, roots: tuple[Path, ...], exact: tuple[Path, ...]) -> bool:
    return path in exact or any(path.is_relative_to(root) for root in roots)


def readable_config(path: Path, field: str, limit: int = 1 << 20) -> None:
    """A checkpoint's config file must be a JSON object of sane size: one that is not
    could never load, and saying so now beats a replica failing to start."""
    try:
        too_big = path.stat().st_size > limit
        config = None if too_big else json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise InvalidRequest(f"{field}: {path.name} is not a readable JSON object")
