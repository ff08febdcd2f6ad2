#!/bin/sh
# Host networking: listen where meshlet says ($PORT), on loopback unless $HOST says otherwise.
# The shell stays as PID 1 so SIGTERM is handled (PID 1 ignores signals it has no handler
# for): it stops httpd and exits 0.
if [ -z "$MESHLET_INSTANCE" ]; then
  read -r id < /proc/sys/kernel/random/uuid
  MESHLET_INSTANCE="httpd-${id%%-*}"
fi
export INSTANCE="$MESHLET_INSTANCE"
/bin/busybox httpd -f -v -p "${HOST:-127.0.0.1}:${PORT:-8080}" -h /www &
httpd=$!
trap 'kill -TERM "$httpd" 2>/dev/null; wait "$httpd"; exit 0' TERM INT
wait "$httpd"
