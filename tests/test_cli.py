"""The ``balloonlab`` command as a user runs it: every error is one line, never a traceback.

Each case runs the installed ``.venv/bin/balloonlab`` in a subprocess, in a folder of its own,
and checks the whole of stderr: exactly one line, ``balloonlab: error: <what was wrong and
what to do>``, with exit status 2 for a wrong command line (argparse's convention) and 1 when
what it names does not work. The cases without QEMU run a few at a time (each process spends
about 2 s importing pandas and matplotlib); the last tests start QEMU: a bare one to record
from, and the built-in guest for ``stop``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .qemu_helpers import foreign_qemu

BALLOONLAB = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "balloonlab"
UNITS = "b, bytes, KB, k, KiB, MB, M, MiB, GB, G, GiB, TB, T, TiB (any case; P and E too)"
NAME_RULE = "must be 1-48 characters of A-Z a-z 0-9 _ . - and start with a letter or digit"
RUN_HINT = "pass a folder made by 'balloonlab demo' or 'balloonlab record'"
BUILTIN_POLICIES = ("the built-in policies are mom, pi, psi, qmemman; a policy of your own is given as "
                    "'module:callable'")
SOCKET_HINT = "start QEMU with -qmp unix:{0},server=on,wait=off or pass the socket it listens on"


def run(*args: str, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the balloonlab command with ``args`` in ``cwd``; ``env`` entries override ours."""
    return subprocess.run([str(BALLOONLAB), *args], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, check=False)


def assert_one_error(result: subprocess.CompletedProcess[str], status: int, message: str, *,
                     regex: bool = False) -> None:
    """stderr is exactly ``balloonlab: error: <message>`` (a regex if ``regex``), exit ``status``."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    expected = "balloonlab: error: " + (message if regex else re.escape(message))
    assert re.fullmatch(expected, lines[0]), f"\n{lines[0]}\n!=\n{expected}"
    assert result.returncode == status, (result.returncode, result.stderr)


# ---------------------------------------------------------------------------- the cases

Setup = Callable[[Path], None]


def files(contents: dict[str, str]) -> Setup:
    """Make files in the case's folder: ``{path: text}``; a text of "/" makes a folder."""
    def make(folder: Path) -> None:
        for name, text in contents.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if text == "/":
                path.mkdir()
            else:
                path.write_text(text)
    return make


def stale_socket(name: str, also: Setup | None = None) -> Setup:
    """A unix socket file nothing listens on (what a QEMU that exited leaves behind)."""
    def make(folder: Path) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(folder / name))
        if also is not None:
            also(folder)
    return make


@dataclass(frozen=True)
class Case:
    """A command line, what is in its folder first, and the one error line it must give."""

    args: tuple[str, ...]
    status: int
    message: str
    regex: bool = False
    setup: Setup | None = None
    env: dict[str, str] = field(default_factory=dict)


def usage(*args: str, message: str) -> Case:
    return Case(args, 2, message)


def failure(*args: str, message: str, **kwargs: object) -> Case:
    return Case(args, 1, message, **kwargs)  # type: ignore[arg-type]


XML = {
    "malformed": "<domain type='qemu'>\n  <name>g</nam>\n</domain>\n",
    "unit": "<domain type='qemu'>\n  <name>g</name>\n  <memory unit='Mbit'>64</memory>\n</domain>\n",
    "huge": "<domain type='qemu'>\n  <name>g</name>\n  <memory unit='TiB'>99999999999999999999</memory>\n</domain>\n",
    "negative": ("<domain type='qemu'>\n  <name>g</name>\n  <memory>65536</memory>\n"
                 "  <currentMemory>-5</currentMemory>\n</domain>\n"),
    "network": "<network><name>n</name></network>\n",
}
RECORD = ("record", "--qmp", "missing.sock", "--domain-xml", "d.xml")  # the XML is read before the socket

