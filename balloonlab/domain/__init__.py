"""libvirt domain XML <-> :class:`DomainSpec`, balloonlab's frozen description of one guest.

This package is the only part of balloonlab that reads or writes domain XML (and the only
one that uses lxml). :func:`parse_domain_xml` turns what libvirt accepts into immutable dataclasses, with
libvirt's own defaults applied (memory in KiB unless ``unit=`` says otherwise, rounded up to a
whole KiB and stored in bytes; ``currentMemory`` = ``memory`` when absent; an implicit virtio
balloon when there is no ``<memballoon>``), and reports bad input as
:class:`~balloonlab.model.errors.DomainXMLError` with the line and element. :func:`render_domain_xml`
writes a spec back as XML libvirt accepts and :func:`builtin_domain` builds balloonlab's own test
guest. NUMA cells (``<cpu><numa>``) and memory devices (``<memory model='virtio-mem'>``, dimm,
nvdimm, virtio-pmem) are read with libvirt's rules (:mod:`.memory_rules` lists them). ``<channel>``
elements (the guest agent's port among them, :data:`AGENT_CHANNEL`) are kept whatever their
kind: what the QEMU launcher cannot build it refuses there, not here.
``balloonlab.qemu.argv`` turns a spec into a QEMU command line; nothing here starts anything.
"""

from balloonlab.domain.memory import format_id_set, parse_id_set
from balloonlab.domain.parse import as_spec, load_domain_xml, parse_domain_xml
from balloonlab.domain.render import (VirtioMemArg, builtin_domain, render_domain_xml, with_changes,
                                      with_serial_socket_paths)
from balloonlab.domain.spec import (AGENT_CHANNEL, BALLOON_MODELS, BALLOONLAB_NS, CHANNEL_MODES, MEMORY_MODELS,
                                    VIRTIO_DRIVER_OPTIONS, VIRTIO_MEM_MIN_BLOCK_BYTES, AddressSpec, ChannelSpec,
                                    DiskSpec, DomainSpec, MemballoonSpec, MemoryDeviceSpec, NumaCellSpec, SerialSpec)

__all__ = ["AGENT_CHANNEL", "BALLOON_MODELS", "BALLOONLAB_NS", "CHANNEL_MODES", "MEMORY_MODELS",
           "VIRTIO_DRIVER_OPTIONS", "VIRTIO_MEM_MIN_BLOCK_BYTES", "AddressSpec", "ChannelSpec", "DiskSpec",
           "DomainSpec", "MemballoonSpec", "MemoryDeviceSpec", "NumaCellSpec", "SerialSpec", "VirtioMemArg",
           "as_spec", "builtin_domain", "format_id_set", "load_domain_xml", "parse_domain_xml", "parse_id_set",
           "render_domain_xml", "with_changes", "with_serial_socket_paths"]
