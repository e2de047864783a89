"""Model directories from a storage URI (serve_apps.model_cache) on a real S3 protocol
server: local paths pass through, a URI is downloaded once per node (also when several
replicas ask at once), a rewritten checkpoint gets a new entry, and the transformers
engine serves a model that lives in S3."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from serve_apps.engines.protocol import GenerationRequest, SamplingOptions
from serve_apps.llm import LLMAppConfig, transformers_engine
from serve_apps.model_cache import StorageOptions, local_model_dir, s3_filesystem

DOWNLOADING = "downloading"


@pytest.fixture
def options(s3_server: str) -> StorageOptions:
    return StorageOptions(s3_endpoint=s3_server)


def upload(source: Path, uri: str, options: StorageOptions) -> None:
    pafs.copy_files(
        str(source), uri.removeprefix("s3://"), destination_filesystem=s3_filesystem(options)
    )


def model_files(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    (source / "nested").mkdir(parents=True)
    (source / "config.json").write_text('{"model_type": "llama"}')
    (source / "nested" / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    return source


def downloads(caplog: pytest.LogCaptureFixture) -> int:
    return sum(DOWNLOADING in record.getMessage() for record in caplog.records)


def contents(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file()
    }


def test_local_paths_pass_through_untouched(tmp_path: Path, options: StorageOptions) -> None:
    missing = tmp_path / "not" / "there"
    assert local_model_dir(missing, options=options) == missing
    assert local_model_dir(str(missing), options=options) == missing
    assert local_model_dir(missing.as_uri(), options=options) == missing
    config = LLMAppConfig(name="m", model_dir=str(missing))
    assert config.model_dir == missing


def test_a_uri_is_downloaded_once(
    tmp_path: Path, s3_bucket: str, options: StorageOptions, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="serve_apps.model_cache")
    source = model_files(tmp_path)
    uri = f"s3://{s3_bucket}/tenant/job/checkpoints/iter-1"
    upload(source, uri, options)
    cache = tmp_path / "cache"

    first = local_model_dir(uri, options=options, cache_root=cache)
    again = local_model_dir(uri, options=options, cache_root=cache)
    assert first == again and first.parent == cache and first.name.startswith("iter-1-")
    assert contents(first) == contents(source)
    assert downloads(caplog) == 1

    # The same URI written again is other content: a new entry, not the stale one.
    (source / "config.json").write_text('{"model_type": "llama", "rewritten": true}')
    upload(source, uri, options)
    rewritten = local_model_dir(uri, options=options, cache_root=cache)
    assert rewritten != first
    assert contents(rewritten) == contents(source)
    assert downloads(caplog) == 2
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == sorted(
        [first.name, rewritten.name]
    )


def test_replicas_asking_at_once_share_one_download(
    tmp_path: Path, s3_bucket: str, options: StorageOptions, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="serve_apps.model_cache")
    source = model_files(tmp_path)
    uri = f"s3://{s3_bucket}/model"
    upload(source, uri, options)
    cache = tmp_path / "cache"
    start = threading.Barrier(4)
    results: list[Path] = []

    def replica() -> None:
        start.wait()
        results.append(local_model_dir(uri, options=options, cache_root=cache))

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 4 and len(set(results)) == 1
    assert downloads(caplog) == 1
    assert contents(results[0]) == contents(source)
    assert [p.name for p in cache.iterdir() if ".partial-" in p.name] == []


def test_nothing_stored_there(tmp_path: Path, s3_bucket: str, options: StorageOptions) -> None:
    with pytest.raises(FileNotFoundError, match="no files"):
        local_model_dir(f"s3://{s3_bucket}/nothing", options=options, cache_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_engine_serves_a_model_from_s3(
    demo_model_dir: Path, tmp_path: Path, s3_bucket: str, options: StorageOptions
) -> None:
    uri = f"s3://{s3_bucket}/models/demo"
    upload(demo_model_dir, uri, options)
    config = LLMAppConfig(
        name="demo", model_dir=uri, storage=options, model_cache_dir=tmp_path, device="cpu"
    )
    assert config.model_dir == uri
    engine = transformers_engine(config)
    request = GenerationRequest(
        prompt="<|begin_of_text|>Hi", sampling=SamplingOptions(max_tokens=3)
    )
    [result] = engine.generate([request])
    assert len(result.token_ids) == 3
    [entry] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (entry / "config.json").read_bytes() == (demo_model_dir / "config.json").read_bytes()
