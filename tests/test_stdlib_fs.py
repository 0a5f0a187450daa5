"""luanette.stdlib.fs: files under configured roots, within a run's fs.read / fs.write globs.

Every call goes through the real Lua runtime in-process (as tests/test_stdlib_temp.py
does), over real files under ``tmp_path``: a root ``samples`` and, beside it, an
``outside`` directory holding a file no script may reach.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
from pathlib import Path
from typing import Any

import pytest

from luanette.runtime import ScriptError, run_script
from luanette.stdlib.fs import TEMP_PREFIX, FsGlob, FsNamespace, check_glob
from luanette.stdlib.paths import MAX_NAME_BYTES, MAX_PATH_BYTES


def snapshot(directory: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under ``directory``: kind/size and content or link target."""
    found: dict[str, tuple[int, bytes | str]] = {}
    for parent, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(parent) / name
            if path.is_symlink():
                found[str(path)] = (0, os.readlink(path))
            elif path.is_file():
                found[str(path)] = (path.stat().st_size, path.read_bytes())
            else:
                found[str(path)] = (-1, "dir")
    return found


class Fs:
    """Roots under tmp_path and a way to run scripts with an FsNamespace over them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.root = tmp_path / "samples"
        (self.root / "drums").mkdir(parents=True)
        (self.root / "drums" / "kick.wav").write_bytes(b"RIFF\x00\xffkick")
        (self.root / "drums" / "snare.wav").write_bytes(b"snare")
        (self.root / "drums" / "deep").mkdir()
        (self.root / "drums" / "deep" / "tom.wav").write_bytes(b"tom")
        (self.root / "secret.wav").write_bytes(b"root secret")
        (self.root / "loops").mkdir()
        (self.root / "loops" / "a.mid").write_bytes(b"MThd")
        self.outside = tmp_path / "outside"
        self.outside.mkdir()
        (self.outside / "secret.txt").write_bytes(b"do not touch")
        self.roots = {"samples": self.root}
        self.messages: list[str] = []

    def namespace(self, read: list[str] | None = None, write: list[str] | None = None, **limits: Any) -> FsNamespace:
        return FsNamespace(self.roots, read or [], write or [], **limits)

    async def run(self, code: str, ns: FsNamespace) -> Any:
        return (await run_script(code, None, namespaces=[ns])).result

    async def names(self, directory: str, ns: FsNamespace) -> list[str]:
        """The names fs.list gives for ``directory``."""
        code = "local t = {} for _, e in ipairs(fs.list(params)) do t[#t + 1] = e.name end return t"
        return (await run_script(code, directory, namespaces=[ns])).result

    async def error(self, code: str, ns: FsNamespace) -> str:
        with pytest.raises(ScriptError) as info:
            await run_script(code, None, namespaces=[ns])
        message = str(info.value)
        self.messages.append(message)
        return message


@pytest.fixture
def fs(tmp_path: Path):
    fs = Fs(tmp_path)
    yield fs
    # no message of any test showed a host path
    for message in fs.messages:
        assert str(tmp_path) not in message, message
        assert "/tmp" not in message, message


EVERYTHING = ["*"]


# ------------------------------------------------------------------------ basics


async def test_read_write_list_exists_inside_grants(fs: Fs) -> None:
    ns = fs.namespace(read=["samples:**"], write=["samples:renders/**"])
    result = await fs.run(
        """
        local kick = fs.read("samples:drums/kick.wav")
        fs.write("samples:renders/mix/out.bin", "\\0\\1\\255binary")
        local back = fs.read("samples:./renders//mix/out.bin")
        return {
          kick = kick == "RIFF\\0\\255kick", back = back == "\\0\\1\\255binary",
          root = fs.list("samples:"), drums = fs.list("samples:drums"),
          yes = fs.exists("samples:drums/kick.wav"), no = fs.exists("samples:drums/none.wav"),
          dir = fs.exists("samples:drums"), top = fs.exists("samples:"),
          under_file = fs.exists("samples:drums/kick.wav/x"),
        }
        """,
        ns,
    )
    assert result["kick"] is True and result["back"] is True  # bytes are fine
    assert (fs.root / "renders" / "mix" / "out.bin").read_bytes() == b"\x00\x01\xffbinary"
    assert result["root"] == [
        {"name": "drums", "path": "samples:drums", "type": "dir"},
        {"name": "loops", "path": "samples:loops", "type": "dir"},
        {"name": "renders", "path": "samples:renders", "type": "dir"},
        {"name": "secret.wav", "path": "samples:secret.wav", "type": "file", "size": 11},
    ]
    assert result["drums"] == [
        {"name": "deep", "path": "samples:drums/deep", "type": "dir"},
        {"name": "kick.wav", "path": "samples:drums/kick.wav", "type": "file", "size": 10},
        {"name": "snare.wav", "path": "samples:drums/snare.wav", "type": "file", "size": 5},
    ]
    assert (result["yes"], result["no"], result["dir"], result["top"]) == (True, False, True, True)
    assert result["under_file"] is False


async def test_write_replaces_atomically_keeping_the_mode_and_leaves_no_temp_file(fs: Fs) -> None:
    target = fs.root / "drums" / "kick.wav"
    target.chmod(0o640)
    ns = fs.namespace(read=EVERYTHING, write=EVERYTHING)
    inode = target.stat().st_ino
    await fs.run('fs.write("samples:drums/kick.wav", string.rep("k", 1000))', ns)
    assert target.read_bytes() == b"k" * 1000
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert target.stat().st_ino != inode  # a new file renamed over the old one
    assert not [p for p in (fs.root / "drums").iterdir() if p.name.startswith(TEMP_PREFIX)]
    # an empty string makes an empty file
    await fs.run('fs.write("samples:empty", "")', ns)
    assert (fs.root / "empty").read_bytes() == b""


async def test_bad_arguments(fs: Fs) -> None:
    ns = fs.namespace(read=EVERYTHING, write=EVERYTHING)
    assert "data must be a string, got table" in await fs.error('fs.write("samples:x", {})', ns)
    assert "data must be a string, got nil" in await fs.error('fs.write("samples:x")', ns)
    assert "path must be a string, got number" in await fs.error("fs.read(42)", ns)
    assert "path must not be empty" in await fs.error('fs.read("")', ns)
    assert "is a directory, not a file" in await fs.error('fs.read("samples:drums")', ns)
    assert "is a directory, not a file" in await fs.error('fs.read("samples:")', ns)
    assert "is a directory, not a file" in await fs.error('fs.write("samples:drums", "x")', ns)
    assert "is the root directory itself" in await fs.error('fs.write("samples:", "x")', ns)
    assert "no file samples:drums/none.wav" in await fs.error('fs.read("samples:drums/none.wav")', ns)
    assert "no directory samples:nothing" in await fs.error('fs.list("samples:nothing")', ns)
    assert "samples:drums/kick.wav is not a directory" in await fs.error('fs.list("samples:drums/kick.wav")', ns)
    assert not (fs.root / "x").exists()


async def test_a_fifo_is_not_read_nor_written(fs: Fs) -> None:
    os.mkfifo(fs.root / "pipe")
    ns = fs.namespace(read=EVERYTHING, write=EVERYTHING)
    assert "samples:pipe is not a regular file" in await fs.error('fs.read("samples:pipe")', ns)
    assert "samples:pipe is not a regular file" in await fs.error('fs.write("samples:pipe", "x")', ns)
    names = await fs.names("samples:", ns)
    assert "pipe" not in names


# ------------------------------------------------------------------------ globs


@pytest.mark.parametrize(
    ("glob", "path", "matches", "below"),
    [
        ("samples:drums/*", "drums/kick.wav", True, False),
        ("samples:drums/*", "drums/deep/tom.wav", False, False),  # * does not cross /
        ("samples:drums/*", "drums", False, True),
        ("samples:drums/*", "", False, True),
        ("samples:drums/*", "loops", False, False),
        ("samples:drums/*.wav", "drums/kick.wav", True, False),
        ("samples:drums/*.wav", "drums/a.mid", False, False),
        ("samples:drums/k?ck.wav", "drums/kick.wav", True, False),
        ("samples:drums/[ks]*", "drums/snare.wav", True, False),
        ("samples:drums/[!ks]*", "drums/snare.wav", False, False),
        ("samples:drums/*", "drums/.hidden", True, False),  # a leading dot is not special
        ("samples:**", "", True, True),
        ("samples:**", "a/b/c/d", True, True),
        ("samples:drums/**", "drums", True, True),
        ("samples:drums/**", "drums/deep/tom.wav", True, True),
        ("samples:drums/**", "drumsticks/x", False, False),
        ("samples:**/*.wav", "drums/deep/tom.wav", True, True),
        ("samples:**/*.wav", "tom.wav", True, True),
        ("samples:**/*.wav", "drums/a.mid", False, True),
        ("samples:a/**/z", "a/z", True, True),
        ("samples:a/**/z", "a/b/c/z", True, True),
        ("samples:a/**/z", "a/b/c/y", False, True),
        ("samples:a/**/z", "b", False, False),
        ("samples:", "", True, False),
        ("samples:x", "x", True, False),
        ("*", "anything/at/all", True, True),
        ("**", "", True, True),
        ("*:loops/*", "loops/a.mid", True, False),
        ("other:**", "drums/kick.wav", False, False),  # another root
        ("samp*:drums/*", "drums/kick.wav", True, False),
    ],
)
def test_glob_semantics(glob: str, path: str, matches: bool, below: bool) -> None:
    g = FsGlob(glob)
    parts = tuple(p for p in path.split("/") if p)
    assert g.matches("samples", parts) is matches
    assert g.reaches_below("samples", parts) is below


@pytest.mark.parametrize(
    ("glob", "problem"),
    [
        ("", "non-empty"),
        ("samples", "must be ROOT:PATH"),
        (":drums/*", "must be ROOT:PATH"),
        ("samples:/etc/*", "must be relative"),
        ("samples:drums/../*", "must not contain '..'"),
        ("sam/ples:x", "must not contain '/'"),
        ("samples:a\x00b", "NUL"),
    ],
)
def test_bad_globs_are_refused(glob: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        check_glob(glob)
    with pytest.raises(ValueError, match=problem):
        FsNamespace({}, [glob], [])
    assert check_glob("samples:drums/*") == "samples:drums/*"


def test_from_capabilities(tmp_path: Path) -> None:
    ns = FsNamespace.from_capabilities(
        {"samples": tmp_path},
        ["fs.read:samples:drums/*", "fs.write", "model:orpheus", "fs.read:loops:**", "temp"],
        max_read_bytes=10,
    )
    assert [g.text for g in ns.read_globs] == ["samples:drums/*", "loops:**"]
    assert [g.text for g in ns.write_globs] == ["*"]
    assert ns.max_read_bytes == 10


# ------------------------------------------------------------------------ permission


async def test_permission_denied_outside_the_globs_names_the_capability(fs: Fs) -> None:
    ns = fs.namespace(read=["samples:drums/*"], write=["samples:renders/*"])
    message = await fs.error('fs.read("samples:secret.wav")', ns)
    assert message == (
        "fs.read: permission_denied: fs.read:samples:secret.wav is not granted "
        "(this script may read samples:drums/*); declare it in describe().capabilities"
    )
    # * does not cross /
    message = await fs.error('fs.read("samples:drums/deep/tom.wav")', ns)
    assert message.startswith("fs.read: permission_denied: fs.read:samples:drums/deep/tom.wav is not granted")
    message = await fs.error('fs.write("samples:drums/kick.wav", "x")', ns)
    assert message.startswith(
        "fs.write: permission_denied: fs.write:samples:drums/kick.wav is not granted "
        "(this script may write samples:renders/*)"
    )
    message = await fs.error('fs.write("samples:renders/sub/x.wav", "x")', ns)
    assert "permission_denied: fs.write:samples:renders/sub/x.wav is not granted" in message
    message = await fs.error('fs.list("samples:loops")', ns)
    assert message.startswith("fs.list: permission_denied: fs.read:samples:loops/* is not granted")
    message = await fs.error('fs.exists("samples:loops/a.mid")', ns)
    assert message.startswith("fs.exists: permission_denied: fs.read:samples:loops/a.mid is not granted")
    # the normalised form is what is matched and named
    message = await fs.error('fs.read("samples:./drums//deep/tom.wav")', ns)
    assert "fs.read:samples:drums/deep/tom.wav is not granted" in message
    # reading is not writing and writing is not reading
    assert await fs.run('fs.write("samples:renders/x.wav", "x") return fs.exists("samples:renders/x.wav")', ns)
    message = await fs.error('fs.read("samples:renders/x.wav")', ns)
    assert message.startswith("fs.read: permission_denied: fs.read:samples:renders/x.wav is not granted")
    assert (fs.root / "drums" / "kick.wav").read_bytes() == b"RIFF\x00\xffkick"
    assert not (fs.root / "renders" / "sub").exists()


async def test_without_a_grant_of_a_kind_the_message_says_so(fs: Fs) -> None:
    ns = fs.namespace(read=["samples:**"])
    message = await fs.error('fs.write("samples:x.wav", "x")', ns)
    assert message.startswith(
        "fs.write: permission_denied: fs.write:samples:x.wav is not granted (this script has no fs.write capability)"
    )
    assert not (fs.root / "x.wav").exists()


async def test_permission_is_checked_before_anything_on_disk(fs: Fs) -> None:
    """A denied call says the same whether the file exists or not (no probing)."""
    ns = fs.namespace(read=["samples:drums/*"])
    there = await fs.error('fs.read("samples:secret.wav")', ns)
    missing = await fs.error('fs.read("samples:nothing.wav")', ns)
    assert there.replace("secret", "nothing") == missing


async def test_list_shows_only_what_the_script_may_read(fs: Fs) -> None:
    ns = fs.namespace(read=["samples:drums/*.wav", "samples:loops/**"])
    result = await fs.run(
        """
        local names = function(t) local n = {} for _, e in ipairs(t) do n[#n + 1] = e.name end return n end
        return {root = names(fs.list("samples:")), drums = names(fs.list("samples:drums")),
                loops = names(fs.list("samples:loops"))}
        """,
        ns,
    )
    # secret.wav is not granted; drums and loops lead to granted files; deep/ does not
    assert result == {"root": ["drums", "loops"], "drums": ["kick.wav", "snare.wav"], "loops": ["a.mid"]}
    message = await fs.error('fs.list("samples:drums/deep")', ns)
    assert "permission_denied: fs.read:samples:drums/deep/* is not granted" in message


async def test_exists_needs_a_read_or_write_grant_on_or_below_the_path(fs: Fs) -> None:
    ns = fs.namespace(read=["samples:drums/*"], write=["samples:renders/*"])
    result = await fs.run(
        'return {fs.exists("samples:"), fs.exists("samples:drums"), fs.exists("samples:renders/x"),'
        ' fs.exists("samples:renders")}',
        ns,
    )
    assert result == [True, True, False, False]
    assert "permission_denied" in await fs.error('fs.exists("samples:loops")', ns)


# ------------------------------------------------------------------------ walls


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("samples:../outside/secret.txt", "must not contain '..'"),
        ("samples:drums/../../outside/secret.txt", "must not contain '..'"),
        ("samples:drums/..", "must not contain '..'"),
        ("samples:/etc/passwd", "must be relative to its root, not absolute"),
        ("/etc/passwd", "must be ROOT:relative/path"),
        ("drums/kick.wav", "must be ROOT:relative/path"),
        ("outside:secret.txt", "unknown root 'outside' (roots: samples)"),
        ("a/b:c", "must be ROOT:relative/path"),
        ("samples:a\x00b", "contains a NUL byte"),
        ("samples:" + "a/" * (MAX_PATH_BYTES // 2), "is too long"),
        ("samples:" + "n" * (MAX_NAME_BYTES + 1), f"has a name over {MAX_NAME_BYTES} bytes"),
    ],
)
@pytest.mark.parametrize("call", ["read", "write", "list", "exists"])
async def test_paths_outside_any_root_are_refused(fs: Fs, path: str, problem: str, call: str) -> None:
    before = snapshot(fs.tmp_path)
    ns = fs.namespace(read=EVERYTHING, write=EVERYTHING)
    args = "p, 'overwritten'" if call == "write" else "p"
    with pytest.raises(ScriptError) as info:
        await run_script(f"local p = params; return fs.{call}({args})", path, namespaces=[ns])
    message = str(info.value)
    fs.messages.append(message)
    assert message.startswith(f"fs.{call}: ") and problem in message, message
    assert snapshot(fs.tmp_path) == before


async def test_no_roots_configured(tmp_path: Path) -> None:
    ns = FsNamespace({}, ["*"], ["*"])
    with pytest.raises(ScriptError) as info:
        await run_script('return fs.read("samples:x")', namespaces=[ns])
    assert "unknown root 'samples' (no roots are configured: [fs.roots] in the config file)" in str(info.value)


async def test_a_missing_root_directory_is_not_available_without_its_path(fs: Fs, tmp_path: Path) -> None:
    fs.roots["gone"] = tmp_path / "not-there"
    ns = fs.namespace(read=EVERYTHING, write=EVERYTHING)
    message = await fs.error('fs.write("gone:x", "x")', ns)
    assert message == "fs.write: root 'gone' is not available (its directory is missing)"
    assert not (tmp_path / "not-there").exists()


async def test_a_symlink_to_a_file_outside_is_refused(fs: Fs) -> None:
    (fs.root / "drums" / "escape.wav").symlink_to(fs.outside / "secret.txt")
    before = snapshot(fs.tmp_path)
    ns = fs.namespace(read=EVERYTHING, write=EVERYTHING)
    for code in (
        'fs.read("samples:drums/escape.wav")',
        'fs.write("samples:drums/escape.wav", "overwritten")',
        'fs.exists("samples:drums/escape.wav")',
    ):
        assert "samples:drums/escape.wav leads outside its root (through a symlink)" in await fs.error(code, ns)
    names = await fs.names("samples:drums", ns)
    assert "escape.wav" not in names
    assert snapshot(fs.tmp_path) == before


async def test_a_symlinked_directory_outside_is_refused(fs: Fs) -> None:
    (fs.root / "linked").symlink_to(fs.outside, target_is_directory=True)
    before = snapshot(fs.tmp_path)
    ns = fs.namespace(read=EVERYTHING, write=EVERYTHING)
    for code in (
        'fs.read("samples:linked/secret.txt")',
        'fs.write("samples:linked/secret.txt", "overwritten")',
        'fs.write("samples:linked/new.txt", "created")',  # a new file through the link
        'fs.write("samples:linked/sub/new.txt", "created")',  # a new directory through it
        'fs.list("samples:linked")',
        'fs.exists("samples:linked/secret.txt")',
    ):
        message = await fs.error(code, ns)
        assert "leads outside its root (through a symlink)" in message, (code, message)
    assert snapshot(fs.tmp_path) == before
    assert sorted(p.name for p in fs.outside.iterdir()) == ["secret.txt"]


async def test_a_dangling_symlink_pointing_outside_is_not_written_through(fs: Fs) -> None:
    (fs.root / "trap.wav").symlink_to(fs.outside / "created-by-script")
    ns = fs.namespace(read=EVERYTHING, write=EVERYTHING)
    assert "leads outside its root" in await fs.error('fs.write("samples:trap.wav", "x")', ns)
    assert not (fs.outside / "created-by-script").exists()


async def test_a_symlink_inside_the_root_needs_its_target_granted_too(fs: Fs) -> None:
    (fs.root / "drums" / "alias.wav").symlink_to(fs.root / "secret.wav")
    (fs.root / "drums" / "fine.wav").symlink_to("snare.wav")
    ns = fs.namespace(read=["samples:drums/*"], write=["samples:drums/*"])
    message = await fs.error('fs.read("samples:drums/alias.wav")', ns)
    assert message.startswith(
        "fs.read: permission_denied: fs.read:samples:secret.wav is not granted "
        "(samples:drums/alias.wav leads there through a symlink; this script may read samples:drums/*)"
    )
    message = await fs.error('fs.write("samples:drums/alias.wav", "x")', ns)
    assert "permission_denied: fs.write:samples:secret.wav is not granted" in message
    assert (fs.root / "secret.wav").read_bytes() == b"root secret"
    # a link between granted places is followed
    assert await fs.run('return fs.read("samples:drums/fine.wav")', ns) == "snare"
    names = await fs.names("samples:drums", ns)
    assert "alias.wav" not in names and "fine.wav" in names


async def test_a_symlink_loop_is_refused(fs: Fs) -> None:
    (fs.root / "loop").symlink_to("loop")
    ns = fs.namespace(read=EVERYTHING, write=EVERYTHING)
    message = await fs.error('fs.read("samples:loop")', ns)
    assert "samples:loop" in message and "symlink" in message


async def test_a_root_that_is_itself_a_symlink_works(fs: Fs, tmp_path: Path) -> None:
    link = tmp_path / "samples-link"
    link.symlink_to(fs.root, target_is_directory=True)
    fs.roots = {"samples": link}
    ns = fs.namespace(read=EVERYTHING, write=EVERYTHING)
    assert await fs.run('fs.write("samples:new.txt", "n") return fs.read("samples:drums/snare.wav")', ns) == "snare"
    assert (fs.root / "new.txt").read_bytes() == b"n"


# ------------------------------------------------------------------------ limits


async def test_read_limit(fs: Fs) -> None:
    ns = fs.namespace(read=EVERYTHING, max_read_bytes=10)
    assert await fs.run('return #fs.read("samples:drums/kick.wav")', ns) == 10  # exactly the limit
    message = await fs.error('fs.read("samples:secret.wav")', ns)
    assert message == "fs.read: samples:secret.wav is 11 bytes, over the read limit of 10 bytes"


async def test_write_limit(fs: Fs) -> None:
    ns = fs.namespace(write=EVERYTHING, max_write_bytes=4)
    await fs.run('fs.write("samples:ok", "four")', ns)
    message = await fs.error('fs.write("samples:big", "fives")', ns)
    assert message == "fs.write: data is 5 bytes, over the write limit of 4 bytes (nothing was written)"
    assert not (fs.root / "big").exists()


async def test_list_limit(fs: Fs) -> None:
    for i in range(5):
        (fs.root / "loops" / f"{i}.mid").write_bytes(b"")
    ns = fs.namespace(read=EVERYTHING, max_list_entries=6)
    assert len(await fs.run('return fs.list("samples:loops")', ns)) == 6
    (fs.root / "loops" / "one-more.mid").write_bytes(b"")
    message = await fs.error('fs.list("samples:loops")', ns)
    assert message == "fs.list: samples:loops has over 6 entries, the most fs.list reads; list a directory below it"


def test_default_limits() -> None:
    ns = FsNamespace({}, [], [])
    assert (ns.max_read_bytes, ns.max_write_bytes, ns.max_list_entries) == (64 * 2**20, 64 * 2**20, 10_000)


# ------------------------------------------------------------------------ storage faults


async def test_a_file_size_limit_is_storage_full_and_keeps_the_old_file(fs: Fs) -> None:
    """EFBIG under RLIMIT_FSIZE (Python ignores SIGXFSZ), as a full disk's ENOSPC."""
    ns = fs.namespace(write=EVERYTHING)
    target = fs.root / "drums" / "kick.wav"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        message = await fs.error('fs.write("samples:drums/kick.wav", string.rep("x", 200000))', ns)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert message == (
        "fs.write: storage_full: the disk holding samples:drums/kick.wav is full "
        "(a file reached the size limit of the daemon's process); nothing was written"
    )
    assert target.read_bytes() == b"RIFF\x00\xffkick"
    assert not [p for p in (fs.root / "drums").iterdir() if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (errno.EROFS, "fs.write: read_only: samples:out.wav cannot be written (its filesystem is mounted read-only); "
                      "nothing was written"),
        (errno.EACCES, "fs.write: read_only: samples:out.wav cannot be written (the daemon has no permission to "
                       "write there); nothing was written"),
        (errno.ENOSPC, "fs.write: storage_full: the disk holding samples:out.wav is full (no space left on its "
                       "disk); nothing was written"),
        (errno.EIO, "fs.write: cannot write samples:out.wav: Input/output error"),
    ],
)  # fmt: skip
async def test_write_errors_are_named(fs: Fs, monkeypatch: pytest.MonkeyPatch, number: int, expected: str) -> None:
    """Simulated (the tests run as root, whom permissions do not stop): the rename that
    publishes a written file fails."""

    def failing(*args: Any, **kwargs: Any) -> None:
        raise OSError(number, os.strerror(number), str(fs.root / "out.wav"))

    monkeypatch.setattr(os, "rename", failing)
    ns = fs.namespace(write=EVERYTHING)
    assert await fs.error('fs.write("samples:out.wav", "x")', ns) == expected
    assert sorted(p.name for p in fs.root.iterdir()) == ["drums", "loops", "secret.wav"]


