"""Shared fixtures: an isolated runtime dir, the built-in guest, and leak checks.

Every test runs against real QEMU. The autouse leak check (``no_stray_qemu``) fails any test
that leaves behind, from this test session: a QEMU process or a reaper process under the
session's runtime root, an asyncio task on balloonlab's private loop
(:mod:`balloonlab.blocking.loop`; the loop thread and its idle executor workers may stay), an
asyncio task on the test's own pytest-asyncio loop, a blocking call still running in either
loop's executor, or a new non-daemon thread. The failure names what leaked; leftover
processes are killed and leftover tasks cancelled, so the next test starts clean.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from pytest_asyncio import is_async_test

# Short and private: unix socket paths must stay under 108 bytes, and tests must never see
# (or sweep) a user's real guests.
RUNTIME_ROOT = Path(tempfile.mkdtemp(prefix="blt-", dir="/tmp"))
os.environ["BALLOONLAB_RUNTIME_DIR"] = str(RUNTIME_ROOT)

_names = itertools.count(1)

#: Fixture modules shared by several test files (libvirtd, libvirt_domains).
pytest_plugins = ["tests.libvirtd_fixture", "tests.netns_hosts"]

#: How long leftovers may take to go away after a test before they count as leaked: a QEMU
#: told to quit, a released reaper, a cancelled task finishing, a worker thread returning.
PROCESS_GRACE_S = 5.0
TASK_GRACE_S = 2.0
THREAD_GRACE_S = 2.0
#: The test's own pytest-asyncio loop, for ``no_stray_qemu`` to tell its executor's threads.
_TEST_LOOP = pytest.StashKey[asyncio.AbstractEventLoop]()


def _processes() -> list[tuple[int, list[bytes], str]]:
    """(pid, argv, state) of every process, skipping those that vanish while read."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        out.append((int(proc.name), argv, state))
    return out


def qemu_pids_under(root: Path) -> list[int]:
    """Live qemu-system processes whose command line mentions ``root``."""
    needle = str(root).encode()
    return [pid for pid, argv, state in _processes()
            if b"qemu-system" in argv[0] and any(needle in arg for arg in argv) and state != "Z"]


def reaper_pids_under(root: Path) -> list[int]:
    """Live reapers (``/bin/sh -c SCRIPT balloonlab-reaper PID DIR``, balloonlab.qemu.reaper)
    watching a guest whose runtime dir is under ``root``."""
    prefix = str(root).encode() + b"/"
    return [pid for pid, argv, state in _processes()
            if len(argv) >= 6 and argv[0] == b"/bin/sh" and argv[1] == b"-c" and argv[3] == b"balloonlab-reaper"
            and argv[5].startswith(prefix) and state != "Z"]


def _describe_pids(pids: list[int]) -> str:
    """``pid (guest NAME)`` for a QEMU, ``pid (watching PID DIR)`` for a reaper."""
    argvs = {pid: argv for pid, argv, _ in _processes()}
    out = []
    for pid in pids:
        argv = [a.decode(errors="replace") for a in argvs.get(pid, [])]
        if "-name" in argv[:-1]:
            out.append(f"{pid} ({argv[argv.index('-name') + 1]})")
        elif len(argv) >= 6 and argv[3] == "balloonlab-reaper":
            out.append(f"{pid} (watching QEMU {argv[4]}, {argv[5]})")
        else:
            out.append(str(pid))
    return ", ".join(out)


def _describe_task(task: asyncio.Task) -> str:
    text = repr(task)  # name, coroutine and the line it waits at
    return text if len(text) <= 400 else text[:400] + "..."


def _describe_thread(thread: threading.Thread) -> str:
    target = getattr(thread, "_target", None)  # threading.Thread keeps its target there
    where = getattr(target, "__qualname__", None) or type(thread).__qualname__
    return f"{thread.name!r} running {where}"


def _library_loop() -> asyncio.AbstractEventLoop | None:
    """balloonlab's private loop if a test started it (never starts it)."""
    module = sys.modules.get("balloonlab.blocking.loop")
    loop = getattr(module, "_loop", None)
    return loop if loop is not None and loop.is_running() else None


def _library_loop_tasks(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task]:
    async def pending() -> list[asyncio.Task]:
        me = asyncio.current_task()
        return [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    return asyncio.run_coroutine_threadsafe(pending(), loop).result(10)


def _cancel_on(loop: asyncio.AbstractEventLoop, tasks: list[asyncio.Task]) -> None:
    async def cancel() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=5)
    asyncio.run_coroutine_threadsafe(cancel(), loop).result(10)


