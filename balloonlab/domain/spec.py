"""The frozen description of one guest (:class:`DomainSpec` and its parts) and the limits
libvirt puts on domain XML values. No XML here: :mod:`.parse` reads XML into these,
:mod:`.render` writes them back."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

#: Namespace of balloonlab's ``<metadata>`` element marking a guest that runs the workload agent.
BALLOONLAB_NS = "https://balloonlab.dev/xmlns/guest/1"
#: ``<memballoon model=...>`` values that mean a balloon ('none' means no balloon).
BALLOON_MODELS = ("virtio", "virtio-transitional", "virtio-non-transitional", "xen")
#: ``<driver>`` virtio options of a memballoon, in libvirt's order (XML names).
VIRTIO_DRIVER_OPTIONS = ("iommu", "ats", "packed", "page_per_vq")
#: ``<memory model=...>`` values of memory devices libvirt knows (sgx-epc: Intel SGX enclave memory).
MEMORY_MODELS = ("dimm", "nvdimm", "virtio-pmem", "virtio-mem", "sgx-epc")
#: The smallest virtio-mem block libvirt accepts: the host's transparent huge page size, for
#: which libvirt falls back to 2 MiB when it cannot read it (and which x86_64 hosts have).
VIRTIO_MEM_MIN_BLOCK_BYTES = 2 << 20
#: libvirt's limit on vCPU and host node ids in a cpuset (``VIR_DOMAIN_CPUMASK_LEN``).
CPUMASK_LEN = 16384
#: The virtio-serial port name qemu-guest-agent opens in the guest (``<channel><target name=...>``).
AGENT_CHANNEL = "org.qemu.guest_agent.0"
#: ``<channel><source mode=...>`` of a unix socket: QEMU listens (bind) or connects to a listener.
CHANNEL_MODES = ("bind", "connect")

_DECIMAL = re.compile(r"\s*[0-9]{1,20}\s*\Z")  # 20 digits: a C unsigned long long
# libvirt reads address numbers with strtoul(base 0): '18' decimal, '0x12' hex, '022' octal.
_C_UINT = re.compile(r"(0[xX][0-9a-fA-F]{1,8}|0[0-7]{0,11}|[1-9][0-9]{0,9})\Z")
_PCI_LIMITS = {"domain": 0xFFFF, "bus": 0xFF, "slot": 0x1F, "function": 0x7}
_CCW_LIMITS = {"cssid": 0xFE, "ssid": 0x3, "devno": 0xFFFF}
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")  # QEMU rejects other device ids
_GUEST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")  # safe as a runtime dir name
_ONOFF = {"on": True, "off": False}


@dataclass(frozen=True)
class AddressSpec:
    """A device address: ``type`` plus the numbers that type uses (the others are None).

    :param type: 'pci', 'ccw', 'dimm', 'virtio-mmio', ... as in ``<address type=...>``.
    :param domain: PCI domain; with ``bus``, ``slot``, ``function`` (type 'pci' only).
    :param cssid: CCW channel subsystem id; with ``ssid`` and ``devno`` (type 'ccw' only).
    :param slot: also the slot of a 'dimm' address (a memory device), with its guest physical
        ``base`` address in bytes (None when not given: QEMU picks it).
    """

    type: str
    domain: int | None = None
    bus: int | None = None
    slot: int | None = None
    function: int | None = None
    cssid: int | None = None
    ssid: int | None = None
    devno: int | None = None
    base: int | None = None

    @property
    def placed(self) -> bool:
        """False for a PCI address whose numbers are all 0 or absent (``<address type='pci'/>``):
        libvirt assigns those itself (virPCIDeviceAddressIsEmpty), and balloonlab leaves them to QEMU."""
        return self.type != "pci" or any((self.domain, self.bus, self.slot, self.function))


@dataclass(frozen=True)
class MemballoonSpec:
    """The ``<memballoon>`` element.

    :param model: one of :data:`BALLOON_MODELS`.
    :param alias: ``<alias name=...>``: the QEMU device id (libvirt uses ``balloon0`` without it).
    :param autodeflate: ``autodeflate`` on/off, None when not given (QEMU ``deflate-on-oom``).
    :param free_page_reporting: ``freePageReporting`` on/off, None when not given.
    :param period_s: ``<stats period=...>`` in seconds, None without ``<stats>``; 0 disables.
    :param driver_options: ``<driver>`` virtio options as (XML name, on) pairs, libvirt's order.
    :param implicit: True when the XML had no ``<memballoon>`` and the default was added.
    """

    model: str
    alias: str | None = None
    address: AddressSpec | None = None
    autodeflate: bool | None = None
    free_page_reporting: bool | None = None
    period_s: int | None = None
    driver_options: tuple[tuple[str, bool], ...] = ()
    implicit: bool = False


@dataclass(frozen=True)
class DiskSpec:
    """A ``<disk>`` with a local source.

    :param source: ``<source file=...>`` or ``<source dev=...>``.
    :param format: ``<driver type=...>`` ('raw' by default, 'qcow2', ...).
    :param device: 'disk' or 'cdrom'.
    :param bus: ``<target bus=...>`` ('virtio', 'ide', 'sata', 'scsi') or None.
    :param target: ``<target dev=...>`` ('vda', 'hda', ...) or None.
    :param readonly: ``<readonly/>`` present.
    """

    source: str
    format: str = "raw"
    device: str = "disk"
    bus: str | None = None
    target: str | None = None
    readonly: bool = False


@dataclass(frozen=True)
class SerialSpec:
    """A ``<serial>`` port: chardev ``type``, ``<target port=...>``, ``<source path=...>``."""

    type: str
    port: int
    path: str | None = None


@dataclass(frozen=True)
class ChannelSpec:
    """A ``<channel>``: a host character device the guest sees as a named port.

    ``<channel type='unix'>`` with ``<target type='virtio' name='org.qemu.guest_agent.0'/>`` is
    the guest agent's port (:data:`AGENT_CHANNEL`).

    :param type: the host side (chardev type): 'unix', 'pty', 'spicevmc', 'pipe', ...
    :param path: ``<source path=...>``, None when not given (libvirt then picks a unix
        socket's path itself, and so does balloonlab's launcher).
    :param target_type: ``<target type=...>``: 'virtio' (a virtio-serial port), 'guestfwd',
        'xen'; None when not given.
    :param target_name: ``<target name=...>``: the port's name in the guest; None when not given.
    :param mode: for type 'unix' only (the others ignore it), one of :data:`CHANNEL_MODES`:
        'bind' (QEMU listens on ``path``) or 'connect' (QEMU connects to a listener there).
    """

    type: str
    path: str | None
    target_type: str | None
    target_name: str | None
    mode: str = "bind"


@dataclass(frozen=True)
class NumaCellSpec:
    """One guest NUMA node: ``<cpu><numa><cell id=... cpus=... memory=... unit=...>``.

    :param id: the node's id; cells are numbered 0..n-1 (libvirt: the order of the cells when
        ``id`` is left out).
    :param cpus: the vCPU ids of the node, ascending; empty for a node without vCPUs.
    :param memory_bytes: the node's memory in bytes (whole KiB).
    """

    id: int
    cpus: tuple[int, ...]
    memory_bytes: int


@dataclass(frozen=True)
class MemoryDeviceSpec:
    """A memory device, ``<memory model=...>`` in ``<devices>`` (libvirt's formatdomain
    "Memory devices"). Sizes in bytes (whole KiB); None where the XML says nothing.

    :param model: one of :data:`MEMORY_MODELS`.
    :param size_bytes: ``<target><size>``: for virtio-mem the most it can plug, else its size.
    :param node: ``<target><node>``: the guest NUMA node it adds memory to.
    :param block_bytes: ``<target><block>`` (virtio-mem): the plugging granularity.
    :param requested_bytes: ``<target><requested>`` (virtio-mem): what the guest is asked to plug.
    :param address_base: ``<target><address base=...>`` (virtio-mem, libvirt 10+): its guest
        physical address.
    :param dynamic_memslots: ``<target dynamicMemslots=...>`` (virtio-mem, libvirt 10+).
    :param label_bytes: ``<target><label><size>`` (nvdimm): its label area.
    :param readonly: ``<target><readonly/>`` (nvdimm).
    :param source_path: ``<source><path>`` (nvdimm, virtio-pmem): the backing file.
    :param source_pagesize_bytes: ``<source><pagesize>`` (dimm, virtio-mem): a huge page size.
    :param source_nodemask: ``<source><nodemask>`` (dimm, virtio-mem, sgx-epc): host NUMA nodes.
    :param access: ``access`` ('shared' or 'private').
    :param discard: ``discard`` (yes/no).
    :param alias: ``<alias name=...>``: the QEMU device id (libvirt makes one, e.g. ``virtiomem0``).
    :param address: ``<address>``: 'pci' for virtio-mem/virtio-pmem, 'dimm' for dimm/nvdimm.
    :param driver_options: ``<driver>`` virtio options as (XML name, on) pairs, libvirt's order.
    """

    model: str
    size_bytes: int
    node: int | None = None
    block_bytes: int | None = None
    requested_bytes: int | None = None
    address_base: int | None = None
    dynamic_memslots: bool | None = None
    label_bytes: int | None = None
    readonly: bool = False
    source_path: str | None = None
    source_pagesize_bytes: int | None = None
    source_nodemask: tuple[int, ...] = ()
    access: str | None = None
    discard: bool | None = None
    alias: str | None = None
    address: AddressSpec | None = None
    driver_options: tuple[tuple[str, bool], ...] = ()


@dataclass(frozen=True)
class DomainSpec:
    """What balloonlab needs to know about a libvirt domain. Sizes are bytes (whole KiB).

    ``memory_bytes`` is libvirt's ``<memory>``: the total, memory devices included (without
    ``<memory>`` libvirt takes the NUMA cells' memory plus the memory devices).
    ``max_memory_bytes`` is ``<maxMemory>``, the ceiling for memory hotplug.

    ``xml`` is the source text as given (for a spec built in Python: as rendered). Use
    :func:`with_changes` rather than :func:`dataclasses.replace` to get a spec whose ``xml``
    matches its fields.
    """

    name: str
    uuid: str | None
    domain_type: str
    memory_bytes: int
    current_memory_bytes: int
    max_memory_bytes: int | None
    vcpus: int
    arch: str | None
    machine: str | None
    emulator: str | None
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    disks: tuple[DiskSpec, ...]
    serials: tuple[SerialSpec, ...]
    memballoon: MemballoonSpec | None
    agent: bool
    #: ``<maxMemory slots=...>``: slots for dimm/nvdimm devices (None when not given).
    memory_slots: int | None = None
    #: ``<cpu><numa><cell>``: the guest NUMA nodes, by id.
    numa_cells: tuple[NumaCellSpec, ...] = ()
    #: ``<devices><memory model=...>``: memory devices, in document order.
    memory_devices: tuple[MemoryDeviceSpec, ...] = ()
    #: ``<memtune><min_guarantee>``: the least memory policies leave the guest (None: not given).
    min_guarantee_bytes: int | None = None
    #: ``<devices><channel>``: host character devices the guest sees as named ports, in document order.
    channels: tuple[ChannelSpec, ...] = ()
    xml: str = dataclasses.field(default="", repr=False)

    @property
    def has_balloon(self) -> bool:
        """True unless the domain says ``<memballoon model='none'/>``."""
        return self.memballoon is not None

    @property
    def period_s(self) -> int | None:
        """The balloon's stats period in seconds, None without a balloon or ``<stats>``."""
        return self.memballoon.period_s if self.memballoon is not None else None

    @property
    def initial_memory_bytes(self) -> int:
        """The memory the guest boots with (QEMU's ``-m size``, before libvirt aligns it): the
        NUMA cells' memory when there are cells, else ``memory_bytes`` less the memory devices."""
        if self.numa_cells:
            return sum(cell.memory_bytes for cell in self.numa_cells)
        return self.memory_bytes - sum(device.size_bytes for device in self.memory_devices)

    @property
    def has_memory_hotplug(self) -> bool:
        """True when ``<maxMemory>`` is given: QEMU then gets ``maxmem`` (and ``slots``)."""
        return self.max_memory_bytes is not None

    @property
    def agent_channel(self) -> ChannelSpec | None:
        """The first channel whose target name is :data:`AGENT_CHANNEL` (the guest agent's port), or None."""
        return next((c for c in self.channels if c.target_name == AGENT_CHANNEL), None)

