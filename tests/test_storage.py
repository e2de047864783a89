"""The storage root (corral.storage) on a local directory and on a real S3 protocol
server (moto, on loopback): layout, ownership, transfers and client URLs."""

from __future__ import annotations

from pathlib import Path

import httpx
import pyarrow.fs as pafs
import pytest

from corral.config import Settings
from corral.errors import InvalidRequest
from corral.storage import InvalidLocation, Storage, parse_location
from corral.tenancy import job_checkpoint_dir, tenant_slug
from serve_apps.model_cache import StorageOptions

ALPHA, BETA = "alpha", "beta"


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "artifacts"))
    endpoint: str = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/corral", options=StorageOptions(s3_endpoint=endpoint))


def write_tree(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": bytes(range(256)) * 64,
        "sub/deeper/notes.txt": b"a file two folders down",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_default_root_keeps_the_checkpoints_layout(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    storage = Storage.from_settings(settings)
    assert storage.is_local
    assert storage.job_uri(ALPHA, "job-1") == (
        job_checkpoint_dir(settings.checkpoints_dir, ALPHA, "job-1").as_uri()
    )


def test_job_uri_on_object_storage() -> None:
    storage = Storage("s3://bucket/some/prefix/")
    assert storage.root.uri == "s3://bucket/some/prefix"
    assert storage.job_uri(ALPHA, "job-1") == f"s3://bucket/some/prefix/{tenant_slug(ALPHA)}/job-1"
    with pytest.raises(ValueError, match="cannot name a directory"):
        storage.job_uri(ALPHA, "..")


@pytest.mark.parametrize(
    "value",
    [
        "relative/path",
        "s3://bucket/a/../b",
        "s3://bucket/a/%2e%2e/b",
        "s3://bucket/a//b",
        "s3://bucket/a/./b",
        "s3://bucket/a?versionId=1",
        "s3://user@bucket/a",
        "s3:///no-bucket",
        "file://elsewhere/x",
        "/a/../b",
        "file:///a/%2E%2E/b",
        "/a/b\x00",
        "",
    ],
)
def test_malformed_locations_are_refused(value: str) -> None:
    with pytest.raises(InvalidLocation):
        parse_location(value)


def test_settings_refuse_unknown_schemes_and_bad_endpoints(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not supported"):
        Settings(home=tmp_path, storage_uri="hdfs://namenode/corral")
    with pytest.raises(ValueError, match="host"):
        Settings(home=tmp_path, storage_uri="s3://b/p", storage_s3_endpoint="127.0.0.1:9000")
    settings = Settings(home=tmp_path, storage_uri="gs://bucket/corral")
    assert Storage.from_settings(settings).job_uri(ALPHA, "j").startswith("gs://bucket/corral/")


def test_ownership_is_judged_on_the_location(storage: Storage, tmp_path: Path) -> None:
    mine = storage.job_uri(ALPHA, "job-1") + "/checkpoints/iter-1"
    theirs = storage.job_uri(BETA, "job-1") + "/checkpoints/iter-1"
    assert storage.is_tenants(mine, ALPHA)
    assert storage.is_tenants(storage.tenant_location(ALPHA).uri, ALPHA)
    assert not storage.is_tenants(theirs, ALPHA)
    assert not storage.is_tenants(storage.root.uri, ALPHA)
    # A component that merely starts with the slug is another directory.
    assert not storage.is_tenants(storage.tenant_location(ALPHA).uri + "x/job", ALPHA)
    # The same refusal whether or not anything is stored there.
    source = tmp_path / "src"
    write_tree(source)
    storage.upload_dir(source, theirs)
    assert storage.is_dir(theirs)
    assert not storage.is_tenants(theirs, ALPHA)
    assert not storage.is_tenants(theirs + "/config.json", ALPHA)
    # Climbing out of one's own directory is malformed, not a path into another's.
    with pytest.raises(InvalidLocation):
        storage.is_tenants(f"{storage.job_uri(ALPHA, 'job-1')}/../../{tenant_slug(BETA)}", ALPHA)


def test_ownership_across_buckets_and_schemes() -> None:
    storage = Storage("s3://bucket/corral")
    own = storage.tenant_location(ALPHA)
    assert storage.is_tenants(f"s3://bucket/corral/{tenant_slug(ALPHA)}/j", ALPHA)
    assert not storage.is_tenants(f"s3://other/corral/{tenant_slug(ALPHA)}/j", ALPHA)
    assert not storage.is_tenants(f"gs://bucket/corral/{tenant_slug(ALPHA)}/j", ALPHA)
    assert not storage.is_tenants(f"/corral/{tenant_slug(ALPHA)}/j", ALPHA)
    assert not storage.is_tenants(f"s3://bucket/{tenant_slug(ALPHA)}/j", ALPHA)
    assert own.uri == f"s3://bucket/corral/{tenant_slug(ALPHA)}"


def test_a_link_out_of_the_own_directory_is_refused(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "artifacts"))
    theirs = Path(parse_location(storage.job_uri(BETA, "job-1")).key)
    theirs.mkdir(parents=True)
    own = Path(parse_location(storage.tenant_location(ALPHA).uri).key)
    own.mkdir(parents=True)
    (own / "link").symlink_to(theirs)
    assert not storage.is_tenants(str(own / "link"), ALPHA)
    assert not storage.is_tenants((own / "link" / "nothing-yet").as_uri(), ALPHA)
    assert storage.is_tenants(str(own / "plain" / "dir"), ALPHA)


def test_upload_and_download_round_trip(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "checkpoint"
    files = write_tree(source)
    uri = storage.job_uri(ALPHA, "job-1") + "/checkpoints/iter-2"
    assert not storage.is_dir(uri)
    storage.upload_dir(source, uri)
    assert storage.is_dir(uri)
    assert storage.is_file(uri + "/sub/deeper/notes.txt")
    assert not storage.is_file(uri + "/missing.json")
    assert storage.read_bytes(uri + "/config.json", limit=1024) == files["config.json"]
    with pytest.raises(ValueError, match="more than"):
        storage.read_bytes(uri + "/model.safetensors", limit=10)
    target = tmp_path / "back"
    storage.download_dir(uri, target)
    assert {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*.*")} == (
        files
    )


def test_files_are_written_whole_and_listed(storage: Storage, tmp_path: Path) -> None:
    directory = storage.job_uri(ALPHA, "job-1") + "/batches"
    assert storage.file_names(directory) == []  # not there yet
    storage.write_bytes(directory + "/2-3.jsonl", b"second\n")
    storage.write_bytes(directory + "/0-1.jsonl", b"first\n")
    storage.write_bytes(directory + "/0-1.jsonl", b"first, again\n")  # replaced whole
    storage.write_bytes(directory + "/sub/x.jsonl", b"a file one folder down")
    assert storage.file_names(directory) == ["0-1.jsonl", "2-3.jsonl"]
    assert storage.read_bytes(directory + "/0-1.jsonl", limit=100) == b"first, again\n"
    if storage.is_local:  # the temporary name is gone; a stray one is not listed
        local = Path(parse_location(directory).key)
        assert sorted(p.name for p in local.iterdir()) == ["0-1.jsonl", "2-3.jsonl", "sub"]
        (local / ".4-5.jsonl.99.tmp").write_bytes(b"half")
        assert storage.file_names(directory) == ["0-1.jsonl", "2-3.jsonl"]


def test_client_urls_fetch_the_bytes_and_map_back(storage: Storage, tmp_path: Path) -> None:
    files = write_tree(tmp_path / "checkpoint")
    directory = storage.job_uri(ALPHA, "job-1") + "/checkpoints/iter-2"
    storage.upload_dir(tmp_path / "checkpoint", directory)
    file_uri = directory + "/model.safetensors"

    file_url, directory_url = storage.file_url(file_uri), storage.directory_url(directory)
    assert storage.location_of_url(file_url) == file_uri
    assert storage.location_of_url(directory_url) == directory
    if storage.is_local:
        assert file_url.startswith("file:///")
        assert Path(parse_location(file_url).key).read_bytes() == files["model.safetensors"]
        return
    assert file_url.startswith(("http://127.0.0.1:", "https://")) and "X-Amz-Signature" in file_url
    response = httpx.get(file_url)
    assert response.status_code == 200
    assert response.content == files["model.safetensors"]
    listing = httpx.get(directory_url)
    assert listing.status_code == 200
    for name in files:
        assert f"<Key>corral/{tenant_slug(ALPHA)}/job-1/checkpoints/iter-2/{name}</Key>" in (
            listing.text
        )
    # A URL of another server, or naming no object, is not one of ours.
    for foreign in ("https://example.com/bucket/key", "ftp://x/y", directory_url + "&prefix=x"):
        with pytest.raises(InvalidLocation):
            storage.location_of_url(foreign)


def test_ray_train_storage(storage: Storage) -> None:
    uri = storage.job_uri(ALPHA, "job-1") + "/ray"
    path, filesystem = storage.ray_train_storage(uri)
    if storage.is_local:
        assert (path, filesystem) == (parse_location(uri).key, None)
        return
    assert isinstance(filesystem, pafs.S3FileSystem)
    assert path == uri.removeprefix("s3://")
    with pytest.raises(InvalidLocation, match="not on this server's storage"):
        storage.ray_train_storage("/tmp/elsewhere")


def test_checked_model_uri(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "checkpoint"
    write_tree(source)
    mine = storage.job_uri(ALPHA, "job-1") + "/checkpoints/iter-1"
    theirs = storage.job_uri(BETA, "job-1") + "/checkpoints/iter-1"
    for uri in (mine, theirs):
        storage.upload_dir(source, uri)

    def check(value: str) -> str:
        return storage.checked_model_uri(value, "finetuned_model", "config.json", tenant=ALPHA)

    assert check(mine) == mine
    assert check(storage.directory_url(mine)) == mine  # what the artifacts response gives
    refusals = {}
    for value in (theirs, theirs.replace("job-1", "job-404"), storage.directory_url(theirs)):
        with pytest.raises(InvalidRequest, match="must be a checkpoint of one of your own") as e:
            check(value)
        refusals[value] = e.value.message
    assert len(set(refusals.values())) == 1  # stored or not, the same answer
    with pytest.raises(InvalidRequest, match=r"'\.' or '\.\.'"):
        check(f"{mine}/../../../{tenant_slug(BETA)}/job-1")
    with pytest.raises(InvalidRequest, match=r"no adapter_config\.json"):
        storage.checked_model_uri(mine, "adapter_dir", "adapter_config.json", tenant=ALPHA)
    with pytest.raises(InvalidRequest, match="not a readable JSON object"):
        storage.checked_model_uri(mine, "f", "sub/deeper/notes.txt", tenant=ALPHA)
