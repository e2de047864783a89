"""The names and directories the server derives from a tenant."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.tenancy import job_checkpoint_dir, tenant_dir, tenant_slug


def test_a_jobs_checkpoints_live_in_its_tenants_own_directory(tmp_path: Path) -> None:
    path = job_checkpoint_dir(tmp_path, "alpha", "sft-1")
    assert (
        path == tenant_dir(tmp_path, "alpha") / "sft-1" == tmp_path / tenant_slug("alpha") / "sft-1"
    )
    assert job_checkpoint_dir(tmp_path, "beta", "sft-1") != path


@pytest.mark.parametrize("job_uuid", ["", ".", "..", "a/b", "../x", "a\\b", "a\x00b"])
def test_a_job_uuid_that_is_not_one_path_component_is_refused(
    tmp_path: Path, job_uuid: str
) -> None:
    with pytest.raises(ValueError, match="cannot name a directory"):
        job_checkpoint_dir(tmp_path, "alpha", job_uuid)
