#!/bin/sh
# Builds meshlet-demo/httpd:latest on the engine $DOCKER_HOST points at (default: local).
#   config/examples/docker/httpd/build.sh [tag]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
busybox=$(command -v busybox)
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp -R "$here/." "$ctx/"
cp "$busybox" "$ctx/busybox"
docker build -q -t "${1:-meshlet-demo/httpd:latest}" "$ctx"
