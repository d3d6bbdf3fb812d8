"""burla._environment: the manifest of the client's environment, and its deterministic blobs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest

from burla._environment import Snapshot, snapshot
from burla.errors import BurlaError, InvalidArgumentError, TooLargeError
from burla.schemas.environment import FILES, INDEX, Environment

# --------------------------------------------------------------------------- helpers


def write(path: Path, data: str | bytes = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def make_dist(
    site: Path,
    name: str,
    version: str,
    files: dict[str, str] | None = None,
    direct_url: Mapping[str, object] | None = None,
    tags: tuple[str, ...] | None = ("py3-none-any",),
    top_level: list[str] | None = None,
    record_extra: tuple[str, ...] = (),
) -> Path:
    """A dist-info directory as pip writes it, and the files its RECORD lists."""
    meta = site / f"{name.replace('-', '_')}-{version}.dist-info"
    write(meta / "METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: x\n\nLong: body\n")
    write(meta / "INSTALLER", "pip\n")
    if tags is not None:
        lines = "".join(f"Tag: {tag}\n" for tag in tags)
        write(meta / "WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n{lines}")
    if direct_url is not None:
        write(meta / "direct_url.json", json.dumps(direct_url))
    if top_level is not None:
        write(meta / "top_level.txt", "".join(f"{t}\n" for t in top_level))
    for rel, content in (files or {}).items():
        write(site / rel, content)
    listed = [*sorted(files or {}), *record_extra, *(f"{meta.name}/{p.name}" for p in sorted(meta.iterdir()))]
    write(meta / "RECORD", "".join(f"{rel},,\n" for rel in [*listed, f"{meta.name}/RECORD"]))
    return meta


def dists(snap: Snapshot) -> dict[str, tuple[str, str]]:
    return {d.name: (d.version, d.source) for d in snap.manifest.distributions}


def blob(snap: Snapshot, digest: str) -> bytes:
    value = snap.blobs[digest]
    data = value() if callable(value) else value
    assert hashlib.sha256(data).hexdigest() == digest
    return data


def tar_members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {m.name: m for m in tar.getmembers()}


def extract(data: bytes, into: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        tar.extractall(into, filter="data")
    return into


def run_python(code: str, cwd: Path, isolated: bool = True) -> str:
    """Run `code` in a fresh interpreter; with `isolated`, nothing but the standard library on its path."""
    args = [sys.executable, *(["-I", "-S"] if isolated else []), "-c", textwrap.dedent(code)]
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def site(tmp_path: Path) -> Path:
    path = tmp_path / "lib" / "site-packages"
    path.mkdir(parents=True)
    return path


LOCAL_WHEEL = {"url": "file:///home/me/dist/priv-1.0-py3-none-any.whl", "archive_info": {}}


# --------------------------------------------------------------------------- distributions


def test_index_and_files_sources(site: Path) -> None:
    make_dist(site, "requests", "2.32.3", {"requests/__init__.py": ""})
    make_dist(site, "priv", "1.0", {"priv/__init__.py": ""}, direct_url=LOCAL_WHEEL)
    vcs = {"url": "https://github.com/me/vcsdep", "vcs_info": {"vcs": "git", "commit_id": "abc"}}
    make_dist(site, "vcsdep", "0.1", {"vcsdep.py": ""}, direct_url=vcs)
    archive = {"url": "https://example.com/build-3.0.tar.gz", "archive_info": {"hash": "sha256=00"}}
    make_dist(site, "urldep", "3.0", {"urldep.py": ""}, direct_url=archive)
    for tooling in ("pip", "setuptools", "wheel", "uv", "pkg_resources", "distribute", "burla"):
        make_dist(site, tooling, "1.0", {f"{tooling}/__init__.py": ""})
    snap = snapshot(paths=[str(site)])
    assert dists(snap) == {
        "requests": ("2.32.3", INDEX),
        "priv": ("1.0", FILES),
        "vcsdep": ("0.1", FILES),
        "urldep": ("3.0", FILES),
    }
    by_name = {d.name: d for d in snap.manifest.distributions}
    assert by_name["requests"].blob == ""
    for name in ("priv", "vcsdep", "urldep"):
        assert by_name[name].blob in snap.blobs
    assert [d.name for d in snap.manifest.distributions] == sorted(by_name)  # sorted: a deterministic manifest
    assert snap.digest == snap.manifest.digest()
    assert Environment.loads(snap.manifest.canonical()) == snap.manifest
    assert snap.manifest.python_version == f"{sys.version_info[0]}.{sys.version_info[1]}"


def test_names_are_normalized_and_the_first_on_the_path_wins(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "site-packages", tmp_path / "b" / "site-packages"
    make_dist(first, "Zope.Interface_Extra", "5.0", {"zi.py": ""})
    make_dist(second, "zope-interface-extra", "4.0", {"zi.py": ""})
    make_dist(second, "Only_Here", "1.0", {"only.py": ""})
    snap = snapshot(paths=[str(first), str(second)])
    assert dists(snap) == {"zope-interface-extra": ("5.0", INDEX), "only-here": ("1.0", INDEX)}


def test_wheel_tags_in_file_order(site: Path) -> None:
    tags = ("cp311-cp311-manylinux_2_17_x86_64", "cp311-cp311-manylinux2014_x86_64")
    make_dist(site, "native", "1.0", {"native.py": ""}, tags=tags)
    make_dist(site, "notags", "1.0", {"notags.py": ""}, tags=None)
    by_name = {d.name: d for d in snapshot(paths=[str(site)]).manifest.distributions}
    assert by_name["native"].tags == tags
    assert by_name["notags"].tags == ()


def test_exclude_any_spelling(site: Path) -> None:
    make_dist(site, "Foo.Bar_baz", "1.0", {"fbb.py": ""})
    make_dist(site, "keep", "1.0", {"keep.py": ""})
    make_dist(site, "priv", "1.0", {"priv/__init__.py": ""}, direct_url=LOCAL_WHEEL)
    assert set(dists(snapshot(paths=[str(site)], exclude=["FOO-BAR.BAZ", "Priv"]))) == {"keep"}
    snap = snapshot(paths=[str(site)], exclude="foo_bar_baz")  # one name, not its characters
    assert set(dists(snap)) == {"keep", "priv"}
    with pytest.raises(InvalidArgumentError, match="empty"):
        snapshot(paths=[str(site)], exclude=[" "])
    with pytest.raises(InvalidArgumentError, match="strings"):
        snapshot(paths=[str(site)], exclude=[3])  # type: ignore[list-item]


def test_requirements_add_and_replace(site: Path) -> None:
    make_dist(site, "numpy", "1.26.4", {"numpy/__init__.py": ""})
    make_dist(site, "priv", "1.0", {"priv/__init__.py": ""}, direct_url=LOCAL_WHEEL)
    snap = snapshot(paths=[str(site)], requirements=["Extra_Thing == 2.0", "numpy==2.0.0", "priv==1.0+local"])
    assert dists(snap) == {
        "extra-thing": ("2.0", INDEX),
        "numpy": ("2.0.0", INDEX),
        "priv": ("1.0+local", INDEX),
    }
    assert not [d for d in snap.manifest.distributions if d.blob]
    assert all(d not in snap.blobs for d in {d.blob for d in snapshot(paths=[str(site)]).manifest.distributions})


@pytest.mark.parametrize(
    "entry",
    ["numpy>=1.26", "numpy", "numpy==1.*", "numpy[extra]==1.0", "git+https://github.com/me/x", "numpy==1 ; os", "==1"],
)
def test_requirements_must_be_exact_pins(site: Path, entry: str) -> None:
    with pytest.raises(InvalidArgumentError, match="requirements entry") as info:
        snapshot(paths=[str(site)], requirements=["ok==1.0", entry])
    assert repr(entry) in str(info.value)


def test_requirements_conflicting_pins(site: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="twice"):
        snapshot(paths=[str(site)], requirements=["a==1", "A==2"])


def test_index_urls_from_pip_settings(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    manifest = snapshot(paths=[str(site)]).manifest
    assert (manifest.index_url, manifest.extra_index_urls) == ("", ())
    monkeypatch.setenv("PIP_INDEX_URL", " https://pypi.corp/simple ")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "https://a/simple\n https://b/simple")
    manifest = snapshot(paths=[str(site)]).manifest
    assert manifest.index_url == "https://pypi.corp/simple"
    assert manifest.extra_index_urls == ("https://a/simple", "https://b/simple")


# --------------------------------------------------------------------------- files tars


def make_priv(site: Path) -> Path:
    return make_dist(
        site,
        "priv",
        "1.0",
        {
            "priv/__init__.py": "from .core import VALUE\n",
            "priv/core.py": "VALUE = 42\n",
            "priv/data/table.csv": "a,b\n",
            "priv/__pycache__/core.cpython-311.pyc": "junk",
        },
        direct_url=LOCAL_WHEEL,
        record_extra=("../../bin/priv-cli", "priv/gone.py"),
    )


def files_blob(snap: Snapshot, name: str) -> tuple[str, bytes]:
    (dist,) = [d for d in snap.manifest.distributions if d.name == name]
    assert dist.source == FILES
    return dist.blob, blob(snap, dist.blob)


def test_files_tar_layout_imports(site: Path, tmp_path: Path) -> None:
    meta = make_priv(site)
    write(tmp_path / "bin" / "priv-cli", "#!/bin/sh\n")
    _, data = files_blob(snapshot(paths=[str(site)]), "priv")
    members = tar_members(data)
    assert list(members) == sorted(members)
    assert set(members) == {
        "priv/__init__.py",
        "priv/core.py",
        "priv/data/table.csv",
        *(f"{meta.name}/{f}" for f in ("INSTALLER", "METADATA", "RECORD", "WHEEL", "direct_url.json")),
    }
    for info in members.values():
        assert info.isfile() and (info.mtime, info.uid, info.gid, info.uname, info.gname) == (0, 0, 0, "", "")
    unpacked = extract(data, tmp_path / "unpacked")
    out = run_python(
        f"""
        import sys; sys.path.insert(0, {str(unpacked)!r})
        import importlib.metadata, priv
        print(priv.VALUE, importlib.metadata.version("priv"), priv.__file__.startswith({str(unpacked)!r}))
        """,
        cwd=tmp_path,
    )
    assert out.split() == ["42", "1.0", "True"]


def test_blob_digests_are_deterministic(site: Path, tmp_path: Path) -> None:
    make_priv(site)
    snap = snapshot(paths=[str(site)])
    again = snapshot(paths=[str(site)])
    assert again.manifest == snap.manifest and again.digest == snap.digest
    digest, data = files_blob(snap, "priv")
    assert blob(again, digest) == data  # built twice, byte for byte the same

    copy = tmp_path / "elsewhere" / "site-packages"
    shutil.copytree(site, copy)  # other paths, other mtimes: same content, same digests
    os.utime(copy / "priv" / "core.py", ns=(1, 1))
    moved = snapshot(paths=[str(copy)])
    assert moved.manifest == snap.manifest and moved.digest == snap.digest

    write(site / "priv" / "core.py", "VALUE = 43  # changed\n")
    changed = snapshot(paths=[str(site)])
    new_digest, new_data = files_blob(changed, "priv")
    assert new_digest != digest and changed.digest != snap.digest
    assert b"VALUE = 43" in new_data
    write(site / "priv" / "core.py", "VALUE = 42\n")
    assert files_blob(snapshot(paths=[str(site)]), "priv")[0] == digest


def test_a_new_distribution_is_seen(site: Path) -> None:
    make_dist(site, "one", "1.0", {"one.py": ""})
    assert set(dists(snapshot(paths=[str(site)]))) == {"one"}
    make_dist(site, "two", "1.0", {"two.py": ""})
    assert set(dists(snapshot(paths=[str(site)]))) == {"one", "two"}


# --------------------------------------------------------------------------- editable installs

FINDER = """\
import sys
MAPPING: dict[str, str] = {mapping!r}
NAMESPACES: dict[str, list[str]] = {{}}
PATH_PLACEHOLDER = "__editable__.mypkg-1.0.finder" + ".__path_hook__"


