"""``<channel>`` from domain XML to a running QEMU: the guest agent's virtio-serial port.

The domain layer keeps every ``<channel>`` libvirt accepts (the libvirt backend passes the XML
on) and renders it back unchanged; balloonlab's QEMU launcher builds what libvirt builds for a
unix channel on a virtio target (one ``virtio-serial0`` controller, a ``charchannelN`` socket
chardev and a ``channelN`` virtserialport per channel), refuses the other kinds with a message
that says what to do, and puts a path-less channel's socket in the guest's runtime dir. The last
test boots the built-in guest with two channels and checks them over QMP.
"""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest

from balloonlab import DomainXMLError, Guest, LaunchError
from balloonlab.domain import (AGENT_CHANNEL, ChannelSpec, builtin_domain, parse_domain_xml, render_domain_xml,
                               with_changes, with_serial_socket_paths)
from balloonlab.qemu import registry as runtime
from balloonlab.qemu.argv import build_argv, channel_sockets, check_launch_inputs, guest_agent_socket

from .conftest import RUNTIME_ROOT, qemu_pids_under

DOMAIN = """<domain type='qemu'>
  <name>chan</name>
  <memory unit='MiB'>256</memory>
  <devices>
    {channels}
  </devices>
</domain>"""
WITH_PATH = """<channel type='unix'>
      <source mode='bind' path='/some/path.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>"""
WITHOUT_PATH = """<channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>"""
AGENT = ChannelSpec("unix", None, "virtio", AGENT_CHANNEL)


def _domain(*channels: str) -> str:
    return DOMAIN.format(channels="\n    ".join(channels))


def _argv(spec, channel_dir: str | None = "/run/g") -> list[str]:
    return build_argv(spec, qmp_socket="/run/g/qmp.sock", console_log="/run/g/console.log", agent_socket=None,
                      accel="tcg", channel_dir=channel_dir)


def _values(argv: list[str], flag: str) -> list[str]:
    return [value for option, value in zip(argv, argv[1:], strict=False) if option == flag]


def _devices(argv: list[str]) -> list[dict[str, object]]:
    return [json.loads(value) for value in _values(argv, "-device") if value.startswith("{")]


# ---------------------------------------------------------------------------- parse and render

@pytest.mark.parametrize("xml, path", [(WITH_PATH, "/some/path.sock"), (WITHOUT_PATH, None)])
def test_unix_agent_channel_parses_and_round_trips(xml, path):
    spec = parse_domain_xml(_domain(xml))
    assert spec.channels == (ChannelSpec("unix", path, "virtio", AGENT_CHANNEL, mode="bind"),)
    assert spec.agent_channel == spec.channels[0]
    again = parse_domain_xml(render_domain_xml(spec))
    assert again == dataclasses.replace(spec, xml=again.xml)


def test_channels_of_every_kind_are_kept_in_document_order():
    spec = parse_domain_xml(_domain(
        "<channel type='pty'><target type='virtio' name='org.linux-kvm.port.0'/></channel>",
        "<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>",
        "<channel type='pipe'><source path='/tmp/fwd'/><target type='guestfwd' address='10.0.2.1' port='4600'/>"
        "</channel>",
        "<channel type='unix'><target type='virtio'/></channel>"))
    assert spec.channels == (ChannelSpec("pty", None, "virtio", "org.linux-kvm.port.0"),
                             ChannelSpec("spicevmc", None, "virtio", "com.redhat.spice.0"),
                             ChannelSpec("pipe", "/tmp/fwd", "guestfwd", None),
                             ChannelSpec("unix", None, "virtio", None, mode="bind"))
    assert spec.agent_channel is None
    again = parse_domain_xml(render_domain_xml(spec))
    assert again.channels == spec.channels


@pytest.mark.parametrize("source, mode", [
    ("", "bind"),  # no <source>: libvirt makes a path and listens on it
    ("<source mode='connect'/>", "bind"),  # no path: libvirt listens whatever the mode says
    ("<source path='/run/qga.sock'/>", "connect"),  # a path without mode: libvirt's default is connect
    ("<source mode='connect' path='/run/qga.sock'/>", "connect"),
    ("<source mode='bind' path='/run/qga.sock'/>", "bind"),
])
def test_unix_channel_mode_follows_libvirts_defaults(source, mode):
    spec = parse_domain_xml(_domain(f"<channel type='unix'>{source}<target type='virtio' name='x'/></channel>"))
    assert spec.channels[0].mode == mode
    assert parse_domain_xml(render_domain_xml(spec)).channels == spec.channels


