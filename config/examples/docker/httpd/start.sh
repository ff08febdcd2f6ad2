#!/bin/sh
# Host networking: listen where meshlet says ($PORT), on loopback unless $HOST says otherwise.
# The instance name is exported for the CGI; exec keeps this pid for httpd.
export INSTANCE="${MESHLET_INSTANCE:-httpd-$$}"
exec /bin/busybox httpd -f -v -p "${HOST:-127.0.0.1}:${PORT:-8080}" -h /www
