# qlab: `make report` (the main job) and `make test` (the tests). Both bootstrap everything.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SYSDEPS := nft conntrack ip chromium shellcheck miniupnpd stund

.PHONY: report test lint bench sysdeps venv clean lab-clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[lab,dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Debian packages the netns lab and the report check need; installed only when missing, as root.
sysdeps:
	@missing=""; for c in $(SYSDEPS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages for:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      nftables conntrack iproute2 chromium shellcheck miniupnpd-nftables stun-server >/dev/null; \
	  else echo "note: missing$$missing (netns lab / browser checks need them; install as root)"; fi; \
	fi

report: $(STAMP)
	@$(BIN)/qlab report

test: sysdeps $(STAMP)
	$(BIN)/ruff check qlab tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check qlab tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/relay.py

lab-clean: $(STAMP)
	$(BIN)/qlab lab down --all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