CASES: dict[str, Case] = {
    # -- exit 2: the command line is wrong, nothing is done
    "no command": usage(message="the following arguments are required: command; see 'balloonlab --help'"),
    "unknown command": usage("bogus", message="argument command: invalid choice: 'bogus' (choose from 'guest', "
                                              "'list', 'stop', 'stacks', 'demo', 'record', 'plot', 'period-study', "
                                              "'compare', 'policy', 'replay'); "
                                              "see 'balloonlab --help'"),
    "unknown option": usage("demo", "--bogus", message="unrecognized arguments: --bogus; see 'balloonlab --help'"),
    "guest without build": usage("guest", message="the following arguments are required: {build}; "
                                                  "see 'balloonlab guest --help'"),
    "modules dir without kernel": usage("guest", "build", "--modules-dir", "/lib/modules",
                                        message="--modules-dir goes with --kernel (it holds that kernel's modules); "
                                                "pass --kernel too; see 'balloonlab guest build --help'"),
    **{f"demo duration {value}": usage("demo", "--duration", value,
                                       message=f"argument --duration: expected a positive number of seconds, got "
                                               f"'{value}'; see 'balloonlab demo --help'")
       for value in ("-5", "0", "nan", "inf")},
    "demo duration not a number": usage("demo", "--duration", "ten",
                                        message="argument --duration: expected a number of seconds, got 'ten'; "
                                                "see 'balloonlab demo --help'"),
    "demo shorter than its schedules": usage("demo", "--duration", "30",
                                             message="argument --duration: the demo's schedules last 58 s; "
                                                     "expected at least that, got 30; see 'balloonlab demo --help'"),
    "record without qmp": usage("record", message="the following arguments are required: --qmp; "
                                                  "see 'balloonlab record --help'"),
    "record duration negative": usage("record", "--qmp", "missing.sock", "--duration", "-1",
                                      message="argument --duration: expected a positive number of seconds, got "
                                              "'-1'; see 'balloonlab record --help'"),
    "plot without run": usage("plot", message="the following arguments are required: run; "
                                              "see 'balloonlab plot --help'"),
    "stop without name": usage("stop", message="the following arguments are required: name; "
                                               "see 'balloonlab stop --help'"),
    "stop name with a slash": usage("stop", "a/b", message=f"argument name: guest name 'a/b' {NAME_RULE}; "
                                                           "see 'balloonlab stop --help'"),
    "stop empty name": usage("stop", "", message=f"argument name: guest name '' {NAME_RULE}; "
                                                 "see 'balloonlab stop --help'"),
    "list with an argument": usage("list", "extra", message="unrecognized arguments: extra; "
                                                            "see 'balloonlab --help'"),
    "policy run unknown policy": usage("policy", "run", "--policy", "nosuch",
                                       message=f"argument --policy: unknown policy 'nosuch': {BUILTIN_POLICIES}; "
                                               "see 'balloonlab policy run --help'"),
    "policy run no such callable": usage("policy", "run", "--policy", "os:nosuch",
                                         message="argument --policy: policy 'os:nosuch': 'os' has no attribute "
                                                 "'nosuch' (built-in policies: mom, pi, psi, qmemman); "
                                                 "see 'balloonlab policy run --help'"),
    "policy run no such module": usage("policy", "run", "--policy", "nosuchmodule:f",
                                       message="argument --policy: policy 'nosuchmodule:f': cannot import module "
                                               "'nosuchmodule': No module named 'nosuchmodule'; "
                                               "see 'balloonlab policy run --help'"),
    "policy run negative budget": usage("policy", "run", "--budget", "-5",
                                        message="argument --budget: size must not be negative, got '-5'; "
                                                "see 'balloonlab policy run --help'"),
    "policy run no guests": usage("policy", "run", "--guests", "0",
                                  message="guests must be an int from 1 to 16, got 0; "
                                          "see 'balloonlab policy run --help'"),
    "policy run workload above memory": usage("policy", "run", "--high", "600M",
                                              message="need 0 <= low <= high < memory, got low=32 MiB, high=600 MiB, "
                                                      "memory=512 MiB; see 'balloonlab policy run --help'"),
    "replay unknown policy": usage("replay", "run", "--policy", "mom,nosuch",
                                   message=f"argument --policy: unknown policy 'nosuch': {BUILTIN_POLICIES}; "
                                           "see 'balloonlab replay --help'"),
    # -- exit 1: what the command line names does not work
    "guest build missing kernel": failure("guest", "build", "--kernel", "vmlinuz",
                                          message="kernel vmlinuz does not exist or is not a readable file"),
    "demo runs is a file": failure("demo", "--runs", "runs", setup=files({"runs": ""}),
                                   message="--runs runs is not a folder; pass the folder run folders should go into"),
    "demo without the guest image": failure("demo", env={"BALLOONLAB_CACHE_DIR": "empty-cache"}, regex=True,
                                            message=r"the built-in guest image is not built yet: run `balloonlab "
                                                    r"guest build`.*"),
    "demo without qemu": failure("demo", env={"PATH": "no-bin"},
                                 message="QEMU binary 'qemu-system-x86_64' not found: install it (Debian/Ubuntu: "
                                         "apt-get install qemu-system-x86) or set <emulator> in the domain XML"),
    "record missing socket": failure("record", "--qmp", "qmp.sock",
                                     message="no QMP socket at qmp.sock (No such file or directory); "
                                             + SOCKET_HINT.format("qmp.sock")),
    "record socket is a file": failure("record", "--qmp", "qmp.sock", setup=files({"qmp.sock": ""}),
                                       message="qmp.sock is not a unix socket; " + SOCKET_HINT.format("qmp.sock")),
    "record socket nothing listens on": failure(
        "record", "--qmp", "stale.sock", setup=stale_socket("stale.sock"), regex=True,
        message=r"cannot connect to QMP socket stale\.sock of stale: .*Connection refused; the socket is there but "
                r"nothing listens: is its QEMU still running\?"),
    "record domain xml missing": failure(*RECORD, message="cannot read domain XML d.xml: No such file or directory"),
    "record domain xml is a folder": failure(*RECORD, setup=files({"d.xml": "/"}),
                                             message="cannot read domain XML d.xml: Is a directory"),
    "record domain xml malformed": failure(*RECORD, setup=files({"d.xml": XML["malformed"]}), regex=True,
                                           message=r"domain XML d\.xml: line 2: not well-formed XML \(Opening and "
                                                   r"ending tag mismatch: name line 2 and nam.*\); expected a "
                                                   r"libvirt <domain> document"),
    "record domain xml unknown unit": failure(*RECORD, setup=files({"d.xml": XML["unit"]}),
                                              message="domain XML d.xml: line 3, <memory>: unknown memory unit "
                                                      f"'Mbit'; expected one of: {UNITS}"),
    "record domain xml size too large": failure(*RECORD, setup=files({"d.xml": XML["huge"]}),
                                                message="domain XML d.xml: line 3, <memory>: <memory> of "
                                                        "99999999999999999999 TiB is too large; libvirt accepts at "
                                                        "most 9007199254740991 KiB (8 EiB less 1 KiB)"),
    "record domain xml negative size": failure(*RECORD, setup=files({"d.xml": XML["negative"]}),
                                               message="domain XML d.xml: line 4, <currentMemory>: <currentMemory> "
                                                       "must be a positive integer number of KiB, got '-5'"),
    "record domain xml not a domain": failure(*RECORD, setup=files({"d.xml": XML["network"]}),
                                              message="domain XML d.xml: line 1, <network>: the root element is "
                                                      "<network>; expected <domain>"),
    "record out holds a run": failure("record", "--qmp", "stale.sock", "--out", "old",
                                      setup=stale_socket("stale.sock", files({"old/run.json": "{}"})),
                                      message="--out old already holds a run (run.json); pass a new folder"),
    "record runs is a file": failure("record", "--qmp", "stale.sock",
                                     setup=stale_socket("stale.sock", files({"runs": ""})),
                                     message="--runs runs is not a folder; pass the folder run folders should go into"),
    "plot missing folder": failure("plot", "run", message=f"run folder run does not exist; {RUN_HINT}"),
    "plot not a run folder": failure("plot", "run", setup=files({"run": "/"}),
                                     message=f"run is not a balloonlab run folder (no run.json); {RUN_HINT}"),
    "plot a file": failure("plot", "run", setup=files({"run": ""}),
                           message="run is not a folder; pass a run folder (the one holding run.json)"),
    "plot a run without samples": failure("plot", "run", setup=files({"run/run.json": "{}"}),
                                          message="run run has no samples to plot"),
    "plot a damaged run": failure("plot", "run", setup=files({"run/run.json": "{"}),
                                  message="run/run.json is not valid JSON (Expecting property name enclosed in double "
                                          "quotes at line 1); the run folder is damaged"),
    "plot out is a folder": failure("plot", "run", "--out", ".", setup=files({"run/run.json": "{}"}),
                                    message="--out . is a folder; pass the path of the PNG to write"),
    "replay not a run folder": failure("replay", "run", setup=files({"run": "/"}),
                                       message="run is not a balloonlab run folder (no run.json); pass a folder made "
                                               "by 'balloonlab policy run' or 'balloonlab record'"),
    "replay missing folder": failure("replay", "nope", message="run folder nope does not exist; pass a folder made by "
                                                               "'balloonlab policy run' or 'balloonlab record'"),
    "replay a damaged run": failure("replay", "run", setup=files({"run/run.json": "{"}),
                                    message="run/run.json is not valid JSON (Expecting property name enclosed in "
                                            "double quotes at line 1); the run folder is damaged"),
    "replay a run without samples": failure("replay", "run", setup=files({"run/run.json": "{}"}),
                                            message="the run has no samples: there is nothing to replay a policy on"),
    "replay no policy": usage("replay", "run", "--policy", ",",
                              message="argument --policy: no policy given: name at least one, e.g. --policy mom; "
                                      "see 'balloonlab replay --help'"),
    "stop unknown guest": failure("stop", "nosuch", env={"BALLOONLAB_RUNTIME_DIR": "rt"},
                                  message="no running guest named 'nosuch' (running: none); 'balloonlab list' shows "
                                          "the guests balloonlab launched"),
    "list runtime dir is a file": failure("list", env={"BALLOONLAB_RUNTIME_DIR": "rt"}, setup=files({"rt": ""}),
                                          regex=True, message=r".*runtime dir rt\b.*BALLOONLAB_RUNTIME_DIR.*"),
    "stop runtime dir is a file": failure("stop", "g1", env={"BALLOONLAB_RUNTIME_DIR": "rt"}, setup=files({"rt": ""}),
                                          regex=True, message=r".*runtime dir rt\b.*BALLOONLAB_RUNTIME_DIR.*"),
}


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run every selected case, three processes at a time, each in a fresh folder."""
    wanted = [item.callspec.params["case"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params]

    # The folders are made here, not in the threads: tmp_path_factory makes the worker's base
    # folder on first use, and two threads doing that at once collide (FileExistsError, seen when
    # these cases were the first on a worker to use tmp_path with --basetemp).
    folders = {name: tmp_path_factory.mktemp("cli") for name in wanted}

    def one(name: str) -> subprocess.CompletedProcess[str]:
        case = CASES[name]
        if case.setup is not None:
            case.setup(folders[name])
        return run(*case.args, cwd=folders[name], env=case.env)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(wanted, pool.map(one, wanted), strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_input_gives_one_error_line_and_its_exit_status(
        case: str, outcomes: dict[str, subprocess.CompletedProcess[str]]) -> None:
    expected = CASES[case]
    assert_one_error(outcomes[case], expected.status, expected.message, regex=expected.regex)


def test_record_with_a_socket_that_never_greets(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as server:  # connections queue in the backlog; nothing speaks QMP
        server.bind(str(path))
        server.listen(4)
        result = run("record", "--qmp", "silent.sock", cwd=tmp_path)
    assert_one_error(result, 1, r"QEMU did not greet on silent\.sock within 10(\.0)? s: is another client "
                                r"\(another balloonlab process, libvirt\) connected to it\?", regex=True)


@pytest.mark.parametrize("how", ["--debug", "BALLOONLAB_DEBUG=1"])
def test_debug_shows_the_traceback(how: str, tmp_path: Path) -> None:
    args = ["plot", "nope", "--debug"] if how == "--debug" else ["plot", "nope"]
    result = run(*args, cwd=tmp_path, env={"BALLOONLAB_DEBUG": "1"} if how != "--debug" else None)
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert result.stderr.rstrip().endswith(f"BalloonLabError: run folder nope does not exist; {RUN_HINT}")


# ---------------------------------------------------------------------------- with QEMU


@pytest.fixture
def running_qemu() -> Iterator[Path]:
    """A bare, running QEMU with a virtio balloon (no guest OS: it never reports stats)."""
    with foreign_qemu("virtio-balloon-pci,id=balloon0", paused=False) as sock:
        yield sock


def test_record_for_a_duration_saves_a_run(tmp_path: Path, running_qemu: Path) -> None:
    result = run("record", "--qmp", str(running_qemu), "--duration", "2", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    folder = re.search(r"^run folder: (runs/\S+-qmp) \(0 samples\)$", result.stdout, re.M)
    assert folder, result.stdout
    assert (tmp_path / folder.group(1) / "run.json").is_file()


def test_record_stops_on_ctrl_c_and_saves_the_run(tmp_path: Path, running_qemu: Path) -> None:
    proc = subprocess.Popen([str(BALLOONLAB), "record", "--qmp", str(running_qemu), "--out", "r"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # printed once the recording runs (and Ctrl-C is ours)
        assert first.startswith("recording qmp into r "), first
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, err) == (0, "")
    assert out.splitlines()[-1] == "run folder: r (0 samples)"
    assert (tmp_path / "r" / "run.json").is_file()


def test_stop_of_a_detached_builtin_guest(spec, guest_name: str, tmp_path: Path) -> None:
    from balloonlab import Guest
    from balloonlab.model.errors import BalloonLabError

    async def launch_and_let_go() -> None:
        guest = await Guest.launch(spec(), detached=True)
        await guest.close()  # QEMU serves one QMP client: the command must get the socket

    async def shutdown_if_left() -> None:
        try:
            leftover = await Guest.reconnect(guest_name)
        except BalloonLabError:
            return
        await leftover.shutdown()

    asyncio.run(launch_and_let_go())
    try:
        listed = run("list", cwd=tmp_path)
        assert listed.returncode == 0 and re.search(rf"^{guest_name} +pid \d+ .* detached ", listed.stdout, re.M)
        result = run("stop", guest_name, cwd=tmp_path)
        assert (result.returncode, result.stdout, result.stderr) == (0, f"{guest_name}: quit\n", "")
        again = run("stop", guest_name, cwd=tmp_path)
        assert_one_error(again, 1, f"no running guest named {guest_name!r} (running: none); 'balloonlab list' "
                                   "shows the guests balloonlab launched")
    finally:
        asyncio.run(shutdown_if_left())


def test_policy_run_then_replay_of_that_run(builtin_ready: Path, tmp_path: Path) -> None:
    """Two built-in guests under a 600 MiB budget with MOM for 25 s (about 40 s with the launches),
    then MOM and qmemman replayed on the recording."""
    result = run("policy", "run", "--guests", "2", "--memory", "512M", "--budget", "600M", "--duration", "25",
                 "--cycle", "20", "--runs", "runs", cwd=tmp_path, timeout=120)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout
    assert result.stdout.startswith("2 guests of 512 MiB, budget 600 MiB, policy mom, 25 s\n"), result.stdout
    table = re.search(r"^ +footprint_gib_s +footprint_mean_bytes .* budget_violation_s .*\nrun *\nmom +\d+\.\d +",
                      result.stdout, re.M)
    assert table, result.stdout  # the score table: one row, the policy's
    folder = re.search(r"^run folder: (runs/\S+-overcommit)$", result.stdout, re.M)
    assert folder, result.stdout
    path = tmp_path / folder.group(1)
    meta = json.loads((path / "run.json").read_text())
    assert meta["policy"]["name"] == "mom" and meta["policy"]["budget"] == 600 << 20
    assert sorted(meta["policy"]["limits"]) == ["oc0", "oc1"]
    assert (path / "host").is_dir() and (path / "plot-policy.png").stat().st_size > 10_000

    # a built-in name and a module:callable (the same qmemman, named by its class)
    replayed = run("replay", folder.group(1), "--policy", "mom,balloonlab.policies.qmemman:QmemmanPolicy",
                   "--out", "r", cwd=tmp_path)
    assert (replayed.returncode, replayed.stderr) == (0, ""), replayed.stdout
    rows = re.findall(r"^(\S+) +\d+\.\d +", replayed.stdout, re.M)
    assert rows == ["live", "mom", "qmemman"], replayed.stdout
    assert "mom's replayed decisions against its live ones:" in replayed.stdout
    agreement = re.search(r"^open_loop +(\d+) +([\d.]+) ", replayed.stdout, re.M)
    assert agreement and int(agreement.group(1)) >= 2 * 8, replayed.stdout  # a decision every 2 s per guest
    assert float(agreement.group(2)) >= 0.95, replayed.stdout
    assert re.search(r"^closed_loop +\d+ +[\d.]+ ", replayed.stdout, re.M), replayed.stdout
    out = tmp_path / "r"
    assert (out / "scores.csv").read_text().splitlines()[0].startswith("run,footprint_gib_s,")
    assert [line.split(",")[0] for line in (out / "scores.csv").read_text().splitlines()[1:]] == \
        ["live", "mom", "qmemman"]
    scores = json.loads((out / "scores.json").read_text())
    assert list(scores) == ["live", "mom", "qmemman"] and "budget_violation_s" in scores["mom"]
    assert (out / "replay.png").stat().st_size > 10_000
    assert "scores: r/scores.csv\nplot:   r/replay.png" in replayed.stdout