def _executor_threads(loop: asyncio.AbstractEventLoop | None) -> set[threading.Thread]:
    """The worker threads of ``loop``'s default executor (``asyncio.to_thread``)."""
    executor = getattr(loop, "_default_executor", None)  # asyncio keeps it there
    return set(getattr(executor, "_threads", ()))


def _blocking_calls(loop: asyncio.AbstractEventLoop | None) -> int:
    """Calls queued or running in ``loop``'s default executor (its workers idle otherwise)."""
    executor = getattr(loop, "_default_executor", None)
    if executor is None:
        return 0
    idle = getattr(getattr(executor, "_idle_semaphore", None), "_value", 0)  # released per finished call
    return max(0, len(executor._threads) - idle) + executor._work_queue.qsize()


def _new_threads(before: set[threading.Thread], test_loop: asyncio.AbstractEventLoop | None) -> list[threading.Thread]:
    """Non-daemon threads started since ``before``, except the default executors' workers of
    the library loop (idle, they live as long as it does) and of the test's own loop
    (pytest-asyncio joins them when it closes that loop, after this check)."""
    expected = _executor_threads(_library_loop()) | _executor_threads(test_loop)
    return [t for t in threading.enumerate()
            if t.is_alive() and not t.daemon and t not in before and t not in expected]


def _runs_on_a_test_loop(item: pytest.Item) -> bool:
    """An async test, or a test using an async fixture: pytest-asyncio gives it a loop."""
    if is_async_test(item):
        return True
    info = getattr(item, "_fixtureinfo", None)
    defs = getattr(info, "name2fixturedefs", {})
    return any(inspect.iscoroutinefunction(d[-1].func) or inspect.isasyncgenfunction(d[-1].func)
               for d in defs.values() if d)


@pytest.fixture
async def _no_tasks_left_on_the_test_loop(request):
    """Runs on the test's own loop: after the test and all its other fixtures, fail if tasks
    are still pending there, naming them, and cancel them; pytest-asyncio would otherwise
    cancel them silently when it closes the loop."""
    request.node.stash[_TEST_LOOP] = asyncio.get_running_loop()
    yield
    me = asyncio.current_task()
    deadline = time.monotonic() + TASK_GRACE_S
    while (left := [t for t in asyncio.all_tasks() if t is not me and not t.done()]) \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if left:
        named = [_describe_task(t) for t in left]
        for task in left:
            task.cancel()
        await asyncio.wait(left, timeout=5)
        pytest.fail("the test leaked asyncio tasks on its own event loop (now cancelled):\n    "
                    + "\n    ".join(named), pytrace=False)


