# Everything a fresh Debian/Ubuntu machine needs, in two commands: `make demo`, `make test`.
# Debian packages are installed only when missing (with sudo when not root); Python
# packages go into .venv from pyproject.toml.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# gdb/gdbserver: the recorder; qemu: the bare-metal lab target; libxen-dev: Xen's headers
# (the layout oracle and the lab guests); gcc-multilib: the 32-bit guest build;
# python3-dev: the headers the replay's compiled decoder (xreplay/xrr/_fastdelta.c) builds with.
DEBS := gdb gdbserver qemu-system-x86 libxen-dev gcc gcc-multilib libc6-dev-i386 make \
        python3 python3-venv python3-dev valgrind
PYTEST_ARGS ?=

.PHONY: setup deps venv demo test bench fuzz lint clean

setup: deps venv

deps:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml xreplay/xrr/_fastdelta.c
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/xreplay demo

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks

# Hostile inputs for every parser of a stranger's file; FUZZ_CASES per parser.
FUZZ_CASES ?= 100000
fuzz: venv
	$(PY) -m benchmarks fuzz --hits $(FUZZ_CASES)

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
