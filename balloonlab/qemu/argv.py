"""From a :class:`~balloonlab.domain.DomainSpec` to a ``qemu-system`` command line.

:func:`balloon_device` gives the balloon's ``-device`` properties exactly as libvirt writes them
(same driver, names and order, checked against libvirt's own test ``.args`` files), and
:func:`build_argv` a whole argv that QEMU 7.2 boots: paused (``-S``) with a QMP socket, so the
monitor layer can set the stats period before the vCPUs run, as libvirt does. Both are pure
functions; only :func:`kvm_usable` / :func:`resolve_accel` and :func:`check_launch_inputs`
look at the host. Starting the
process is the launcher's job.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from balloonlab.domain import AGENT_CHANNEL, AddressSpec, ChannelSpec, DiskSpec, DomainSpec
from balloonlab.model.errors import LaunchError
from balloonlab.qemu.devices import balloon_device_type
from balloonlab.qemu.memory_argv import (LAUNCHED_MODELS, VIRTIO_OPTION_PROPERTIES, _json, memory_backend,
                                         memory_device, memory_option, numa_args, pci_placement)

__all__ = ["VIRTIO_OPTION_PROPERTIES", "balloon_device", "build_argv", "channel_sockets", "check_launch_inputs",
           "guest_agent_socket", "kvm_usable", "memory_option", "qemu_binary_for", "resolve_accel",
           "unsupported_channel"]
# QEMU binary per guest arch where the names differ; i686 guests run on qemu-system-x86_64
# in libvirt's tests (hostdev-pci-address: arch i686, emulator qemu-system-x86_64).
_ARCH_BINARY = {"i686": "x86_64", "armv7l": "arm", "ppc64le": "ppc64", "s390": "s390x"}
_ACCELS = ("kvm", "tcg")


def balloon_device(spec: DomainSpec) -> dict[str, object] | None:
    """The balloon's ``-device`` properties, in libvirt's order and naming; None without a balloon.

    The stats period is never among them: libvirt (and balloonlab) set it over QMP.

    :raises ValueError: for the 'xen' model, which QEMU has no device for.
    """
    balloon = spec.memballoon
    if balloon is None:
        return None
    if balloon.model == "xen":
        raise ValueError("memballoon model 'xen' has no QEMU device; expected a virtio model")
    address = balloon.address
    kind = address.type if address is not None else ("ccw" if spec.arch in ("s390x", "s390") else "pci")
    props: dict[str, object] = {"driver": balloon_device_type(balloon.model, kind)}
    props.update((VIRTIO_OPTION_PROPERTIES[name], on) for name, on in balloon.driver_options)
    props["id"] = balloon.alias or "balloon0"
    if balloon.autodeflate is not None:  # libvirt writes an explicit off as false
        props["deflate-on-oom"] = balloon.autodeflate
    if balloon.free_page_reporting is not None:
        props["free-page-reporting"] = balloon.free_page_reporting
    props.update(pci_placement(address))
    if address is not None and address.type == "ccw":
        props["devno"] = f"{address.cssid or 0:x}.{address.ssid or 0:x}.{address.devno or 0:04x}"
    return props


def qemu_binary_for(spec: DomainSpec) -> str:
    """``spec.emulator`` if set, else ``qemu-system-<arch>`` (x86_64 when no arch is given)."""
    if spec.emulator:
        return spec.emulator
    arch = spec.arch or "x86_64"
    return f"qemu-system-{_ARCH_BINARY.get(arch, arch)}"


def kvm_usable(dev: str = "/dev/kvm", cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True only when ``dev`` opens read-write and the CPU flags show vmx or svm.

    A /dev/kvm node alone proves nothing: containers and sandboxes ship stand-ins.

    :param dev: the KVM device node (a parameter for tests).
    :param cpuinfo: the cpuinfo file to read flags from (a parameter for tests).
    """
    try:
        os.close(os.open(dev, os.O_RDWR | os.O_CLOEXEC))
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            flags = {word for line in handle if line.startswith("flags")
                     for word in line.partition(":")[2].split()}
    except OSError:
        return False
    return bool(flags & {"vmx", "svm"})


def resolve_accel(requested: str) -> str:
    """'auto' -> 'kvm' when :func:`kvm_usable`, else 'tcg'; 'kvm' and 'tcg' are kept as asked.

    :raises ValueError: for any other value.
    """
    if requested == "auto":
        return "kvm" if kvm_usable() else "tcg"
    if requested in _ACCELS:
        return requested
    raise ValueError(f"accel {requested!r} is not supported; expected 'auto', 'kvm' or 'tcg'")


