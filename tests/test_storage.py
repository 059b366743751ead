"""raylm.storage: records and directories under a local path or a URI, through pyarrow
filesystems. `file://` URIs take the URI branches on local disk; a SubTreeFileSystem stands in
for an object store where a non-local pyarrow filesystem is needed."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow.fs
import pytest

from raylm import storage


def uri(path) -> str:
    return f"file://{path}"


def test_is_uri():
    assert storage.is_uri("s3://bucket/runs")
    assert storage.is_uri("file:///tmp/x")
    assert not storage.is_uri("/tmp/runs")
    assert not storage.is_uri("runs/s3:/x")


def test_storage_uri_makes_local_paths_absolute_and_passes_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.storage_uri("runs") == str(tmp_path / "runs")
    assert storage.storage_uri("./a/../runs") == str(tmp_path / "runs")
    assert storage.storage_uri("~/runs") == str(tmp_path / "home" / "runs")
    assert storage.storage_uri("s3://bucket/runs") == "s3://bucket/runs"
    assert storage.storage_uri("gs://b/~/x") == "gs://b/~/x"


def test_join_on_uris_and_local_paths():
    assert storage.join("s3://bucket/runs/", "job", "manifest.json") == (
        "s3://bucket/runs/job/manifest.json"
    )
    assert storage.join("s3://bucket/runs", "job") == "s3://bucket/runs/job"
    assert storage.join("s3://bucket") == "s3://bucket"
    assert storage.join("/runs", "job", "x.json") == os.path.join("/runs", "job", "x.json")
    assert storage.join("runs/", "job") == os.path.join("runs/", "job")
    assert storage.join("", "job", "x.json") == os.path.join("job", "x.json")  # stays relative


def test_join_collapses_the_trailing_slashes_of_a_uri():
    assert storage.join("s3://bucket/runs//", "job") == "s3://bucket/runs/job"
    assert storage.join("gs://bucket/BOX/", "job") == "gs://bucket/BOX/job"


def test_uri_of_local_and_remote_filesystems(tmp_path):
    local = pyarrow.fs.LocalFileSystem()
    assert storage.uri_of(None, "/runs/job") == "/runs/job"
    assert storage.uri_of(local, "/runs/job") == "/runs/job"
    remote = pyarrow.fs.SubTreeFileSystem(str(tmp_path), local)
    assert storage.uri_of(remote, "bucket/runs") == "subtree://bucket/runs"
    assert storage.uri_of(remote, "s3://bucket/runs") == "s3://bucket/runs"  # already a URI


def test_uri_of_names_object_stores_by_their_uri_scheme():
    gcs = pyarrow.fs.GcsFileSystem(anonymous=True)
    assert storage.uri_of(gcs, "bucket/runs/job") == "gs://bucket/runs/job"
    s3 = pyarrow.fs.S3FileSystem(anonymous=True, region="us-east-1")
    assert storage.uri_of(s3, "bucket/runs/job") == "s3://bucket/runs/job"


@pytest.mark.parametrize("as_uri", [False, True])
def test_exists_for_files_directories_and_nothing(tmp_path, as_uri):
    name = uri if as_uri else str
    (tmp_path / "d").mkdir()
    (tmp_path / "f.json").write_text("{}")
    assert storage.exists(name(tmp_path / "d"))
    assert storage.exists(name(tmp_path / "f.json"))
    assert not storage.exists(name(tmp_path / "missing"))


def test_exists_reads_relative_local_paths_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.json").write_text("{}")
    assert storage.exists("here.json")
    assert not storage.exists("there.json")


@pytest.mark.parametrize("as_uri", [False, True])
def test_write_then_read_json_round_trips(tmp_path, as_uri):
    path = tmp_path / "runs" / "job" / "record.json"  # parent directories do not exist yet
    target = uri(path) if as_uri else str(path)
    obj = {"name": "job", "metrics": {"eval_loss": 0.5}, "steps": [1, 2], "note": "é"}
    storage.write_json(target, obj)
    assert storage.read_json(target) == obj
    assert json.loads(path.read_text(encoding="utf-8")) == obj
    assert path.read_text(encoding="utf-8") == json.dumps(obj, indent=2)  # readable records
    assert sorted(os.listdir(path.parent)) == ["record.json"]  # no temporary file left


@pytest.mark.parametrize("as_uri", [False, True])
def test_write_json_replaces_a_record(tmp_path, as_uri):
    path = tmp_path / "record.json"
    target = uri(path) if as_uri else str(path)
    storage.write_json(target, {"a": 1, "long": "x" * 100})
    storage.write_json(target, {"a": 2})
    assert storage.read_json(target) == {"a": 2}


@pytest.mark.parametrize("as_uri", [False, True])
def test_read_json_of_nothing_raises_file_not_found(tmp_path, as_uri):
    target = uri(tmp_path / "none.json") if as_uri else str(tmp_path / "none.json")
    with pytest.raises(FileNotFoundError) as info:
        storage.read_json(target)
    assert str(target) in str(info.value)


def test_local_records_are_read_as_utf8_whatever_the_locale(tmp_path):
    import subprocess
    import sys

    from .conftest import REPO

    path = tmp_path / "record.json"
    path.write_bytes(json.dumps({"name": "café ∑"}, ensure_ascii=False).encode("utf-8"))
    assert storage.read_json(str(path)) == {"name": "café ∑"}
    code = "import sys; from raylm import storage; print(ascii(storage.read_json(sys.argv[1])))"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ascii({"name": "café ∑"})


def test_local_records_are_written_by_rename(tmp_path, monkeypatch):
    path = str(tmp_path / "record.json")
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((a, b)), real_replace(a, b)))
    storage.write_json(path, [1])
    assert renames == [(path + ".tmp", path)]


def _tree(root):
    for rel in ("ckpt_000002/model.bin", "ckpt_000001/a/b.txt", "ckpt_000010/x", "other/y"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("data" * (len(rel) % 5 + 1))
    (root / "ckpt_file").write_text("not a directory")
    (root / "ckpt_empty").mkdir()


@pytest.mark.parametrize("as_uri", [False, True])
def test_child_dirs_are_sorted_directories_with_the_prefix(tmp_path, as_uri):
    _tree(tmp_path)
    base = uri(tmp_path) if as_uri else str(tmp_path)
    assert storage.child_dirs(base, "ckpt_") == [
        f"{tmp_path}/ckpt_000001",
        f"{tmp_path}/ckpt_000002",
        f"{tmp_path}/ckpt_000010",
        f"{tmp_path}/ckpt_empty",
    ]
    assert storage.child_dirs(base) == storage.child_dirs(base, "ckpt_") + [f"{tmp_path}/other"]
    assert storage.child_dirs(base + "/", "other") == [f"{tmp_path}/other"]


@pytest.mark.parametrize("as_uri", [False, True])
def test_child_dirs_of_a_file_or_nothing_is_empty(tmp_path, as_uri):
    _tree(tmp_path)
    name = uri if as_uri else str
    assert storage.child_dirs(name(tmp_path / "ckpt_file")) == []
    assert storage.child_dirs(name(tmp_path / "missing")) == []
    assert storage.child_dirs(name(tmp_path / "ckpt_empty")) == []


@pytest.mark.parametrize("as_uri", [False, True])
def test_file_sizes_of_every_file_below_by_relative_path(tmp_path, as_uri):
    _tree(tmp_path)
    name = uri if as_uri else str
    assert storage.file_sizes(name(tmp_path / "ckpt_000001")) == {
        "a/b.txt": (tmp_path / "ckpt_000001/a/b.txt").stat().st_size
    }
    expected = {
        str(p.relative_to(tmp_path)): p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()
    }
    assert len(expected) == 5 and len(set(expected.values())) > 1
    assert storage.file_sizes(name(tmp_path)) == expected
    assert storage.file_sizes(name(tmp_path) + "/") == expected
    assert storage.file_sizes(name(tmp_path / "ckpt_empty")) == {}
    assert storage.file_sizes(name(tmp_path / "ckpt_file")) == {}
    assert storage.file_sizes(name(tmp_path / "missing")) == {}


@pytest.mark.parametrize("name", ["runs ", "BOX"])
def test_directory_names_are_taken_as_they_are(tmp_path, name):
    base = tmp_path / name  # a trailing space or X is part of the name
    (base / "ckpt_1").mkdir(parents=True)
    (base / "ckpt_1" / "f").write_text("abc")
    assert storage.child_dirs(str(base)) == [f"{base}/ckpt_1"]
    assert storage.file_sizes(str(base)) == {"ckpt_1/f": 3}


@pytest.mark.parametrize("as_uri", [False, True])
def test_move_moves_a_directory_tree(tmp_path, as_uri):
    _tree(tmp_path / "src")
    name = uri if as_uri else str
    before = storage.file_sizes(str(tmp_path / "src"))
    storage.move(name(tmp_path / "src"), name(tmp_path / "dst"))
    assert not (tmp_path / "src").exists()
    assert storage.file_sizes(str(tmp_path / "dst")) == before


def test_move_between_a_uri_and_a_local_path(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("x")
    storage.move(uri(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "b" / "f").read_text() == "x"
    storage.move(str(tmp_path / "b"), uri(tmp_path / "c"))
    assert (tmp_path / "c" / "f").read_text() == "x" and not (tmp_path / "b").exists()


def test_staged_dir_on_local_disk_is_the_directory_itself(tmp_path):
    target = tmp_path / "runs" / "job"
    with storage.staged_dir(str(target)) as out:
        assert out == str(target)
        assert os.path.isdir(out)
        (target / "f.txt").write_text("x")
    assert (target / "f.txt").read_text() == "x"
    with storage.staged_dir(str(target)) as again:  # an existing directory is fine
        assert again == str(target)


def test_staged_dir_for_a_uri_uploads_on_exit(tmp_path):
    target = tmp_path / "bucket" / "runs" / "job"
    with storage.staged_dir(uri(target)) as out:
        assert out != str(target) and os.path.isdir(out)
        assert os.path.basename(out).startswith("raylm-stage-")
        os.makedirs(os.path.join(out, "sub"))
        with open(os.path.join(out, "sub", "f.txt"), "w") as f:
            f.write("hello")
        assert not target.exists()  # nothing is uploaded before the block ends
    assert (target / "sub" / "f.txt").read_text() == "hello"
    assert not os.path.exists(out)  # the staging directory is removed


def test_local_dir_of_local_paths_is_the_path(tmp_path):
    assert storage.local_dir(str(tmp_path)) == str(tmp_path)
    assert storage.local_dir("relative/dir") == "relative/dir"
    assert storage.local_dir(uri(tmp_path)) == str(tmp_path)
    local = pyarrow.fs.LocalFileSystem()
    assert storage.local_dir(str(tmp_path / "x"), filesystem=local) == str(tmp_path / "x")


def _remote(tmp_path):
    """An object-store stand-in: a non-local pyarrow filesystem rooted at tmp_path/remote."""
    root = tmp_path / "remote"
    (root / "ckpt" / "sub").mkdir(parents=True)
    (root / "ckpt" / "model.bin").write_text("weights")
    (root / "ckpt" / "sub" / "config.json").write_text("{}")
    return root, pyarrow.fs.SubTreeFileSystem(str(root), pyarrow.fs.LocalFileSystem())


def test_local_dir_downloads_a_remote_directory_once_into_the_cache(tmp_path):
    root, remote = _remote(tmp_path)
    cache = tmp_path / "cache"
    got = storage.local_dir("ckpt", cache=str(cache), filesystem=remote)
    assert got == str(cache / hashlib.sha256(b"ckpt").hexdigest()[:16])
    assert open(os.path.join(got, "model.bin")).read() == "weights"
    assert open(os.path.join(got, "sub", "config.json")).read() == "{}"
    assert os.path.exists(os.path.join(got, ".complete"))
    assert os.listdir(cache) == [os.path.basename(got)]  # no download directory left
    (root / "ckpt" / "model.bin").write_text("changed")
    assert storage.local_dir("ckpt", cache=str(cache), filesystem=remote) == got
    assert open(os.path.join(got, "model.bin")).read() == "weights"  # not downloaded again


def test_local_dir_keeps_one_copy_per_remote_path(tmp_path):
    root, remote = _remote(tmp_path)
    (root / "other").mkdir()
    (root / "other" / "f").write_text("o")
    cache = str(tmp_path / "cache")
    a = storage.local_dir("ckpt", cache=cache, filesystem=remote)
    b = storage.local_dir("other", cache=cache, filesystem=remote)
    assert a != b
    assert sorted(os.listdir(b)) == [".complete", "f"]


def test_an_unfinished_download_is_fetched_again(tmp_path):
    _, remote = _remote(tmp_path)
    cache = tmp_path / "cache"
    target = cache / hashlib.sha256(b"ckpt").hexdigest()[:16]
    target.mkdir(parents=True)  # a directory without `.complete`: a download that died
    got = storage.local_dir("ckpt", cache=str(cache), filesystem=remote)
    assert got == str(target)
    assert open(os.path.join(got, "model.bin")).read() == "weights"


def test_a_download_finished_first_by_another_process_is_kept(tmp_path):
    _, remote = _remote(tmp_path)
    cache = tmp_path / "cache"
    target = cache / hashlib.sha256(b"ckpt").hexdigest()[:16]
    target.mkdir(parents=True)
    (target / "model.bin").write_text("theirs")  # not empty: the rename onto it fails
    got = storage.local_dir("ckpt", cache=str(cache), filesystem=remote)
    assert got == str(target)
    assert (target / "model.bin").read_text() == "theirs"
    assert os.listdir(cache) == [target.name]  # our copy was removed


def test_local_dir_caches_under_raylm_cache_or_home(tmp_path, monkeypatch):
    _, remote = _remote(tmp_path)
    key = hashlib.sha256(b"ckpt").hexdigest()[:16]
    monkeypatch.setenv("RAYLM_CACHE", str(tmp_path / "rc"))
    got = storage.local_dir("ckpt", filesystem=remote)
    assert got == str(tmp_path / "rc" / "remote" / key)
    monkeypatch.delenv("RAYLM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    got = storage.local_dir("ckpt", filesystem=remote)
    assert got == str(tmp_path / "home" / ".cache" / "raylm" / "remote" / key)
    assert os.path.exists(os.path.join(got, "model.bin"))


def test_a_downloaded_copy_is_used_even_when_the_remote_is_gone(tmp_path):
    import shutil

    root, remote = _remote(tmp_path)
    cache = str(tmp_path / "cache")
    got = storage.local_dir("ckpt", cache=cache, filesystem=remote)
    shutil.rmtree(root / "ckpt")
    assert storage.local_dir("ckpt", cache=cache, filesystem=remote) == got
    assert open(os.path.join(got, "model.bin")).read() == "weights"


def test_a_download_in_progress_is_hidden_beside_the_target(tmp_path):
    from fsspec.implementations.local import LocalFileSystem as FsspecLocal

    cache = tmp_path / "cache"
    seen: list[list[str]] = []

    class Watched(FsspecLocal):
        """Local files through fsspec; records the cache's contents when a file is read."""

        def open(self, path, mode="rb", **kwargs):
            seen.append(sorted(os.listdir(cache)))
            return super().open(path, mode, **kwargs)

    root = tmp_path / "remote"
    root.mkdir()
    (root / "model.bin").write_text("weights")
    remote = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(Watched(skip_instance_cache=True)))
    got = storage.local_dir(str(root), cache=str(cache), filesystem=remote)
    assert open(os.path.join(got, "model.bin")).read() == "weights"
    assert len(seen) == 1 and len(seen[0]) == 1
    assert seen[0][0].startswith(".download-")  # not the target, and hidden from listings
    assert os.listdir(cache) == [os.path.basename(got)]


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """An object store stand-in: `subtree://KEY` URIs resolve to a pyarrow SubTreeFileSystem
    rooted at tmp_path/bucket (a filesystem that is not LocalFileSystem, as S3's is not)."""
    root = tmp_path / "bucket"
    root.mkdir()
    remote = pyarrow.fs.SubTreeFileSystem(str(root), pyarrow.fs.LocalFileSystem())
    real = storage._fs

    def resolve(path):
        if path.startswith("subtree://"):
            return remote, path.removeprefix("subtree://")
        return real(path)

    monkeypatch.setattr(storage, "_fs", resolve)
    return root


