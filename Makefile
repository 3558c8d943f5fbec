# sliceproxy — everything a fresh machine needs, in two commands:
#   make demo   create .venv, install, explain + render the bundled example cluster
#   make test   install what the tests need (as root also the Debian packages and
#               the VM tooling), then run every test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEBIAN_PACKAGES := iptables nftables conntrack ipset iproute2 qemu-system-x86 linux-image-amd64
EXAMPLE := examples/cluster.yaml
NODE ?= worker-a

.PHONY: demo test venv deps lint unit golden clean

$(BIN)/sliceproxy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

venv: $(BIN)/sliceproxy

demo: venv
	@echo "== sliceproxy explain: what $(NODE) does with each service port, and why"
	$(BIN)/sliceproxy explain --state $(EXAMPLE) --node $(NODE)
	@if $(BIN)/sliceproxy render --help >/dev/null 2>&1; then \
		echo "== sliceproxy render: the iptables rule set $(NODE) would get"; \
		$(BIN)/sliceproxy render --state $(EXAMPLE) --node $(NODE) --backend iptables \
			--cluster-cidr 10.244.0.0/16,fd00:10:244::/48 --family both; \
	fi

# Debian packages for the e2e (network namespace) and VM tests. Only as root;
# otherwise those tests skip and say why.
deps: venv
	@if [ "$$(id -u)" = 0 ]; then \
		missing=""; for p in $(DEBIAN_PACKAGES); do \
			dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then \
			echo "installing Debian packages:$$missing"; \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
				|| echo "WARNING: apt-get install failed; tests needing$$missing will skip"; \
		fi; \
		if [ -x tests/vm/install.sh ]; then tests/vm/install.sh $(VENV); fi; \
	else \
		echo "not root: skipping Debian packages (e2e and VM tests will skip)"; \
	fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q tests/unit

test: deps lint
	$(BIN)/pytest -q -ra

# Regenerate every golden file (review the diff like code).
golden: venv
	$(BIN)/python -m tests.golden.regen

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