def _esc(value: str) -> str:
    return value.replace(",", ",,")  # QEMU's option syntax: a literal comma is doubled


def _root_pci_bus(machine: str) -> str | None:
    if machine == "q35" or machine.startswith("pc-q35") or machine.startswith("virt"):
        return "pcie.0"
    if machine == "pc" or machine.startswith("pc-") or machine.startswith("pseries"):
        return "pci.0"
    return None


def _on_root_bus(props: dict[str, object], address: AddressSpec | None, machine: str) -> dict[str, object]:
    """``props`` with its PCI ``bus``/``addr`` kept only on the machine's root bus.

    libvirt creates bridges and root ports for other buses; we create none, so only a slot on
    the root bus can be honoured (QEMU picks a free slot otherwise).
    """
    if "bus" not in props or address is None or address.type != "pci":
        return props
    root = _root_pci_bus(machine)
    if address.bus == 0 and address.domain == 0 and root is not None:
        props["bus"] = root
    else:
        del props["bus"], props["addr"]
    return props


def _launch_balloon(spec: DomainSpec, machine: str) -> dict[str, object] | None:
    props = balloon_device(spec)
    if props is None:
        return None
    return _on_root_bus(props, spec.memballoon.address if spec.memballoon is not None else None, machine)


def _memory_device_args(spec: DomainSpec, machine: str) -> list[str]:
    argv: list[str] = []
    for index, device in enumerate(spec.memory_devices):
        if device.model not in LAUNCHED_MODELS:
            raise ValueError(f"memory device model {device.model!r} is not launched by balloonlab (it needs "
                             f"files or host support it does not set up); expected {' or '.join(LAUNCHED_MODELS)}")
        props = _on_root_bus(memory_device(spec, index), device.address, machine)
        argv += ["-object", _json(memory_backend(spec, index)), "-device", _json(props)]
    return argv


def _disk_driver(disk: DiskSpec, readonly: bool) -> str:
    cdrom = disk.device == "cdrom"
    bus = disk.bus or {"hd": "ide", "sd": "scsi"}.get((disk.target or "")[:2], "virtio")
    if bus == "virtio" and not cdrom:
        return "virtio-blk-pci"
    if bus in ("ide", "sata"):
        if readonly and not cdrom:
            raise ValueError(f"disk {disk.source!r}: QEMU cannot attach a read-only IDE/SATA hard disk")
        return "ide-cd" if cdrom else "ide-hd"
    if bus == "scsi":
        return "scsi-cd" if cdrom else "scsi-hd"
    raise ValueError(f"disk {disk.source!r}: bus {bus!r} with device {disk.device!r} is not supported")


def _ide_place(ide_index: int, machine: str) -> dict[str, object]:
    # QEMU does not spread IDE devices over buses by itself: pc's PIIX has ide.0/ide.1 with two
    # units each, q35's built-in AHCI has ide.0..ide.5 with one unit each.
    if _root_pci_bus(machine) == "pcie.0":
        return {"bus": f"ide.{ide_index}", "unit": 0}
    return {"bus": f"ide.{ide_index // 2}", "unit": ide_index % 2}


def _disk_args(spec: DomainSpec, machine: str) -> list[str]:
    argv: list[str] = []
    ide_count = 0
    for index, disk in enumerate(spec.disks):
        node, readonly = f"disk{index}", disk.readonly or disk.device == "cdrom"
        device: dict[str, object] = {"driver": _disk_driver(disk, readonly), "drive": f"{node}-format",
                                     "id": node}
        if str(device["driver"]).startswith("ide-"):
            device.update(_ide_place(ide_count, machine))
            ide_count += 1
        elif str(device["driver"]).startswith("scsi-"):
            if "virtio-scsi-pci,id=scsi0" not in argv:
                argv += ["-device", "virtio-scsi-pci,id=scsi0"]
            device["bus"] = "scsi0.0"
        if index == 0:
            device["bootindex"] = 1
        # host_device for block devices: QEMU's file driver refuses anything but regular files
        storage = {"driver": "host_device" if disk.source.startswith("/dev/") else "file",
                   "filename": disk.source, "node-name": f"{node}-storage", "read-only": readonly}
        fmt = {"node-name": f"{node}-format", "read-only": readonly, "driver": disk.format,
               "file": f"{node}-storage"}
        argv += ["-blockdev", _json(storage), "-blockdev", _json(fmt), "-device", _json(device)]
    return argv


