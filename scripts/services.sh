#!/usr/bin/env bash
# Install the programs the store and page tests run for real: PostgreSQL (initdb, pg_ctl) and Chromium, from
# Debian's packages. The tests start and stop them themselves (a PostgreSQL cluster in a temp directory, owned
# by `nobody` when run as root; moto's S3 server from the [dev] extra; Chromium driven by Playwright), so this
# script only installs. Skips what is already there.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
  echo "services: postgresql and chromium are installed"
  exit 0
fi
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}"
echo "services: installed ${need[*]}"
