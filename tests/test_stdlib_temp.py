"""luanette.stdlib.temp (and the shared path check): the per-job directory and its walls.

Every test runs real scripts through the real runtime with the namespaces wired the way
the job runner wires them, closing the TempNamespace in a ``finally``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import mido
import pytest

from luanette.cas import Cas
from luanette.runtime import CancelToken, Limits, LuaCallError, ScriptError, run_script
from luanette.stdlib.cas import CasNamespace
from luanette.stdlib.midi import MidiNamespace
from luanette.stdlib.paths import MAX_NAME_BYTES, MAX_PATH_BYTES
from luanette.stdlib.temp import TempNamespace
from tests.waiting import until


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under ``root`` except inside ``skip``: kind/size and content or target."""
    found: dict[str, tuple[int, bytes | str]] = {}
    for parent, dirs, files in os.walk(root):
        if Path(parent) == skip or skip in Path(parent).parents:
            continue
        for name in dirs + files:
            path = Path(parent) / name
            if path.is_symlink():
                found[str(path)] = (0, os.readlink(path))
            elif path.is_file():
                found[str(path)] = (path.stat().st_size, path.read_bytes())
            else:
                found[str(path)] = (-1, "dir")
    return found


class Job:
    """What the job runner builds per job: a temp dir, a CAS, the three namespaces."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.cas = Cas(tmp_path / "cas")
        self.root = tmp_path / "temp"
        self.temp = TempNamespace(self.root)
        self.namespaces = [
            self.temp,
            CasNamespace(self.cas, temp=self.temp),
            MidiNamespace(self.cas, self.temp),
        ]

    async def run(self, code: str, params: Any = None, **kwargs: Any) -> Any:
        return (await run_script(code, params, namespaces=self.namespaces, **kwargs)).result

    async def error(self, code: str, params: Any = None, **kwargs: Any) -> ScriptError:
        with pytest.raises(ScriptError) as info:
            await run_script(code, params, namespaces=self.namespaces, **kwargs)
        return info.value


@pytest.fixture
def job(tmp_path: Path):
    job = Job(tmp_path)
    try:
        yield job
    finally:
        job.temp.close()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the temp root holding a file no script may touch."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret.txt").write_bytes(b"do not touch")
    return directory


EMPTY_MIDI = (
    "{ticks_per_beat = 480, tracks = {{events = "
    "{{type = 'note_on', note = 60}, {type = 'note_off', note = 60, delta = 480}}}}}"
)


# ------------------------------------------------------------------------ basics


async def test_dir_path_list_exists_remove(job: Job) -> None:
    result = await job.run(
        f"""
        local d = temp.dir()
        local p = temp.path("song.mid")
        local before = temp.exists(p)
        midi.write({EMPTY_MIDI}, p)
        local nested = temp.path("stems/drums.mid")
        midi.write({EMPTY_MIDI}, nested)
        local listed = temp.list()
        local after = temp.exists("song.mid")
        local removed = temp.remove(p)
        local again = temp.remove(p)
        return {{d = d, p = p, nested = nested, before = before, after = after, listed = listed,
                 removed = removed, again = again, gone = temp.exists(p), left = temp.list()}}
        """
    )
    # paths as a script sees them: relative to the job's directory, never a host path
    directory = job.temp.directory
    assert Path(directory).parent == Path(os.path.realpath(job.root))
    assert result["d"] == "."
    assert result["p"] == "song.mid"
    assert result["nested"] == "stems/drums.mid"
    assert (directory / "stems" / "drums.mid").is_file()
    assert result["listed"] == sorted([result["p"], result["nested"]])
    assert (result["before"], result["after"]) == (False, True)
    assert (result["removed"], result["again"], result["gone"]) == (True, False, False)
    assert result["left"] == [result["nested"]]


async def test_directory_is_private_and_per_job(tmp_path: Path) -> None:
    a, b = TempNamespace(tmp_path / "t"), TempNamespace(tmp_path / "t")
    try:
        assert a.directory != b.directory
        assert a.directory.name.startswith("job-")
        assert a.directory.stat().st_mode & 0o777 == 0o700
    finally:
        a.close()
        b.close()
    assert list((tmp_path / "t").iterdir()) == []


async def test_path_without_a_name_is_unique_and_a_name_is_stable(job: Job) -> None:
    result = await job.run("return {temp.path(), temp.path(), temp.path('x'), temp.path('./x'), temp.path('a//b')}")
    first, second, x1, x2, ab = result
    assert first != second and "/" not in first and first.startswith("tmp-")
    assert x1 == x2 == "x"
    assert ab == "a/b"
    assert (job.temp.directory / "a").is_dir()


async def test_absolute_paths_inside_are_accepted(job: Job) -> None:
    result = await job.run(
        f"""
        local p = temp.path('x.mid')
        midi.write({EMPTY_MIDI}, p)
        return {{temp.exists(p), temp.exists(temp.dir() .. '/x.mid'), temp.exists('x.mid')}}
        """
    )
    assert result == [True, True, True]


async def test_remove_a_directory_inside(job: Job) -> None:
    result = await job.run(
        f"""
        midi.write({EMPTY_MIDI}, temp.path('d/e/f.mid'))
        return {{temp.exists('d'), temp.remove('d'), temp.exists('d'), temp.list()}}
        """
    )
    assert result == [True, True, False, []]


async def test_no_directory_until_first_use(job: Job) -> None:
    assert await job.run("return 1") == 1
    assert not job.root.exists() or list(job.root.iterdir()) == []


# ------------------------------------------------------------------ the lifecycle


@pytest.mark.parametrize(
    ("tail", "kind", "kwargs"),
    [
        ("return 1", None, {}),
        ("error('boom')", "lua_runtime", {}),
        ("while true do end", "timeout", {"limits": Limits(timeout_s=0.3)}),
        ("local t = {} while true do t[#t + 1] = string.rep('x', 1000) end", "memory_limit",
         {"limits": Limits(memory_bytes=32 * 2**20)}),
    ],
)
async def test_directory_removed_whatever_the_end(tmp_path: Path, tail: str, kind: str | None, kwargs: dict) -> None:
    job = Job(tmp_path)
    code = f"midi.write({EMPTY_MIDI}, temp.path('a/b.mid')) {tail}"
    directory = None
    try:
        if kind is None:
            await job.run(code, **kwargs)
        else:
            assert (await job.error(code, **kwargs)).detail.kind == kind
        directory = job.temp.directory
        assert (directory / "a" / "b.mid").is_file()
    finally:
        job.temp.close()
    assert directory is not None and not directory.exists()
    assert list(job.root.iterdir()) == []


async def test_directory_removed_after_cancel(tmp_path: Path) -> None:
    job = Job(tmp_path)
    token = CancelToken()
    code = f"midi.write({EMPTY_MIDI}, temp.path('x.mid')) while true do end"
    try:
        async def cancel_soon() -> None:  # once the file is written and the loop spins
            await until(lambda: job.root.exists() and any(job.root.rglob("x.mid")), "the file written")
            token.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_soon)
            assert (await job.error(code, cancel=token)).detail.kind == "cancelled"
    finally:
        job.temp.close()
    assert list(job.root.iterdir()) == []


async def test_context_manager_removes_even_on_python_errors(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), TempNamespace(tmp_path / "t") as temp:
        (temp.directory / "f").write_bytes(b"x")
        raise RuntimeError("job runner failed")
    assert list((tmp_path / "t").iterdir()) == []


async def test_after_close_nothing_is_created_again(tmp_path: Path) -> None:
    temp = TempNamespace(tmp_path / "t")
    directory = temp.directory
    temp.close()
    temp.close()  # idempotent
    for call in (temp.dir, lambda: temp.path("x"), temp.list, lambda: temp.write_bytes("x", b"1")):
        with pytest.raises(LuaCallError, match="job has ended"):
            call()
    assert not directory.exists() and list((tmp_path / "t").iterdir()) == []


async def test_close_does_not_follow_symlinks_out(tmp_path: Path, outside: Path) -> None:
    temp = TempNamespace(tmp_path / "t")
    (temp.directory / "link").symlink_to(outside, target_is_directory=True)
    (temp.directory / "file-link").symlink_to(outside / "secret.txt")
    temp.close()
    assert (outside / "secret.txt").read_bytes() == b"do not touch"


async def test_clean_root_removes_only_stale_job_directories(tmp_path: Path) -> None:
    root = tmp_path / "t"
    stale, fresh = TempNamespace(root), TempNamespace(root)
    old = time.time() - 7200
    os.utime(stale.directory, (old, old))
    fresh.directory  # noqa: B018 - creates it
    (root / "not-ours").mkdir()
    os.utime(root / "not-ours", (old, old))
    assert TempNamespace.clean_root(root, older_than_s=3600) == 1
    assert sorted(p.name for p in root.iterdir()) == sorted([fresh.directory.name, "not-ours"])
    fresh.close()


# ------------------------------------------------------------ escapes, all refused


def escape_values(job: Job, outside: Path) -> list[tuple[str, str]]:
    """(path value, expected message fragment): each must be refused."""
    directory = job.temp.directory
    (directory / "out-file").symlink_to(outside / "secret.txt")
    (directory / "out-dir").symlink_to(outside, target_is_directory=True)
    (directory / "dangling").symlink_to(outside / "new-file.mid")
    (directory / "up").symlink_to("..", target_is_directory=True)
    (directory / "self").symlink_to(".", target_is_directory=True)
    (directory / "sub").mkdir()
    (directory / "sub" / "deep-out").symlink_to("../../../outside/secret.txt")
    return [
        ("../x", "'..'"),
        ("a/../../x", "'..'"),
        ("..", "'..'"),
        ("./../outside/secret.txt", "'..'"),
        (f"{directory}/../outside/secret.txt", "'..'"),
        ("/etc/passwd", "outside the job's temp directory"),
        (str(outside / "secret.txt"), "outside the job's temp directory"),
        (str(directory) + "-evil/x", "outside the job's temp directory"),
        (str(job.cas.root / "objects" / "ab" / ("c" * 30)), "addressed by its hash"),
        ("out-file", "through a symlink"),
        ("out-dir/secret.txt", "through a symlink"),
        ("dangling", "through a symlink"),
        ("up/outside/secret.txt", "through a symlink"),
        ("self", "through a symlink"),
        ("sub/deep-out", "through a symlink"),
        ("a\x00b", "NUL"),
        ("x\x00/../../etc/passwd", "NUL"),
        ("n" * (MAX_NAME_BYTES + 1), f"over {MAX_NAME_BYTES} bytes"),
        ("d/" * (MAX_PATH_BYTES // 2 + 1), "too long"),
        ("", "must not be empty"),
        (".", "temp directory itself"),
        ("./", "temp directory itself"),
        (str(directory), "outside the job's temp directory"),
        (str(directory) + "/", "temp directory itself"),
    ]


CALLS = {
    "temp.path": "temp.path(p)",
    "temp.exists": "temp.exists(p)",
    "temp.remove": "temp.remove(p)",
    "midi.read": "midi.read(p)",
    "midi.write": f"midi.write({EMPTY_MIDI}, p)",
    "midi.info": "midi.info(p)",
    "midi.notes": "midi.notes(p)",
    "cas.store_file": "cas.store_file(p)",
}


@pytest.mark.parametrize("function", sorted(CALLS))
async def test_every_path_escape_is_a_lua_error_and_touches_nothing(job: Job, outside: Path, function: str) -> None:
    cases = escape_values(job, outside)
    before = snapshot(job.tmp_path, skip=job.root)
    code = f"""
    local out = {{}}
    for i, p in ipairs(params) do
      local ok, err = pcall(function() return {CALLS[function]} end)
      out[i] = {{ok, tostring(err)}}
    end
    return out
    """
    result = await job.run(code, [value for value, _ in cases])
    for (value, fragment), (ok, message) in zip(cases, result, strict=True):
        assert ok is False, f"{function}({value!r}) was accepted"
        assert message.startswith(function + ": "), message
        assert fragment in message, (value, message)
        assert "internal error" not in message
    assert snapshot(job.tmp_path, skip=job.root) == before
    assert (outside / "secret.txt").read_bytes() == b"do not touch"
    assert not (outside / "new-file.mid").exists()


@pytest.mark.parametrize(
    ("literal", "message"),
    [
        ("42", "must be a string, got number"),
        ("{}", "must be a string, got table"),
        ("true", "must be a string, got boolean"),
        ("'\\xff\\xfe'", "must be UTF-8 text"),
    ],
)
async def test_non_string_paths_are_lua_errors(job: Job, literal: str, message: str) -> None:
    result = await job.run(
        f"""
        local out = {{}}
        for _, f in ipairs({{temp.exists, temp.remove, temp.path}}) do
          local ok, err = pcall(f, {literal})
          out[#out + 1] = {{ok, err}}
        end
        return out
        """
    )
    for ok, err in result:
        assert ok is False and message in err and "internal error" not in err


async def test_symlink_pointing_inside_is_followed(job: Job) -> None:
    directory = job.temp.directory
    (directory / "real.mid").write_bytes(b"x")
    (directory / "alias").symlink_to("real.mid")
    assert await job.run("return {temp.exists('alias'), temp.path('alias')}") == [True, "real.mid"]


async def test_remove_refuses_the_directory_itself(job: Job) -> None:
    message = (await job.error("temp.remove(temp.dir() .. '/.')")).detail.message
    assert "temp directory itself" in message
    assert job.temp.directory.is_dir()


async def test_a_fifo_inside_does_not_hang_a_read(job: Job) -> None:
    os.mkfifo(job.temp.directory / "fifo")
    message = (await job.error("midi.read('fifo')", limits=Limits(timeout_s=5))).detail.message
    assert "not a regular file" in message


async def test_written_file_is_a_real_midi_file(job: Job) -> None:
    path = await job.run(f"return midi.write({EMPTY_MIDI}, 'out.mid').path")
    assert path == "out.mid"
    midi = mido.MidiFile(job.temp.directory / path)
    assert [m.type for m in midi.tracks[0]] == ["note_on", "note_off", "end_of_track"]


async def test_one_job_cannot_reach_another_jobs_files(tmp_path: Path) -> None:
    first, second = Job(tmp_path), Job(tmp_path)
    try:
        name = await first.run(f"return midi.write({EMPTY_MIDI}, 'mine.mid').path")
        path = first.temp.directory / name  # the host path, which no script is shown
        code = (
            "local out = {} for i, f in ipairs({temp.exists, temp.remove, midi.read}) do "
            "out[i] = select(2, pcall(f, params.p)) end return out"
        )
        for message in await second.run(code, {"p": str(path)}):
            assert "outside the job's temp directory" in message
        # the same name is the second job's own (absent) file
        missing = "midi.read: src: no file 'mine.mid' in the temp directory"
        assert await second.run(code, {"p": name}) == [False, False, missing]
        assert path.is_file()
    finally:
        first.temp.close()
        second.temp.close()
    assert list(first.root.iterdir()) == []
