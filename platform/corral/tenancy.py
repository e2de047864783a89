"""Names the server derives from a tenant: the slug that tells tenants apart in Serve app
names, Ray ids and directories, and the job key that Ray and the file system know a job by.

A slug is the tenant with anything outside `[A-Za-z0-9_.-]` replaced, cut to 32
characters, plus `-` and 8 hex digits of the tenant's sha256: two tenants whose names
read alike still get different slugs. Clients choose job uuids, and two tenants may
choose the same one, so nothing outside the SQL store is named by a bare uuid: the Ray
submission id and the Ray Train run name are the job key, and a job's files live under
its tenant's own directory.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def tenant_slug(tenant: str) -> str:
    """A file- and id-safe name for `tenant` (see the module docstring)."""
    digest = hashlib.sha256(tenant.encode()).hexdigest()[:8]
    return f"{_UNSAFE.sub('_', tenant)[:32]}-{digest}"


def job_key(tenant: str, job_uuid: str) -> str:
    """The job's id outside the store (Ray submission id, run name): unique per
    (tenant, uuid) because the slug is. `job_uuid` is already held to the id alphabet."""
    return f"{tenant_slug(tenant)}_{job_uuid}"


def tenant_dir(root: Path, tenant: str) -> Path:
    """The tenant's own directory under a shared root (checkpoints, `file://` datasets)."""
    return root / tenant_slug(tenant)


def job_checkpoint_dir(checkpoints_dir: Path, tenant: str, job_uuid: str) -> Path:
    """Where a tenant's job writes its checkpoints (the recipes' `output_dir`):
    `tenant_dir(checkpoints_dir, tenant) / job_uuid`. Registration and DPO accept a
    checkpoint under the checkpoints directory only inside the caller's own tenant
    directory, so this is the one place that layout is spelled. `checkpoints_dir` is
    `Settings.checkpoints_dir`. ValueError if `job_uuid` is not one plain path component
    (job uuids are held to the id alphabet before they get here)."""
    return checkpoints_dir / job_relative_dir(tenant, job_uuid)


def job_relative_dir(tenant: str, job_uuid: str) -> PurePosixPath:
    """`TENANT-SLUG/UUID`: a job's directory below any root of the layout (a local
    checkpoints directory, a storage URI). ValueError as for `job_checkpoint_dir`."""
    if not job_uuid or job_uuid in (".", "..") or any(c in job_uuid for c in "/\\\0"):
        raise ValueError(f"job uuid {job_uuid[:140]!r} cannot name a directory")
    return PurePosixPath(tenant_slug(tenant), job_uuid)
