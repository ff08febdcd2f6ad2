#!/bin/sh
# Builds meshlet-demo/httpd:latest on the engine $DOCKER_HOST points at (default: local).
#   config/examples/docker/httpd/build.sh [tag]
# Needs: the docker client and a running engine, and a statically linked busybox (Debian's
# busybox-static): the image is FROM scratch, so nothing is pulled from a registry.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
fail() { echo "build.sh: $*" >&2; exit 1; }
command -v docker >/dev/null 2>&1 || fail "no docker client: install Debian's docker.io (or docker-ce-cli)"
busybox=$(command -v busybox) || fail "no busybox: install Debian's busybox-static (apt-get install busybox-static)"
if file -L "$busybox" 2>/dev/null | grep -q "dynamically linked"; then
  fail "$busybox is linked dynamically and cannot run in a FROM-scratch image: install busybox-static"
fi
docker version >/dev/null 2>&1 || fail "no Docker engine answers at ${DOCKER_HOST:-unix:///var/run/docker.sock}: start dockerd"
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp -R "$here/." "$ctx/"
cp "$busybox" "$ctx/busybox"
docker build -q -t "${1:-meshlet-demo/httpd:latest}" "$ctx"