def _serial_args(console_log: str, agent_socket: str | None) -> list[str]:
    # The launcher owns the serial ports: paths in the XML are ignored. -serial fills the
    # ports in order, so the console is always port 0 and the agent port 1.
    argv = ["-chardev", f"file,id=console,path={_esc(console_log)}", "-serial", "chardev:console"]
    if agent_socket is not None:
        argv += ["-chardev", f"socket,id=agent,path={_esc(agent_socket)},server=on,wait=off",
                 "-serial", "chardev:agent"]
    return argv


def unsupported_channel(channel: ChannelSpec, index: int) -> str | None:
    """Why balloonlab's launcher cannot build ``channel`` (the ``index``-th), and what to do; None if it can.

    It builds unix-socket channels on a virtio-serial port, as libvirt does (the guest agent's
    port is one); pty, spicevmc, guestfwd and the other kinds need host set-up it does not do.
    """
    if channel.type == "unix" and channel.target_type == "virtio":
        return None
    name = f" name={channel.target_name!r}" if channel.target_name is not None else ""
    return (f"<channel type={channel.type!r}> with <target type={channel.target_type!r}{name}> (channel {index}) "
            "is not launched by balloonlab's QEMU launcher: it builds only <channel type='unix'> with "
            "<target type='virtio'>; change the channel to that, take it out, or start the domain with the "
            "libvirt backend (LibvirtGuest)")


def channel_sockets(spec: DomainSpec, channel_dir: str | os.PathLike[str] | None) -> tuple[str | None, ...]:
    """The host unix socket of each of ``spec.channels``, in order.

    A channel's own ``<source path>``; for a unix channel without one, ``ch<N>.sock`` in
    ``channel_dir`` (N: its index among the channels, below 31, a virtio-serial controller's
    ports: short, so the path fits in a socket address wherever the runtime dir's ``agent.sock``
    does); None for a channel that is not a unix socket, and for a path-less one when
    ``channel_dir`` is None (someone else's QEMU: its path is unknown).

    :param channel_dir: the guest's runtime directory, or None.
    """
    def host_socket(index: int, channel: ChannelSpec) -> str | None:
        if channel.type != "unix":
            return None
        if channel.path is not None or channel_dir is None:
            return channel.path
        return os.path.join(os.fspath(channel_dir), f"ch{index}.sock")
    return tuple(host_socket(index, channel) for index, channel in enumerate(spec.channels))


def guest_agent_socket(spec: DomainSpec, channel_dir: str | os.PathLike[str] | None) -> str | None:
    """The host socket of the guest agent's channel (target name :data:`~balloonlab.domain.AGENT_CHANNEL`),
    as :func:`channel_sockets` places it; None when there is no such channel or its path is unknown."""
    for channel, path in zip(spec.channels, channel_sockets(spec, channel_dir), strict=True):
        if channel.target_name == AGENT_CHANNEL:
            return path
    return None


def _channel_args(spec: DomainSpec, channel_dir: str) -> list[str]:
    """libvirt's lines for virtio-serial channels: one controller, then a chardev and a port per channel."""
    if not spec.channels:
        return []
    for index, channel in enumerate(spec.channels):
        if (why := unsupported_channel(channel, index)) is not None:
            raise ValueError(why)
    # No <controller type='virtio-serial'> is read: one controller holds every port, numbered
    # from 1 in document order as libvirt numbers ports without an address; QEMU places it.
    controller = "virtio-serial-ccw" if spec.arch in ("s390x", "s390") else "virtio-serial-pci"
    argv = ["-device", _json({"driver": controller, "id": "virtio-serial0"})]
    for index, (channel, path) in enumerate(zip(spec.channels, channel_sockets(spec, channel_dir), strict=True)):
        assert path is not None  # a unix channel (checked above) in a known dir
        chardev = f"socket,id=charchannel{index},path={_esc(path)}"
        # QEMU listens (wait=off: it starts without waiting for a client) unless told to connect
        # to a given path; a socket of our own making is always listened on, as libvirt does.
        if channel.mode == "bind" or channel.path is None:
            chardev += ",server=on,wait=off"
        port: dict[str, object] = {"driver": "virtserialport", "bus": "virtio-serial0.0", "nr": index + 1,
                                   "chardev": f"charchannel{index}", "id": f"channel{index}"}
        if channel.target_name is not None:
            port["name"] = channel.target_name
        argv += ["-chardev", chardev, "-device", _json(port)]
    return argv


