"""What goes into the Debian guest image: packages, the files written into the root, the script
run inside it, and the kernel command line. Every piece here is part of the image's cache key
(:func:`balloonlab.image.debian.build_debian_image` hashes them), so changing any of them makes
a new image rather than silently reusing an old one.
"""

from __future__ import annotations

from balloonlab.domain import AGENT_CHANNEL

__all__ = ["AGENT_CHANNEL", "CMDLINE", "DEFAULT_DISK_SIZE", "DEFAULT_PACKAGES", "DEFAULT_SWAP_SIZE",
           "MASKED_UNITS", "RECIPE_VERSION", "chroot_script", "config_files"]

#: Bump whenever the recipe below changes in a way the other inputs do not show (a step, a
#: tool option): images built by an older recipe are then ignored, not reused.
RECIPE_VERSION = 1
#: What goes into the root on top of ``minbase`` (apt resolves their Depends, not Recommends).
#: systemd-sysv makes systemd PID 1; udev loads drivers by alias (virtio_console for the agent's
#: port); linux-base, kmod and initramfs-tools are what the kernel package needs to install and
#: build its initramfs; procps gives free/vmstat for debugging by hand.
DEFAULT_PACKAGES: tuple[str, ...] = (
    "systemd-sysv", "udev", "kmod", "linux-base", "initramfs-tools", "procps",
    "qemu-guest-agent", "stress-ng",
)
#: Kernel command line. root=/dev/vda: the first virtio-blk disk (the domain has only one).
#: rw: systemd would remount it rw anyway, and without an fsck pass (fstab says 0) there is no
#: reason to mount it read-only first. memhp_default_state: as in the built-in guest, memory a
#: virtio-mem device plugs is onlined movable, so it can be unplugged again.
CMDLINE = "root=/dev/vda rw console=ttyS0 quiet panic=1 memhp_default_state=online_movable"
#: The raw disk's size. The qcow2 only stores what the file system uses, so room costs nothing
#: until the guest writes (page-cache workloads need files bigger than the guest's RAM).
DEFAULT_DISK_SIZE = 4 << 30
#: The swap file made on first boot (0: none).
DEFAULT_SWAP_SIZE = 256 << 20

_SWAP_SERVICE = """\
[Unit]
Description=balloonlab: swap file on the root disk (created on first boot)
# Made in the guest, not at build time: mkfs.ext4 -d turns zero blocks into holes, and swapon
# refuses a swap file with holes; fallocate in the guest gives real (unwritten) extents.
DefaultDependencies=no
After=local-fs.target
Before=swap.target
ConditionPathExists=!/etc/balloonlab-noswap

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c '{command}'
ExecStop=/sbin/swapoff /swapfile

[Install]
WantedBy=swap.target
"""
#: The swap unit's command: make the file once (first boot of an overlay), swap on it every boot.
_SWAP_COMMAND = ("test -f /swapfile || {{ fallocate -l {size} /swapfile && chmod 600 /swapfile && "
                 "mkswap -q /swapfile; }}; swapon /swapfile")

#: Timers that would wake a quiet guest and fill its page cache at random times (apt's daily
#: runs, e2scrub, fstrim): memory measurements want a guest that does only what it is told.
#: getty-static starts gettys on tty2-6 when there is no logind: the guest has no VGA console
#: (-nodefaults), and under TCG they cost about 9 s of boot.
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "e2scrub_reap.service",
                 "fstrim.timer", "getty-static.service")


def config_files(swap_bytes: int, hostname: str) -> dict[str, str]:
    """Path (relative to the root) -> text of every file the recipe writes before packages
    are configured. Part of the cache key: changing any of them makes a new image."""
    files = {
        "etc/hostname": f"{hostname}\n",
        "etc/hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n",
        # fsck pass 0: the overlay of a killed guest is thrown away, not repaired, and
        # systemd-fsck-root would cost seconds of TCG time at every boot.
        "etc/fstab": "/dev/vda\t/\text4\trw,relatime,errors=remount-ro\t0\t0\n",
        # Loaded explicitly, not only by udev's modalias: the balloon's stats are the whole
        # point of this guest, and virtio_console carries the agent's port.
        "etc/modules-load.d/balloonlab.conf": "virtio_balloon\nvirtio_console\n",
        # Only the modules needed to reach the root disk: MODULES=most would put hundreds of
        # drivers into an initramfs that TCG then has to decompress at every boot. gzip: zstd
        # is only a Recommends of initramfs-tools, so minbase does not have it.
        "etc/initramfs-tools/conf.d/balloonlab.conf": "MODULES=list\nCOMPRESS=gzip\n",
        "etc/initramfs-tools/modules": "virtio_pci\nvirtio_blk\n",
        # Package scripts run in the chroot must not start daemons on the build host.
        "usr/sbin/policy-rc.d": "#!/bin/sh\nexit 101\n",
        # The journal stays in RAM (/run): no journal files growing the overlay, and its memory
        # shows up in the guest's meminfo like any tmpfs.
        "etc/systemd/journald.conf.d/balloonlab.conf": "[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n",
    }
    if swap_bytes:
        files["etc/systemd/system/balloonlab-swapfile.service"] = _SWAP_SERVICE.format(
            command=_SWAP_COMMAND.format(size=swap_bytes))
    return files


def chroot_script(kernel_deb: str, swap: bool) -> str:
    """What runs inside the new root (as root, /proc /sys /dev mounted, no network needed)."""
    steps = [
        "set -eu",
        "export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        # The package's postinst runs depmod and update-initramfs (with the conf.d above).
        f"dpkg -i /{kernel_deb}",
        f"rm -f /{kernel_deb}",
        # Root logs in on the serial console with an empty password (Debian's PAM allows
        # nullok): for debugging a guest by hand (virsh console), never for anything reachable.
        "passwd -d root",
        # Debian's unit has no [Install]: udev starts it when the port appears; a unit file
        # with one is enabled too, so a future package change cannot silently disable it.
        "if grep -q '^\\[Install\\]' /lib/systemd/system/qemu-guest-agent.service; then "
        "systemctl enable qemu-guest-agent.service; fi",
        *(["systemctl enable balloonlab-swapfile.service"] if swap else []),
        f"systemctl mask {' '.join(MASKED_UNITS)}",
        # No display: graphical.target only adds waiting to the boot.
        "systemctl set-default multi-user.target",
        "apt-get clean",
        "rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /tmp/* /var/tmp/* /var/log/*.log /var/log/apt/*",
        # An empty machine-id: every guest booted from the image gets its own.
        ": > /etc/machine-id",
        "rm -f /var/lib/dbus/machine-id /usr/sbin/policy-rc.d",
    ]
    return "\n".join(steps) + "\n"