async def test_a_symlink_swapped_in_after_the_check_is_not_followed(fs: Fs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files are opened one component at a time with O_NOFOLLOW: simulate a symlink
    that appeared between the resolving check and the open by making the check blind."""
    (fs.root / "linked").symlink_to(fs.outside, target_is_directory=True)
    (fs.root / "drums" / "swapped.wav").symlink_to(fs.outside / "secret.txt")
    before = snapshot(fs.tmp_path)
    monkeypatch.setattr(os.path, "realpath", os.path.abspath)
    ns = fs.namespace(read=EVERYTHING, write=EVERYTHING)
    for code in (
        'fs.read("samples:linked/secret.txt")',
        'fs.read("samples:drums/swapped.wav")',
        'fs.write("samples:linked/secret.txt", "overwritten")',
        'fs.write("samples:linked/sub/new.txt", "created")',
        'fs.list("samples:linked")',
        'fs.exists("samples:linked/secret.txt")',
    ):
        message = await fs.error(code, ns)
        assert "symlink" in message, (code, message)
    monkeypatch.undo()
    assert snapshot(fs.tmp_path) == before


async def test_listing_through_a_symlinked_directory_inside_needs_both_places(fs: Fs) -> None:
    (fs.root / "alias").symlink_to("drums", target_is_directory=True)
    only_alias = fs.namespace(read=["samples:alias/*"])
    message = await fs.error('fs.list("samples:alias")', only_alias)
    assert message.startswith(
        "fs.list: permission_denied: fs.read:samples:drums/* is not granted "
        "(samples:alias leads there through a symlink; this script may read samples:alias/*)"
    )
    both = fs.namespace(read=["samples:alias/*", "samples:drums/*.wav"])
    assert await fs.names("samples:alias", both) == ["kick.wav", "snare.wav"]  # not deep/
    assert await fs.run('return fs.read("samples:alias/snare.wav")', both) == "snare"