@pytest.fixture(autouse=True)
def no_stray_qemu(request):
    """Fail the test if it leaves anything of this session behind, naming it (see the module
    docstring); kill leftover processes, cancel leftover tasks."""
    threads_before = set(threading.enumerate())
    calls_before = _blocking_calls(_library_loop())  # an earlier test's leak is not this one's
    if _runs_on_a_test_loop(request.node):
        # Set up before every other fixture of the test, so torn down after them all (and
        # just after this one: it checks the test's loop while that loop still exists).
        request.getfixturevalue("_no_tasks_left_on_the_test_loop")
    yield
    leaks = []
    if (loop := _library_loop()) is not None:
        deadline = time.monotonic() + TASK_GRACE_S
        while (left := _library_loop_tasks(loop)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            leaks.append("asyncio tasks left on balloonlab's private loop (balloonlab.blocking.loop; "
                         "now cancelled):\n    " + "\n    ".join(_describe_task(t) for t in left))
            _cancel_on(loop, left)

    deadline = time.monotonic() + PROCESS_GRACE_S
    while (qemu_pids_under(RUNTIME_ROOT) or reaper_pids_under(RUNTIME_ROOT)) and time.monotonic() < deadline:
        time.sleep(0.1)
    qemus, reapers = qemu_pids_under(RUNTIME_ROOT), reaper_pids_under(RUNTIME_ROOT)
    named = {"qemu": _describe_pids(qemus), "reapers": _describe_pids(reapers)}
    for pid in qemus + reapers:  # this session's own processes: under its private runtime root
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if qemus:
        leaks.append(f"QEMU processes left running under {RUNTIME_ROOT} (now killed): {named['qemu']}")
    if reapers:
        leaks.append(f"reaper processes (balloonlab-reaper) left running under {RUNTIME_ROOT} "
                     f"(now killed): {named['reapers']}")

    deadline = time.monotonic() + THREAD_GRACE_S
    test_loop = request.node.stash.get(_TEST_LOOP, None)
    loops = {"balloonlab's private loop": (_library_loop(), calls_before), "the test's own loop": (test_loop, 0)}

    def new_calls() -> dict[str, int]:
        return {where: n - before for where, (loop, before) in loops.items() if (n := _blocking_calls(loop)) > before}

    while ((threads := _new_threads(threads_before, test_loop)) or new_calls()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if threads:
        leaks.append("non-daemon threads left running: " + ", ".join(_describe_thread(t) for t in threads))
    for where, calls in new_calls().items():
        leaks.append(f"{calls} blocking call(s) still running in the executor threads of {where} "
                     "(asyncio.to_thread / run_in_executor; cancelling a task does not stop them)")
    assert not leaks, "the test leaked:\n- " + "\n- ".join(leaks)


@pytest.fixture
def guest_name() -> str:
    """A fresh guest name per test."""
    return f"t{os.getpid()}-{next(_names)}"


@pytest.fixture(scope="session")
def builtin_ready():
    """The built-in guest image must have been built by the setup step (make test does it)."""
    from balloonlab.image.build import find_guest_image
    image = find_guest_image()
    if image is None:
        pytest.fail("built-in guest image missing: run `make test` (or `balloonlab guest build`) first")
    return image


@pytest.fixture
def spec(builtin_ready, guest_name):
    """Factory of built-in guest specs with a unique name: ``spec(memory="512M", period_s=1)``."""
    from balloonlab import builtin_spec

    def make(**kwargs):
        kwargs.setdefault("period_s", 1)
        return builtin_spec(kwargs.pop("name", guest_name), **kwargs)
    return make


@pytest.fixture
async def guest(spec):
    """A running built-in guest (512 MiB, stats every 1 s), shut down after the test."""
    from balloonlab import Guest
    g = await Guest.launch(spec())
    try:
        yield g
    finally:
        await g.shutdown()


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's runtime root (empty unless a test failed to clean up)."""
    import shutil
    shutil.rmtree(RUNTIME_ROOT, ignore_errors=True)



#: Tests that share a daemon, or stop, restart or freeze one, run one after another on one
#: xdist worker (`make test` runs pytest -n 2): the system's libvirtd (one test restarts it,
#: one freezes it), a stack's libvirtd in its mount namespace, and the remote test hosts (network
#: namespaces with a libvirtd each: tests/netns_hosts.py, started once on that worker). They are told by their node
#: id, the only thing xdist's scheduler sees; pytest_itemcollected below makes sure that every
#: test using a libvirt fixture has the word in its id. (xdist's own xdist_group marks do not
#: take effect with pytest 9.2: xdist 3.8 renames items through an attribute pytest 9.2 no
#: longer reads.)
LIBVIRT_SCOPE = "libvirt"
LIBVIRT_FIXTURES = {"libvirtd", "libvirt_domains", "libvirt11", "remote_hosts"}


def pytest_itemcollected(item):
    """A test that uses a libvirt daemon must say so in its id (see :data:`LIBVIRT_SCOPE`)."""
    if LIBVIRT_FIXTURES & set(getattr(item, "fixturenames", ())) and LIBVIRT_SCOPE not in item.nodeid:
        raise pytest.UsageError(f"{item.nodeid} uses a libvirt daemon: put 'libvirt' in its name or file name, so "
                                "that it runs on the same xdist worker as the other libvirt tests")


#: Modules whose tests share one expensive module-scoped scenario (guests booted and driven once,
#: or every CLI case run at once): each module stays on one worker, or every worker that got one
#: of its tests would run the whole scenario again (a minute of TCG for the Debian guest's).
SHARED_SCENARIO_MODULES = ("test_cli.py", "test_debian_guest.py", "test_period_study.py", "test_pressure_guests.py",
                           "test_replay.py")


def pytest_xdist_make_scheduler(config, log):
    """Spread the tests one by one, but the libvirt ones as one unit on one worker, and each
    module of :data:`SHARED_SCENARIO_MODULES` as one unit."""
    from xdist.scheduler import LoadScopeScheduling

    class LibvirtTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if LIBVIRT_SCOPE in nodeid:
                return LIBVIRT_SCOPE
            module = nodeid.split("::", 1)[0]
            return module if module.rsplit("/", 1)[-1] in SHARED_SCENARIO_MODULES else nodeid

    return LibvirtTogether(config, log)