def _kernel_args(spec: DomainSpec) -> list[str]:
    argv: list[str] = []
    for option, value in (("-kernel", spec.kernel), ("-initrd", spec.initrd), ("-append", spec.cmdline)):
        if value is not None:
            argv += [option, value]
    return argv


def build_argv(spec: DomainSpec, *, qmp_socket: str, console_log: str, agent_socket: str | None,
               accel: str, qemu_binary: str | None = None, channel_dir: str | None = None) -> list[str]:
    """The qemu-system argv that starts ``spec`` paused, with QMP on ``qmp_socket``.

    Serial port 0 goes to ``console_log`` (always), port 1 to the ``agent_socket`` unix socket
    (when given). A balloon's or memory device's PCI address is kept only on the machine's root
    bus. Memory, NUMA cells and memory devices follow :mod:`.memory_argv` (libvirt's ``-m``,
    ``-numa`` and ``-object``/``-device`` lines). Channels get libvirt's lines: a
    ``virtio-serial0`` controller, and per channel N a ``charchannelN`` socket chardev (QEMU
    listens for mode 'bind', connects for 'connect') and a ``channelN`` virtserialport ``nr``
    N+1 with the target's name; sockets as :func:`channel_sockets` places them.

    :param accel: 'kvm' or 'tcg', already resolved (see :func:`resolve_accel`).
    :param qemu_binary: overrides :func:`qemu_binary_for`.
    :param channel_dir: where unix channels without a ``<source path>`` get their socket;
        None: the directory of ``qmp_socket`` (the launcher's runtime dir for the guest).
    :raises ValueError: for another accel, a disk QEMU cannot attach as described, a memory
        device balloonlab does not launch (nvdimm, virtio-pmem, sgx-epc), or a channel it does
        not build (:func:`unsupported_channel`).
    """
    if accel not in _ACCELS:
        raise ValueError(f"accel {accel!r} is not resolved; expected 'kvm' or 'tcg'")
    machine = spec.machine or "pc"
    argv = [qemu_binary or qemu_binary_for(spec), "-name", f"guest={_esc(spec.name)},debug-threads=on",
            "-S", "-machine", machine, "-accel", accel]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    argv += ["-m", memory_option(spec), "-smp", str(spec.vcpus), *numa_args(spec)]
    if spec.uuid:
        argv += ["-uuid", spec.uuid]
    argv += ["-nodefaults", "-no-user-config", "-display", "none",
             "-chardev", f"socket,id=qmp,path={_esc(qmp_socket)},server=on,wait=off",
             "-mon", "chardev=qmp,mode=control"]
    argv += _serial_args(console_log, agent_socket) + _kernel_args(spec) + _disk_args(spec, machine)
    argv += _channel_args(spec, channel_dir or os.path.dirname(qmp_socket)) + _memory_device_args(spec, machine)
    balloon = _launch_balloon(spec, machine)
    if balloon is not None:
        argv += ["-device", _json(balloon)]
    return argv


def check_launch_inputs(spec: DomainSpec, binary: str) -> None:
    """Refuse a launch whose inputs are missing, before any process exists.

    :raises LaunchError: the QEMU binary, kernel, initrd or a disk image is not there, or a
        memory device or channel balloonlab does not launch (checked here: :func:`build_argv`
        runs after the runtime dir is claimed).
    """
    for index, channel in enumerate(spec.channels):
        if (why := unsupported_channel(channel, index)) is not None:
            raise LaunchError(f"guest {spec.name}: {why}")
    for device in spec.memory_devices:
        if device.model not in LAUNCHED_MODELS:
            raise LaunchError(f"memory device model {device.model!r} of guest {spec.name} is not launched by "
                              "balloonlab (it needs files or host support it does not set up); use "
                              f"{' or '.join(LAUNCHED_MODELS)}")
    if shutil.which(binary) is None:
        raise LaunchError(f"QEMU binary {binary!r} not found: install it (Debian/Ubuntu: "
                          "apt-get install qemu-system-x86) or set <emulator> in the domain XML")
    for what, path in (("kernel", spec.kernel), ("initrd", spec.initrd),
                       *(("disk", d.source) for d in spec.disks)):
        if path and not Path(path).is_file() and not Path(path).is_block_device():
            raise LaunchError(f"{what} {path} of guest {spec.name} does not exist"
                              + (": run `balloonlab guest build`" if what in ("kernel", "initrd") else ""))
