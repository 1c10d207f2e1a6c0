# balloonlab: two commands do all the set-up on a fresh Debian/Ubuntu machine.
#   make demo   boots the built-in guest and shows its balloon at work
#   make test   runs the test suite against real QEMU guests
# Both install what is missing (apt packages, .venv, the guest image) and are fast when
# everything is already there.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := qemu-system-x86 qemu-utils busybox-static libvirt-daemon-system libvirt-clients libvirt-dev pkg-config chromium \
	prometheus openssh-server faketime iproute2 debootstrap e2fsprogs
INSTALLED := $(VENV)/.installed

.PHONY: demo test lint guest debian stacks corpus system-packages clean

demo: guest
	$(BIN)/balloonlab demo

# Two workers: the tests mostly wait on guests (TCG boots, stats periods, 30 s windows), so two
# halve the wall time on 2 cores; the tests sharing a libvirtd run on one worker, one after
# another (tests/conftest.py's scheduler).
PYTEST_WORKERS ?= 2

test: guest debian stacks corpus lint
	$(BIN)/pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS); rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests" >&2; exit $$rc

lint: $(INSTALLED)
	$(BIN)/ruff check balloonlab
	$(BIN)/mypy

guest: $(INSTALLED)
	@$(BIN)/balloonlab guest build

# The Debian guest (debootstrap from apt's mirror, systemd, qemu-guest-agent, swap, stress-ng), a qcow2
# cached under its inputs' hash: about 1.5 min the first time, a second after.
debian: $(INSTALLED)
	@$(BIN)/balloonlab guest build --distro debian

# The second tested stack beside the distro's (Debian 12: QEMU 10, libvirt 11 and Linux 6.12
# from bookworm-backports, unpacked under the cache, never installed over QEMU 7.2), and the
# built-in guest for every stack's kernel.
stacks: $(INSTALLED)
	@$(BIN)/balloonlab stacks install

# libvirt's own test domain XMLs with their expected QEMU argv (Debian's libvirt source
# package, cached): the conformance corpus of tests/test_libvirt_corpus.py.
corpus: system-packages
	@scripts/fetch-libvirt-corpus

system-packages:
	@scripts/ensure-system-packages $(APT_PACKAGES)

$(INSTALLED): pyproject.toml | system-packages
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,libvirt,notebooks,fleet]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
