#!/usr/bin/env bash
# Installs the system packages the tests need when they are missing: real Ceph (mon, osd,
# radosgw) from Debian, and docker-compose 1.29 (validates infra/docker-compose.yml without
# an engine). As root it installs them; otherwise it prints the one command to run.
set -euo pipefail
need=()
for pair in ceph-mon:ceph-mon ceph-osd:ceph-osd radosgw:radosgw ceph:ceph-common \
            monmaptool:ceph-common ceph-authtool:ceph-common docker-compose:docker-compose; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
[ ${#need[@]} -eq 0 ] && exit 0
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
cmd="apt-get update && apt-get install -y --no-install-recommends ${need[*]}"
if [ "$(id -u)" != 0 ]; then
  echo "The tests need Debian packages that are missing: ${need[*]}" >&2
  echo "Run as root:  $cmd" >&2
  exit 1
fi
echo "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
