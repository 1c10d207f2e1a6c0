# balloonlab: two commands do all the set-up on a fresh Debian/Ubuntu machine.
#   make demo   boots the built-in guest and shows its balloon at work
#   make test   runs the test suite against real QEMU guests
# Both install what is missing (apt packages, .venv, the guest image) and are fast when
# everything is already there.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := qemu-system-x86 qemu-utils busybox-static libvirt-daemon-system libvirt-clients libvirt-dev pkg-config chromium
INSTALLED := $(VENV)/.installed

.PHONY: demo test lint guest system-packages clean

demo: guest
	$(BIN)/balloonlab demo

test: guest lint
	$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests" >&2; exit $$rc

lint: $(INSTALLED)
	$(BIN)/ruff check balloonlab
	$(BIN)/mypy

guest: $(INSTALLED)
	@$(BIN)/balloonlab guest build

system-packages:
	@scripts/ensure-system-packages $(APT_PACKAGES)

$(INSTALLED): pyproject.toml | system-packages
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,libvirt,notebooks]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