def test_bad_unix_source_mode_is_refused_with_its_line():
    with pytest.raises(DomainXMLError, match="mode='listen' is not valid; expected 'bind' or 'connect'") as err:
        parse_domain_xml(_domain("<channel type='unix'>\n<source mode='listen' path='/x'/><target type='virtio'/>"
                                 "</channel>"))
    assert err.value.line == 6 and err.value.element == "source"


def test_builtin_guest_with_a_channel_renders_it_and_serial_paths_leave_it_alone():
    spec = with_changes(builtin_domain(name="g", kernel="/k", initrd="/i", cmdline=""), channels=(AGENT,))
    assert parse_domain_xml(spec.xml).channels == (AGENT,)
    # The libvirt backend fills in serial socket paths (local) or nulls those ports (remote);
    # a path-less channel stays path-less either way: libvirt picks its path itself.
    for path_for_port in (lambda port: f"/run/s{port}.sock", lambda port: None):
        edited = parse_domain_xml(with_serial_socket_paths(spec.xml, path_for_port))
        assert edited.channels == (AGENT,)
        assert edited.serials[1] != spec.serials[1]


# ---------------------------------------------------------------------------- argv

def test_argv_for_a_channel_without_path_puts_its_socket_in_the_channel_dir():
    argv = _argv(parse_domain_xml(_domain(WITHOUT_PATH)))
    assert _values(argv, "-chardev")[-1] == "socket,id=charchannel0,path=/run/g/ch0.sock,server=on,wait=off"
    assert [d for d in _devices(argv) if "serial" in str(d["driver"])] == [
        {"driver": "virtio-serial-pci", "id": "virtio-serial0"},
        {"driver": "virtserialport", "bus": "virtio-serial0.0", "nr": 1, "chardev": "charchannel0", "id": "channel0",
         "name": AGENT_CHANNEL}]


def test_argv_for_a_channel_with_path_uses_it_and_numbers_ports_from_one():
    named = "<channel type='unix'><source mode='bind' path='/tmp/a,b.sock'/><target type='virtio' name='x.1'/></channel>"
    connect = "<channel type='unix'><source mode='connect' path='/tmp/c.sock'/><target type='virtio'/></channel>"
    spec = parse_domain_xml(_domain(WITH_PATH, named, connect))
    argv = _argv(spec, channel_dir="/unused")  # every channel has a path of its own
    assert _values(argv, "-chardev")[-3:] == [
        "socket,id=charchannel0,path=/some/path.sock,server=on,wait=off",
        "socket,id=charchannel1,path=/tmp/a,,b.sock,server=on,wait=off",  # QEMU's escape for a comma
        "socket,id=charchannel2,path=/tmp/c.sock"]  # connect: QEMU is the client
    ports = [d for d in _devices(argv) if d["driver"] == "virtserialport"]
    assert [(p["nr"], p["chardev"], p["id"], p.get("name")) for p in ports] == [
        (1, "charchannel0", "channel0", AGENT_CHANNEL), (2, "charchannel1", "channel1", "x.1"),
        (3, "charchannel2", "channel2", None)]
    assert [d["driver"] for d in _devices(argv)].count("virtio-serial-pci") == 1
    assert channel_sockets(spec, "/run/g") == ("/some/path.sock", "/tmp/a,b.sock", "/tmp/c.sock")
    assert guest_agent_socket(spec, None) == "/some/path.sock"


def test_no_channel_no_virtio_serial_controller():
    argv = _argv(parse_domain_xml(_domain()))
    assert not [d for d in _devices(argv) if "serial" in str(d["driver"])]
    assert guest_agent_socket(parse_domain_xml(_domain()), "/run/g") is None


def test_socket_paths_of_channels_without_path():
    spec = parse_domain_xml(_domain(
        "<channel type='pty'><target type='virtio' name='p'/></channel>", WITHOUT_PATH, WITH_PATH))
    assert channel_sockets(spec, Path("/run/g")) == (None, "/run/g/ch1.sock", "/some/path.sock")
    assert channel_sockets(spec, None) == (None, None, "/some/path.sock")  # someone else's QEMU chose it
    assert guest_agent_socket(spec, "/run/g") == "/run/g/ch1.sock"  # the first agent channel


def test_path_less_channel_socket_goes_beside_the_qmp_socket_by_default():
    argv = _argv(parse_domain_xml(_domain(WITHOUT_PATH)), channel_dir=None)
    assert _values(argv, "-chardev")[-1] == "socket,id=charchannel0,path=/run/g/ch0.sock,server=on,wait=off"