def test_records_on_an_object_store(bucket):
    storage.write_json("subtree://runs/job/manifest.json", {"best": "ckpt_2"})
    assert json.loads((bucket / "runs/job/manifest.json").read_text()) == {"best": "ckpt_2"}
    assert storage.exists("subtree://runs/job/manifest.json")
    assert storage.read_json("subtree://runs/job/manifest.json") == {"best": "ckpt_2"}
    with pytest.raises(FileNotFoundError):
        storage.read_json("subtree://runs/job/none.json")


def test_object_store_listings_are_uris_that_resolve_again(bucket, tmp_path):
    _tree(bucket / "runs")
    dirs = storage.child_dirs("subtree://runs", "ckpt_0")
    assert dirs == [
        "subtree://runs/ckpt_000001",
        "subtree://runs/ckpt_000002",
        "subtree://runs/ckpt_000010",
    ]
    assert storage.file_sizes(dirs[0]) == {
        "a/b.txt": (bucket / "runs/ckpt_000001/a/b.txt").stat().st_size
    }
    local = storage.local_dir(dirs[0], cache=str(tmp_path / "cache"))
    assert local.startswith(str(tmp_path / "cache"))
    assert (
        open(os.path.join(local, "a", "b.txt")).read()
        == (bucket / "runs/ckpt_000001/a/b.txt").read_text()
    )


def test_staging_and_moving_on_an_object_store(bucket):
    with storage.staged_dir("subtree://runs/job/ckpt") as out:
        with open(os.path.join(out, "w.bin"), "w") as f:
            f.write("w")
    assert (bucket / "runs/job/ckpt/w.bin").read_text() == "w"
    (bucket / "done").mkdir()
    storage.move("subtree://runs/job", "subtree://done/job")
    assert (bucket / "done/job/ckpt/w.bin").read_text() == "w"
    assert not (bucket / "runs/job").exists()