def install():
    raise RuntimeError("never run by the snapshot")
"""


def make_setuptools_editable(site: Path, project: Path) -> Path:
    """An editable install laid out as setuptools (>= 64) writes it: a finder mapping names to source folders."""
    write(project / "src" / "mypkg" / "__init__.py", "from .sub.mod import VALUE\n")
    write(project / "src" / "mypkg" / "sub" / "__init__.py")
    write(project / "src" / "mypkg" / "sub" / "mod.py", "VALUE = 'editable'\n")
    write(project / "src" / "mypkg" / "data.json", '{"ok": true}')
    write(project / "src" / "mypkg" / "__pycache__" / "mod.cpython-311.pyc", "junk")
    write(project / "extra" / "__init__.py", "EXTRA = 1\n")  # mapped as mypkg.extra, as burla.daemon is
    write(project / "mymod.py", "M = 'mod'\n")  # mapped without its suffix, as setuptools writes modules
    write(project / "setup.py", "raise SystemExit('not packed')\n")
    mapping = {
        "mymod": str(project / "mymod"),
        "mypkg": str(project / "src" / "mypkg"),
        "mypkg.extra": str(project / "extra"),
    }
    write(site / "__editable___mypkg_1_0_finder.py", FINDER.format(mapping=mapping))
    write(
        site / "__editable__.mypkg-1.0.pth",
        "import __editable___mypkg_1_0_finder; __editable___mypkg_1_0_finder.install()",
    )
    return make_dist(
        site,
        "mypkg",
        "1.0",
        direct_url={"url": project.as_uri(), "dir_info": {"editable": True}},
        top_level=["mypkg"],
        record_extra=("__editable__.mypkg-1.0.pth", "__editable___mypkg_1_0_finder.py", "../../bin/mypkg-cli"),
    )


def test_editable_setuptools_finder(site: Path, tmp_path: Path) -> None:
    meta = make_setuptools_editable(site, tmp_path / "project")
    snap = snapshot(paths=[str(site)])
    digest, data = files_blob(snap, "mypkg")
    assert {d.name: d.version for d in snap.manifest.distributions} == {"mypkg": "1.0"}
    names = set(tar_members(data))
    assert {"mymod.py", "mypkg/__init__.py", "mypkg/sub/mod.py", "mypkg/data.json", "mypkg/extra/__init__.py"} <= names
    assert f"{meta.name}/METADATA" in names and f"{meta.name}/direct_url.json" in names
    assert not [n for n in names if "__pycache__" in n or "setup.py" in n or "finder" in n or n.endswith(".pth")]

    unpacked = extract(data, tmp_path / "unpacked")
    out = run_python(
        f"""
        import sys; sys.path.insert(0, {str(unpacked)!r})
        import importlib.metadata, importlib.resources, mymod, mypkg, mypkg.extra
        print(mypkg.VALUE, mypkg.extra.EXTRA, mymod.M, importlib.metadata.version("mypkg"))
        print(importlib.resources.files("mypkg").joinpath("data.json").read_text())
        """,
        cwd=tmp_path,
    )
    assert out.split() == ["editable", "1", "mod", "1.0", '{"ok":', "true}"]

    write(tmp_path / "project" / "src" / "mypkg" / "sub" / "mod.py", "VALUE = 'edited'\n")
    edited_digest, edited = files_blob(snapshot(paths=[str(site)]), "mypkg")
    assert edited_digest != digest and b"VALUE = 'edited'" in edited


def test_editable_pth_directory(site: Path, tmp_path: Path) -> None:
    """A .pth that lists the source folder (setuptools' compat mode, hatchling, pdm), with top_level.txt."""
    src = tmp_path / "proj2" / "src"
    write(src / "otherpkg" / "__init__.py", "from solo import SOLO\n")
    write(src / "solo.py", "SOLO = 'solo'\n")
    write(src / "unrelated.py", "raise SystemExit('not packed')\n")
    write(site / "_otherpkg.pth", f"{src}\n")
    make_dist(
        site,
        "otherpkg",
        "2.0",
        direct_url={"url": (tmp_path / "proj2").as_uri(), "dir_info": {"editable": True}},
        top_level=["otherpkg", "solo"],
        record_extra=("_otherpkg.pth",),
    )
    _, data = files_blob(snapshot(paths=[str(site)]), "otherpkg")
    names = set(tar_members(data))
    assert {"otherpkg/__init__.py", "solo.py"} <= names and "unrelated.py" not in names
    unpacked = extract(data, tmp_path / "unpacked")
    out = run_python(
        f"import sys; sys.path.insert(0, {str(unpacked)!r}); import otherpkg; print(otherpkg.SOLO)", tmp_path
    )
    assert out.split() == ["solo"]


def test_editable_pth_directory_without_top_level(site: Path, tmp_path: Path) -> None:
    src = tmp_path / "proj3"
    write(src / "third_pkg" / "__init__.py", "X = 3\n")
    write(src / "setup.py", "")
    write(src / "tests" / "__init__.py", "")
    write(site / "_third_pkg.pth", f"{src}\n")
    make_dist(
        site,
        "third-pkg",
        "0.3",
        direct_url={"url": src.as_uri(), "dir_info": {"editable": True}},
        record_extra=("_third_pkg.pth",),
    )
    _, data = files_blob(snapshot(paths=[str(site)]), "third-pkg")
    assert {n for n in tar_members(data) if not n.startswith("third_pkg-0.3.dist-info/")} == {"third_pkg/__init__.py"}


def test_setup_py_develop_egg_info(site: Path, tmp_path: Path) -> None:
    """`setup.py develop`: an .egg-info in the source folder, which a .pth put on the path."""
    src = tmp_path / "legacy"
    write(src / "legacy_pkg" / "__init__.py", "L = 1\n")
    write(src / "Legacy_Pkg.egg-info" / "PKG-INFO", "Metadata-Version: 1.0\nName: Legacy-Pkg\nVersion: 0.9\n")
    write(src / "Legacy_Pkg.egg-info" / "top_level.txt", "legacy_pkg\n")
    snap = snapshot(paths=[str(site), str(src)])
    _, data = files_blob(snap, "legacy-pkg")
    assert set(tar_members(data)) == {
        "Legacy_Pkg.egg-info/PKG-INFO",
        "Legacy_Pkg.egg-info/top_level.txt",
        "legacy_pkg/__init__.py",
    }
    # the same name installed properly wins over a stale .egg-info left in a source folder, even one earlier on the path
    make_dist(site, "legacy-pkg", "1.0", {"legacy_pkg/__init__.py": ""})
    assert dists(snapshot(paths=[str(src), str(site)])) == {"legacy-pkg": ("1.0", INDEX)}


# --------------------------------------------------------------------------- local code

MAIN = """\
import site, sys, zipfile
sys.path[1:1] = [{lib!r}, {src!r}]
site.addsitedir({site!r})  # runs the editable install's .pth, as the interpreter does for site-packages
import helpers, mypkg.sub, editpkg
from burla._environment import snapshot
from burla.errors import TooLargeError

def work(x):
    import beside
    return helpers.double(mypkg.sub.VALUE) + beside.B + x

snap = snapshot(work)
with open({out!r}, "wb") as f:
    blob = snap.blobs[snap.manifest.code]
    f.write(blob() if callable(blob) else blob)
print("DISTS", sorted((d.name, d.source) for d in snap.manifest.distributions if d.name == "editpkg"))
print("AGAIN", snapshot(work).digest == snap.digest)
with zipfile.ZipFile({out!r}) as zf:
    print("TOPS", sorted({{n.split("/")[0] for n in zf.namelist()}}))
try:
    snapshot(work, max_code_bytes=100_000)
except TooLargeError as e:
    print("TOOLARGE", e)
print("NOPKG", snapshot(work, exclude=["MyPkg"]).manifest.code != snap.manifest.code)
"""


def test_local_code_zip_imports_alone(tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    write(proj / "lib" / "helpers.py", "def double(x):\n    return 2 * x\n")
    write(proj / "src" / "mypkg" / "__init__.py")
    write(proj / "src" / "mypkg" / "sub.py", "VALUE = 10\n")
    write(proj / "src" / "mypkg" / "data" / "table.csv", "a,b\n")
    write(proj / "src" / "mypkg" / "big.bin", b"x" * 150_000)
    write(proj / "src" / "mypkg" / "__pycache__" / "sub.cpython-311.pyc", "junk")
    write(proj / "src" / "mypkg" / ".git" / "config", "junk")
    with open(write(proj / "src" / "mypkg" / "huge.bin"), "wb") as f:
        f.truncate(11 * 1000**2)  # over the per-file limit: left out, without reading it
    write(proj / "app" / "beside.py", "B = 100\n")
    write(proj / "app" / "notes.txt", "not code")
    write(proj / "app" / "sub" / "deeper.py", "")  # beside the script means the script's folder only
    site = tmp_path / "venv" / "site-packages"
    write(site / "_editpkg.pth", f"{proj / 'edit'}\n")
    write(proj / "edit" / "editpkg" / "__init__.py")
    make_dist(
        site,
        "editpkg",
        "1.0",
        direct_url={"url": "file:///x", "dir_info": {"editable": True}},
        top_level=["editpkg"],
        record_extra=("_editpkg.pth",),
    )
    out_zip = tmp_path / "code.zip"
    main = write(
        proj / "app" / "main.py",
        MAIN.format(lib=str(proj / "lib"), src=str(proj / "src"), site=str(site), out=str(out_zip)),
    )
    proc = subprocess.run([sys.executable, str(main)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert lines["DISTS"] == "[('editpkg', 'files')]"  # an editable install travels as a distribution, not as code
    assert lines["AGAIN"] == "True"
    assert lines["TOPS"] == "['beside.py', 'helpers.py', 'mypkg']"
    assert "mypkg" in lines["TOOLARGE"] and "big.bin" in lines["TOOLARGE"] and "exclude" in lines["TOOLARGE"]
    assert lines["NOPKG"] == "True"

    with zipfile.ZipFile(out_zip) as zf:
        names = zf.namelist()
        assert names == sorted(names)
        assert all(info.date_time == (1980, 1, 1, 0, 0, 0) for info in zf.infolist())
    assert set(names) == {
        "beside.py",
        "helpers.py",
        "mypkg/",
        "mypkg/__init__.py",
        "mypkg/big.bin",
        "mypkg/data/",
        "mypkg/data/table.csv",
        "mypkg/sub.py",
    }
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_python(
        f"""
        import sys; sys.path.insert(0, {str(out_zip)!r})
        import beside, helpers, mypkg.sub, importlib.resources
        print(helpers.double(mypkg.sub.VALUE) + beside.B, helpers.__file__.startswith({str(out_zip)!r}))
        print(importlib.resources.files("mypkg").joinpath("data/table.csv").read_text().strip())
        """,
        cwd=elsewhere,
    )
    assert out.split() == ["120", "True", "a,b"]


def test_no_local_code_without_local_modules(tmp_path: Path) -> None:
    out = run_python(
        f"""
        from burla._environment import snapshot
        snap = snapshot(paths=[{str(tmp_path)!r}])
        print(repr(snap.manifest.code), len(snap.blobs), snap.manifest.distributions)
        """,
        cwd=tmp_path,
        isolated=False,
    )
    assert out.split() == ["''", "0", "()"]


def test_code_too_large_in_process(site: Path) -> None:
    # this test module is local code (not installed): the limit applies to it and its package
    with pytest.raises(TooLargeError, match=r"max_code_bytes.*test_environment\.py"):
        snapshot(paths=[str(site)], max_code_bytes=1)


def test_blobs_are_bytes_or_builders(site: Path) -> None:
    make_priv(site)
    snap = snapshot(paths=[str(site)])
    for digest, value in snap.blobs.items():
        assert isinstance(value, bytes) or callable(value)
        blob(snap, digest)


def test_a_builder_refuses_files_changed_after_the_snapshot(site: Path) -> None:
    make_priv(site)
    snap = snapshot(paths=[str(site)])
    digest, _ = files_blob(snap, "priv")
    write(site / "priv" / "core.py", "VALUE = 'changed since'\n")
    builder = snap.blobs[digest]
    assert callable(builder)
    with pytest.raises(BurlaError, match="changed"):
        builder()


def test_this_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    snap = snapshot(test_this_environment)
    by_name = {d.name: d for d in snap.manifest.distributions}
    assert by_name["pytest"].source == INDEX and by_name["pytest"].tags
    assert not {"burla", "pip", "setuptools"} & set(by_name)
    assert snapshot(test_this_environment).digest == snap.digest
    assert snap.manifest.code in snap.blobs  # this test module is local code