@pytest.mark.parametrize("channel, what", [
    ("<channel type='pty'><target type='virtio' name='org.linux-kvm.port.0'/></channel>", "type='pty'"),
    ("<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>", "type='spicevmc'"),
    ("<channel type='unix'><source mode='bind' path='/tmp/fwd'/>"
     "<target type='guestfwd' address='10.0.2.1' port='4600'/></channel>", "<target type='guestfwd'>"),
])
def test_unsupported_channel_is_refused_by_the_argv_builder_with_what_to_do(channel, what):
    spec = parse_domain_xml(_domain(WITH_PATH, channel))  # parsing keeps it: libvirt accepts it
    with pytest.raises(ValueError) as err:
        _argv(spec)
    message = str(err.value)
    assert what in message and "(channel 1)" in message
    assert "builds only <channel type='unix'> with <target type='virtio'>" in message
    assert "libvirt backend (LibvirtGuest)" in message
    with pytest.raises(LaunchError, match="guest chan: .*is not launched by balloonlab's QEMU launcher"):
        check_launch_inputs(spec, "qemu-system-x86_64")


async def test_unsupported_channel_fails_the_launch_before_anything_starts(spec):
    pty = ChannelSpec("pty", None, "virtio", "org.linux-kvm.port.0")
    bad = with_changes(spec(), channels=(AGENT, pty))
    with pytest.raises(LaunchError, match=r"<channel type='pty'> .*\(channel 1\)"):
        await Guest.launch(bad)
    assert not (RUNTIME_ROOT / bad.name).exists()
    assert qemu_pids_under(RUNTIME_ROOT) == []


def test_registry_records_of_older_versions_have_no_agent_socket(tmp_path):
    old = {"name": "g", "pid": 1, "argv": [], "domain_xml": "", "owner_pid": 1, "detached": True,
           "created": 0.0, "accel": "tcg"}
    (tmp_path / "guest.json").write_text(json.dumps(old))
    record = runtime.read_record(tmp_path)
    assert record is not None and record.guest_agent_socket is None


# ---------------------------------------------------------------------------- a real guest

@pytest.mark.qemu
async def test_builtin_guest_boots_with_the_agent_port_and_its_socket(spec, tmp_path):
    """Channel 0 has no path (its socket goes into the runtime dir), channel 1 is the agent's with
    a path of our choosing. The built-in guest runs no qemu-guest-agent: only QEMU's side is
    checked (chardevs, ports, the controller on PCI, the socket files), before and after a reconnect."""
    agent_path = tmp_path / "qga.sock"
    channels = (ChannelSpec("unix", None, "virtio", "org.balloonlab.test.0"),
                dataclasses.replace(AGENT, path=str(agent_path)))
    guest = await Guest.launch(with_changes(spec(), channels=channels))
    try:
        assert guest.paths is not None
        assert guest.guest_agent_socket == agent_path
        assert stat.S_ISSOCK(agent_path.stat().st_mode)
        assert stat.S_ISSOCK((guest.paths.dir / "ch0.sock").stat().st_mode)
        chardevs = {c["label"]: c["filename"] for c in await guest.monitor.execute("query-chardev")}
        # QEMU listens on both; no client yet (there is no agent in the guest, none on the host)
        assert chardevs["charchannel0"] == f"disconnected:unix:{guest.paths.dir / 'ch0.sock'},server=on"
        assert chardevs["charchannel1"] == f"disconnected:unix:{agent_path},server=on"
        peripherals = {p["name"]: p["type"] for p in await guest.monitor.execute(
            "qom-list", {"path": "/machine/peripheral"})}
        assert peripherals["virtio-serial0"] == "child<virtio-serial-pci>"
        assert peripherals["channel0"] == peripherals["channel1"] == "child<virtserialport>"
        names = [await guest.monitor.execute("qom-get", {"path": f"/machine/peripheral/channel{n}",
                                                         "property": "name"}) for n in (0, 1)]
        assert names == ["org.balloonlab.test.0", AGENT_CHANNEL]
        pci = [d for bus in await guest.monitor.execute("query-pci") for d in bus["devices"]]
        assert [d["qdev_id"] for d in pci if d["id"]["vendor"] == 0x1AF4].count("virtio-serial0") == 1
        await guest.detach()
        await guest.close()  # a detached guest keeps running when its handle closes
        again = await Guest.reconnect(guest.name)
        try:
            assert again.guest_agent_socket == agent_path and agent_path.exists()
        finally:
            await again.shutdown()
    finally:
        await guest.shutdown()
    assert not agent_path.exists()  # QEMU removes the socket it listened on
